"""Resuming interrupted fits: the batch-job contract of ``--checkpoint-dir``.

- A ``dask-em fit`` killed with SIGKILL (its whole process group, local cluster workers
  included) mid-fit and run again with the same command ends with exactly the result of
  an uninterrupted run, having resumed from the last committed iteration.
- The Python API (``checkpoint_dir=``) interrupted after any save (initialization, any
  iteration, the final state; during the second of two initializations) resumes to the
  uninterrupted result, also with a larger ``max_iter``.
- A checkpoint made for other data (rows, shape) or other hyper-parameters
  (``--n-components``) is refused with exit status 2 and a one-line message naming the
  difference, and is left byte for byte untouched; ``--restart`` then starts over.
- A damaged checkpoint (truncated array, flipped bit, edited or truncated
  ``state.json``, unreadable manifest) resumes from the last intact state, says so on
  stderr, and still ends equal to an uninterrupted run; with no intact state left the
  command says so in one line and exits 2.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zarr
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_same_fit,
    assert_usage_error,
    current_iteration,
    kill_group,
    mixture,
    run_cli,
    run_many,
    snapshot,
    start_cli,
    wait_for_committed,
    write_array,
)

from dask_em import GaussianMixture, load_model
from dask_em.checkpoint import Checkpoint, CheckpointMismatch
from dask_em.em import FitState

PROGRESS = re.compile(r"^iteration\s+(\d+)\s+lower bound", re.MULTILINE)


def progress_iterations(stderr: str) -> list[int]:
    """Iteration numbers of the progress lines of a ``dask-em fit`` run."""
    return [int(n) for n in PROGRESS.findall(stderr)]


# ------------------------------------------------------------ kill -9 and resume
@pytest.mark.slow
def test_fit_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """SIGKILL the process group of a running ``dask-em fit`` after >= 3 committed
    iterations, rerun the same command: it resumes there and ends exactly where an
    uninterrupted run ends."""
    max_iter = 30
    data = write_array(tmp_path / "data.zarr", mixture(100_000, 8, 4, seed=1), (12_500, 8))
    common = [
        data,
        "--n-components",
        "4",
        "--tol",
        "0",
        "--max-iter",
        str(max_iter),
        "--n-init",
        "1",
    ]
    common += LOCAL

    began = time.monotonic()
    reference = run_cli("fit", *common, "--output", tmp_path / "reference.zarr")
    assert_ok(reference)
    uninterrupted_seconds = time.monotonic() - began
    assert progress_iterations(reference.stderr) == list(range(1, max_iter + 1))

    ckpt, model = tmp_path / "ckpt", tmp_path / "model.zarr"
    command = ["fit", *common, "--output", model, "--checkpoint-dir", ckpt]
    process = start_cli(*command)
    try:
        wait_for_committed(
            process,
            ckpt,
            3,
            timeout=120,
            hint=f" (an uninterrupted one took {uninterrupted_seconds:.1f} s): make it longer",
        )
    finally:
        kill_group(process)
    assert process.returncode == -9

    killed = Checkpoint(ckpt, {}).load(check_fingerprint=False)
    assert killed is not None and not killed.state.done
    done_before_kill = current_iteration(killed)
    assert 3 <= done_before_kill < max_iter
    assert not model.exists()

    resumed = run_cli(*command)
    assert_ok(resumed)
    assert f"Resuming initialization 0 at iteration {done_before_kill} " in resumed.stderr
    assert "Initialization with seed" not in resumed.stderr
    # only the iterations after the last committed one were run again
    assert progress_iterations(resumed.stderr) == list(range(done_before_kill + 1, max_iter + 1))
    assert_same_fit(load_model(model), load_model(tmp_path / "reference.zarr"))
    final = Checkpoint(ckpt, {}).load(check_fingerprint=False)
    assert final is not None and final.state.done


# ------------------------------------------------------------ Python API interruptions
class Interrupted(Exception):
    """Raised by `crash_after` right after a checkpoint save (a simulated crash)."""


@pytest.fixture
def crash_after(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[FitState], bool]], None]:
    """``crash_after(when)``: from now on, every ``Checkpoint.save`` really saves, then
    raises `Interrupted` if ``when(state)``; the real ``save`` is restored at teardown
    (or by ``monkeypatch.undo()``)."""
    real_save = Checkpoint.save

    def arm(when: Callable[[FitState], bool]) -> None:
        def save(self: Checkpoint, state: FitState, n_passes: int) -> None:
            real_save(self, state, n_passes)
            if when(state):
                raise Interrupted(f"crash after saving {state}")

        monkeypatch.setattr(Checkpoint, "save", save)

    return arm


@pytest.fixture
def small_data(tmp_path: Path) -> str:
    """3,000 x 3 rows of a 3-component mixture in a Zarr store of 12 row chunks."""
    return write_array(tmp_path / "small.zarr", mixture(3000, 3, 3, seed=2), (250, 3))


def at_iteration(n_iter: int, init_index: int = 0) -> Callable[[FitState], bool]:
    """A `crash_after` condition: a state where initialization ``init_index`` has made
    ``n_iter`` iterations (0: right after the initialization)."""

    def when(s: FitState) -> bool:
        run = s.run(init_index)
        return not s.done and run is not None and run.n_iter == n_iter

    return when


@pytest.mark.parametrize(
    ("n_init", "when", "label"),
    [
        (1, at_iteration(0), "right after the initialization"),
        (1, at_iteration(1), "after iteration 1"),
        (1, at_iteration(7), "after iteration 7"),
        (1, lambda s: s.done, "after the final state"),
        (2, at_iteration(0, init_index=1), "right after the second initialization"),
        (2, at_iteration(4, init_index=1), "during the second initialization"),
        (3, at_iteration(2, init_index=2), "three initializations sharing passes"),
    ],
)
def test_interrupted_python_fit_resumes_to_the_uninterrupted_result(
    small_data: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    crash_after: Callable[[Callable[[FitState], bool]], None],
    n_init: int,
    when: Callable[[FitState], bool],
    label: str,
) -> None:
    """A fit that crashes right after a checkpoint save resumes (new estimator, same
    ``checkpoint_dir``), runs only the iterations not saved yet, and ends with the
    uninterrupted fit's parameters and history."""
    settings = dict(n_components=3, tol=0.0, max_iter=15, n_init=n_init, random_state=5)
    with pytest.warns(Warning):  # tol=0 never converges: a ConvergenceWarning
        reference = GaussianMixture(**settings).fit(small_data)

    crash_after(when)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        GaussianMixture(**settings, checkpoint_dir=ckpt).fit(small_data)
    monkeypatch.undo()
    saved = Checkpoint(ckpt, {}).load(check_fingerprint=False)
    assert saved is not None and when(saved.state), label

    capsys.readouterr()
    with pytest.warns(Warning):
        resumed = GaussianMixture(**settings, checkpoint_dir=ckpt, verbose=2, verbose_interval=1)
        resumed.fit(small_data)
    assert_same_fit(resumed, reference)
    if n_init == 2:  # the best run was picked among both initializations
        assert saved.state.best is not None
    stderr = capsys.readouterr().err
    assert "Resuming" in stderr and "Initialization with seed" not in stderr
    for index in range(n_init):  # each run goes on from its own saved iteration
        run = saved.state.run(index)
        done = 15 if saved.state.done or run is None else run.n_iter
        which = index + 1 if n_init > 1 else None
        assert iterations_printed(stderr, which) == list(range(done + 1, 16)), index


def iterations_printed(stderr: str, init: int | None = None) -> list[int]:
    """Iteration numbers of the progress lines that ``verbose=2`` printed (for
    initialization ``init``, 1-based, when there are several)."""
    lines = re.findall(r"^iteration\s+(\d+).*$", stderr, re.MULTILINE)
    if init is None:
        return [int(n) for n in lines]
    return [
        int(m.group(1))
        for m in re.finditer(r"^iteration\s+(\d+).*\[init (\d+)/\d+\]", stderr, re.MULTILINE)
        if int(m.group(2)) == init
    ]


def test_resume_may_raise_max_iter(
    small_data: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    crash_after: Callable[[Callable[[FitState], bool]], None],
) -> None:
    """``max_iter`` is not part of the fingerprint: a fit interrupted under max_iter=20
    and resumed with max_iter=25 equals an uninterrupted max_iter=25 fit."""
    settings = dict(n_components=3, tol=0.0, random_state=1)
    with pytest.warns(Warning):
        reference = GaussianMixture(**settings, max_iter=25).fit(small_data)
    crash_after(at_iteration(6))
    with pytest.raises(Interrupted):
        GaussianMixture(**settings, max_iter=20, checkpoint_dir=tmp_path / "c").fit(small_data)
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.warns(Warning):
        resumed = GaussianMixture(
            **settings, max_iter=25, checkpoint_dir=tmp_path / "c", verbose=2, verbose_interval=1
        )
        resumed.fit(small_data)
    assert iterations_printed(capsys.readouterr().err) == list(range(7, 26))
    assert_same_fit(resumed, reference)


def test_python_fit_refuses_a_checkpoint_of_other_data_or_settings(
    small_data: str, tmp_path: Path
) -> None:
    """`CheckpointMismatch` names the difference and the checkpoint is left untouched."""
    ckpt = tmp_path / "ckpt"
    GaussianMixture(3, max_iter=5, tol=1e-3, random_state=0, checkpoint_dir=ckpt).fit(small_data)
    before = snapshot(ckpt)
    other = write_array(tmp_path / "other.zarr", mixture(3000, 3, 3, seed=99), (250, 3))
    cases = [
        (other, dict(n_components=3, tol=1e-3), "data.content"),
        (small_data, dict(n_components=2, tol=1e-3), "hyper_parameters.n_components"),
        (small_data, dict(n_components=3, tol=1e-4), "hyper_parameters.tol"),
        (small_data, dict(n_components=3, tol=1e-3, covariance_type="diag"), "covariance_type"),
    ]
    for data, settings, named in cases:
        with pytest.raises(CheckpointMismatch, match=re.escape(named)):
            GaussianMixture(**settings, max_iter=5, random_state=0, checkpoint_dir=ckpt).fit(data)
        assert snapshot(ckpt) == before


# ------------------------------------------------------------ CLI refusals
REFUSALS = {  # case: (data, --n-components, what the message must name)
    "other rows": ("other_rows", "3", "data.content"),
    "more rows": ("more_rows", "3", "data.shape: [2000, 3] in the checkpoint, [2100, 3] now"),
    "n_components": ("data", "4", "hyper_parameters.n_components: 3 in the checkpoint, 4 now"),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """A finished ``dask-em fit --checkpoint-dir`` of 2,000 x 3 rows with 3 components;
    for each case of `REFUSALS`, a copy of its checkpoint, the same command run again with
    the case's data and ``--n-components`` (refused), then with ``--restart``."""
    root = tmp_path_factory.mktemp("refusal")
    stores = {
        "data": write_array(root / "data.zarr", mixture(2000, 3, 3, seed=3)),
        "other_rows": write_array(root / "other_rows.zarr", mixture(2000, 3, 3, seed=4)),
        "more_rows": write_array(root / "more_rows.zarr", mixture(2100, 3, 3, seed=3)),
    }
    assert_ok(
        run_cli(
            "fit",
            stores["data"],
            "--n-components",
            "3",
            "--output",
            root / "m.zarr",
            "--checkpoint-dir",
            root / "ckpt",
            "--quiet",
            *LOCAL,
        )
    )
    cases: dict[str, dict[str, object]] = {}
    for case, (data_key, n_components, _) in REFUSALS.items():
        ckpt = root / case / "ckpt"
        shutil.copytree(root / "ckpt", ckpt)
        cases[case] = {
            "ckpt": ckpt,
            "before": snapshot(ckpt),
            "data": stores[data_key],
            "model": root / case / "m.zarr",
            "command": [
                "fit",
                stores[data_key],
                "--n-components",
                n_components,
                "--output",
                root / case / "m.zarr",
                "--checkpoint-dir",
                ckpt,
                "--quiet",
                *LOCAL,
            ],
        }
    refused = run_many({case: c["command"] for case, c in cases.items()}, max_workers=3)
    for case, c in cases.items():
        c["refused"] = refused[case]
        c["after refusal"] = snapshot(c["ckpt"])
        c["model after refusal"] = Path(c["model"]).exists()
    restarted = run_many(
        {case: [*c["command"], "--restart"] for case, c in cases.items()}, max_workers=3
    )
    for case, c in cases.items():
        c["restarted"] = restarted[case]
    return cases


@pytest.mark.parametrize("case", list(REFUSALS))
def test_cli_refuses_to_resume_another_fit_and_restart_starts_over(
    refusals: dict[str, dict[str, object]], case: str
) -> None:
    """Changed rows, shape or ``--n-components``: exit 2, one line naming the difference,
    no model written, checkpoint byte for byte untouched; ``--restart`` then fits anew."""
    c = refusals[case]
    assert_usage_error(c["refused"], REFUSALS[case][2], "--restart")
    assert c["after refusal"] == c["before"]
    assert c["model after refusal"] is False

    assert_ok(c["restarted"])
    after = Checkpoint(c["ckpt"], {}).load(check_fingerprint=False)
    assert after is not None and after.state.done
    n_components = int(REFUSALS[case][1])
    assert after.fingerprint["data"]["shape"] == list(zarr.open_array(c["data"]).shape)
    assert after.fingerprint["hyper_parameters"]["n_components"] == n_components
    assert load_model(c["model"]).n_components == n_components


# ------------------------------------------------------------ damaged checkpoints
INTERRUPT_AT = 6
DAMAGE_MAX_ITER = 12


def truncate(path: Path) -> None:
    """Cut a file to half its size."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path: Path) -> None:
    """Flip the lowest bit of the last byte of a file (inside the array data of a .npy)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def edit_state_json(path: Path) -> None:
    """Change a value in a state.json, keeping it valid JSON (its checksum must catch it)."""
    text = path.read_text()
    edited = re.sub(r'"n_passes": (\d+)', lambda m: f'"n_passes": {int(m.group(1)) + 1}', text)
    assert edited != text
    path.write_text(edited)


def garble(path: Path) -> None:
    """Replace a file by bytes that are not JSON."""
    path.write_bytes(b'{"format": "dask-em-checkp\x00\xff')


DAMAGES = {  # case: (damage, file of the newest state, what the warning must say)
    "truncated npy": (truncate, "run0_means.npy", "run0_means.npy fails its checksum"),
    "flipped bit in npy": (
        flip_bit,
        "run0_covariances.npy",
        "run0_covariances.npy fails its checksum",
    ),
    "edited state.json": (edit_state_json, "state.json", "state.json fails its checksum"),
    "truncated state.json": (truncate, "state.json", "state.json is unreadable"),
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Data; the model of an uninterrupted ``dask-em fit`` of it; a checkpoint of the same
    fit (same fingerprint) interrupted after iteration `INTERRUPT_AT` (made with the
    Python API); and copies of that checkpoint damaged in each way of `DAMAGES`, with a
    garbled manifest, and with every state damaged, each resumed by the CLI command."""
    root = tmp_path_factory.mktemp("damage")
    data = write_array(root / "data.zarr", mixture(4000, 3, 3, seed=6), (250, 3))
    command = [
        "fit",
        data,
        "--n-components",
        "3",
        "--tol",
        "0",
        "--max-iter",
        str(DAMAGE_MAX_ITER),
        "--n-init",  # as the Python fit that made the interrupted checkpoint
        "1",
        *LOCAL,
    ]

    ckpt = root / "interrupted"
    real_save = Checkpoint.save

    def save(self: Checkpoint, state: FitState, n_passes: int) -> None:
        real_save(self, state, n_passes)
        if state.run(0) is not None and state.runs[0].n_iter == INTERRUPT_AT:
            raise Interrupted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpoint, "save", save)
        with pytest.raises(Interrupted):  # the CLI's settings: seed 0, tol 0
            GaussianMixture(
                3, tol=0.0, max_iter=DAMAGE_MAX_ITER, random_state=0, checkpoint_dir=ckpt
            ).fit(data)
    states = sorted(ckpt.glob("state-*"))
    assert len(states) == 3

    cases: dict[str, dict[str, object]] = {}
    commands = {"reference": [*command, "--output", root / "reference.zarr", "--quiet"]}
    for case in [*DAMAGES, "garbled manifest", "every state damaged"]:
        copy = root / case / "ckpt"
        shutil.copytree(ckpt, copy)
        if case in DAMAGES:
            damage, filename, _ = DAMAGES[case]
            damage(copy / states[-1].name / filename)
        elif case == "garbled manifest":
            garble(copy / "manifest.json")
        else:
            for state, (damage, filename, _) in zip(states, DAMAGES.values(), strict=False):
                damage(copy / state.name / filename)
        quiet = ["--quiet"] if case == "every state damaged" else []
        cases[case] = {"ckpt": copy, "model": root / case / "m.zarr", "before": snapshot(copy)}
        commands[case] = [
            *command,
            "--output",
            root / case / "m.zarr",
            "--checkpoint-dir",
            copy,
            *quiet,
        ]
    shutil.copytree(root / "garbled manifest" / "ckpt", root / "info")  # not being resumed
    commands["info"] = ["info", root / "info"]
    results = run_many(commands, max_workers=3)
    assert_ok(results["reference"])
    for case, c in cases.items():
        c["result"] = results[case]
        c["reference"] = root / "reference.zarr"
        c["newest"] = states[-1].name
        c["states"] = [state.name for state in states]
    cases["garbled manifest"]["info"] = results["info"]
    return cases


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_newest_state_resumes_from_the_previous_one(
    damaged: dict[str, dict[str, object]], case: str
) -> None:
    """The newest state is damaged on disk: the run says so on stderr, resumes from the
    state before it, and ends equal to the uninterrupted run."""
    c = damaged[case]
    result = c["result"]
    assert_ok(result)
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, result.stderr
    assert c["newest"] in warning[0] and DAMAGES[case][2] in warning[0]
    assert "older state" in warning[0]
    assert f"Resuming initialization 0 at iteration {INTERRUPT_AT - 1} " in result.stderr
    assert progress_iterations(result.stderr) == list(range(INTERRUPT_AT, DAMAGE_MAX_ITER + 1))
    assert_same_fit(load_model(c["model"]), load_model(c["reference"]))


def test_unreadable_manifest_falls_back_to_the_states(
    damaged: dict[str, dict[str, object]],
) -> None:
    """A garbled manifest.json: the states are found by scanning the directory (also by
    ``info``), the fit resumes from the newest one and ends equal to the uninterrupted
    run."""
    c = damaged["garbled manifest"]
    assert_ok(c["info"])
    info = json.loads(c["info"].stdout)
    assert info["n_iter"] == INTERRUPT_AT and info["done"] is False
    assert_ok(c["result"])
    assert f"Resuming initialization 0 at iteration {INTERRUPT_AT} " in c["result"].stderr
    assert_same_fit(load_model(c["model"]), load_model(c["reference"]))


def test_every_state_damaged_is_reported_in_one_line(damaged: dict[str, dict[str, object]]) -> None:
    """No intact state left: exit 2 with one line saying the checkpoint is damaged, naming
    each state, and how to start over; no model written, the checkpoint left as it was."""
    c = damaged["every state damaged"]
    assert_usage_error(c["result"], "damaged", "no intact state", "--restart", *c["states"])
    assert not Path(c["model"]).exists()
    assert snapshot(c["ckpt"]) == c["before"]
