"""`dask_em.checkpoint`: atomic saves, verified loads, fingerprints, damage and crashes.

Real files in ``tmp_path``; the crash test SIGKILLs a real process that is saving states
as fast as it can, at whatever instant the kill lands, and checks the previous complete
state is always readable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from cli_helpers import kill_group, wait_for

from dask_em.checkpoint import (
    KEEP_STATES,
    MANIFEST,
    Checkpoint,
    CheckpointDamaged,
    CheckpointMismatch,
    data_fingerprint,
    discard,
)
from dask_em.cli import OPTION_NAMES
from dask_em.em import EMResult, FitState
from dask_em.params import COVARIANCE_TYPES, GMMParams, covariance_shape

FINGERPRINT = {"data": {"shape": [100, 2], "content": "abc"}, "hyper_parameters": {"k": 2}}


def make_params(covariance_type: str, value: float, k: int = 3, d: int = 2) -> GMMParams:
    """Valid parameters whose means all equal ``value`` (to tell states apart)."""
    rng = np.random.default_rng(int(value * 1000) % 2**32)
    shape = covariance_shape(covariance_type, k, d)
    if covariance_type == "full":
        a = rng.normal(size=(k, d, d))
        cov = a @ np.swapaxes(a, 1, 2) + np.eye(d)
    elif covariance_type == "tied":
        a = rng.normal(size=(d, d))
        cov = a @ a.T + np.eye(d)
    else:
        cov = rng.uniform(0.5, 2.0, size=shape)
    weights = rng.dirichlet(np.ones(k))
    return GMMParams.from_covariances(weights, np.full((k, d), value), cov, covariance_type)


def make_state(n_iter: int, covariance_type: str = "full", **kw: object) -> FitState:
    """A state whose first run has done ``n_iter`` iterations (means equal to n_iter)."""
    run = EMResult(
        make_params(covariance_type, float(n_iter)),
        n_iter,
        False,
        -float(n_iter),
        [-float(i) for i in range(1, n_iter + 1)],
    )
    return FitState((11, 22), (run,), **kw)  # type: ignore[arg-type]


def assert_same_run(a: EMResult | None, b: EMResult | None) -> None:
    """Two runs are equal: parameters bit for bit, scalars and history."""
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        np.testing.assert_array_equal(getattr(a.params, name), getattr(b.params, name))
    assert a.params.covariance_type == b.params.covariance_type
    assert (a.n_iter, a.converged, a.lower_bound, a.lower_bounds, a.step_max) == (
        b.n_iter,
        b.converged,
        b.lower_bound,
        b.lower_bounds,
        b.step_max,
    )


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_save_then_load_returns_the_same_state(tmp_path: Path, covariance_type: str) -> None:
    """Every field of a `FitState` (each run, seeds, done) and n_passes survive."""
    best = EMResult(make_params(covariance_type, 7.5), 9, True, -1.25, [-3.0, -2.0, -1.25], 16.0)
    other = make_state(4, covariance_type).runs[0]
    state = FitState((5, 6, 7), (other, best, None), False)
    Checkpoint(tmp_path / "c", FINGERPRINT).save(state, n_passes=17)

    loaded = Checkpoint(tmp_path / "c", FINGERPRINT).load()
    assert loaded is not None
    assert loaded.state.seeds == (5, 6, 7) and loaded.state.done is False
    assert len(loaded.state.runs) == 3 and loaded.state.run(2) is None
    assert_same_run(loaded.state.run(0), other)
    assert_same_run(loaded.state.run(1), best)
    assert_same_run(loaded.state.best, best)
    assert loaded.n_passes == 17 and loaded.skipped == [] and loaded.fingerprint == FINGERPRINT


def test_a_state_without_runs_and_a_done_state_round_trip(tmp_path: Path) -> None:
    """No run (before the first initialization is done) and ``done`` survive."""
    ckpt = Checkpoint(tmp_path / "c", FINGERPRINT)
    ckpt.save(FitState((1,)), 0)
    loaded = ckpt.load()
    assert loaded is not None and loaded.state == FitState((1,))
    assert loaded.state.run(0) is None and loaded.state.best is None
    best = make_state(3).runs[0]
    ckpt.save(FitState((1,), (best,), done=True), 5)
    loaded = ckpt.load()
    assert loaded is not None and loaded.state.done
    assert_same_run(loaded.state.best, best)


def test_files_are_plain_json_and_npy_without_pickle(tmp_path: Path) -> None:
    """Nothing is pickled: every file is JSON or a numeric .npy loadable with
    ``allow_pickle=False``, and every array has a checksum in its state.json."""
    state = FitState((1, 2), (make_state(2).runs[0], make_state(1).runs[0]))
    Checkpoint(tmp_path / "c", FINGERPRINT).save(state, 3)
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    npy = [p for p in files if p.suffix == ".npy"]
    assert len(npy) == 8  # 4 arrays x 2 runs
    for p in files:
        if p.suffix == ".npy":
            assert np.load(p, allow_pickle=False).dtype == np.float64
        else:
            assert p.suffix == ".json"
            json.loads(p.read_text())
    meta = json.loads(next((tmp_path / "c").glob("state-*/state.json")).read_text())
    assert sorted(meta["files"]) == sorted(p.name for p in npy)


def test_only_the_newest_states_are_kept_and_no_temporaries(tmp_path: Path) -> None:
    """After many saves: `KEEP_STATES` state directories, listed newest first in the
    manifest, and no temporary file left; a new Checkpoint object continues the numbering."""
    for n in range(1, 8):
        Checkpoint(tmp_path / "c", FINGERPRINT).save(make_state(n), n)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    states = [f"state-{n:06d}" for n in range(8 - KEEP_STATES, 8)]
    assert names == sorted([MANIFEST, *states])
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["states"] == states[::-1]
    loaded = Checkpoint(tmp_path / "c", FINGERPRINT).load()
    assert loaded is not None and loaded.sequence == 7 and loaded.state.runs[0].n_iter == 7


# ------------------------------------------------------------------ fingerprints
def test_another_fingerprint_is_refused_naming_each_difference(tmp_path: Path) -> None:
    """A checkpoint of other data/settings raises `CheckpointMismatch` naming every
    differing key, also one present on one side only; nothing is changed."""
    Checkpoint(tmp_path / "c", FINGERPRINT).save(make_state(2), 2)
    before = {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    other = {
        "data": {"shape": [100, 3], "content": "abc"},
        "hyper_parameters": {"k": 2, "acceleration": None},
    }
    with pytest.raises(CheckpointMismatch) as err:
        Checkpoint(tmp_path / "c", other).load()
    message = str(err.value)
    assert "data.shape: [100, 2] in the checkpoint, [100, 3] now" in message
    assert "hyper_parameters.acceleration: absent in the checkpoint, None now" in message
    assert "content" not in message and "\n" not in message
    with pytest.raises(CheckpointMismatch, match="extra: absent in the checkpoint, 1 now"):
        Checkpoint(tmp_path / "c", {**FINGERPRINT, "extra": 1}).load()
    assert {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()} == before
    # inspection ignores the fingerprint
    assert Checkpoint(tmp_path / "c", other).load(check_fingerprint=False) is not None


def test_data_fingerprint_tells_datasets_apart() -> None:
    """Shape, dtype, row chunking and sampled content change the fingerprint; the same
    data chunked the same gives the same one."""
    X = np.random.default_rng(0).normal(size=(1000, 3))
    base = data_fingerprint(da.from_array(X, chunks=(100, 3)))
    assert base == data_fingerprint(da.from_array(X.copy(), chunks=(100, 3)))
    changed = X.copy()
    changed[300, 1] += 1e-9  # the first row of a chunk is sampled
    variants = {
        "content": da.from_array(changed, chunks=(100, 3)),
        "shape": da.from_array(X[:900], chunks=(100, 3)),
        "dtype": da.from_array(X.astype(np.float32), chunks=(100, 3)),
        "row_chunks": da.from_array(X, chunks=(125, 3)),
    }
    for key, Y in variants.items():
        found = data_fingerprint(Y)
        assert found[key] != base[key], key
    assert data_fingerprint(da.from_array(X, chunks=(100, 3)), da.ones(1000, chunks=100))[
        "sample_weight"
    ]


# ------------------------------------------------------------------ damage
def newest(directory: Path) -> Path:
    """The newest state directory of a checkpoint."""
    return max(directory.glob("state-*"))


def test_damaged_newest_state_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    """A truncated array of the newest state: the previous state is loaded and the
    reason is reported in ``skipped``."""
    ckpt = Checkpoint(tmp_path / "c", FINGERPRINT)
    for n in (1, 2, 3):
        ckpt.save(make_state(n), n)
    target = newest(tmp_path / "c") / "run0_weights.npy"
    target.write_bytes(target.read_bytes()[:-8])
    loaded = Checkpoint(tmp_path / "c", FINGERPRINT).load()
    assert loaded is not None and loaded.state.runs[0].n_iter == 2 and loaded.n_passes == 2
    assert loaded.skipped == ["state-000003: run0_weights.npy fails its checksum"]


def test_missing_array_file_and_missing_state_json_are_damage(tmp_path: Path) -> None:
    """A deleted array or state.json is damage too: both newer states are passed over."""
    ckpt = Checkpoint(tmp_path / "c", FINGERPRINT)
    for n in (1, 2, 3):
        ckpt.save(make_state(n), n)
    (tmp_path / "c" / "state-000003" / "run0_means.npy").unlink()
    (tmp_path / "c" / "state-000002" / "state.json").unlink()
    loaded = Checkpoint(tmp_path / "c", FINGERPRINT).load()
    assert loaded is not None and loaded.state.runs[0].n_iter == 1
    assert loaded.skipped == [
        "state-000003: run0_means.npy is missing",
        "state-000002: state.json is missing",
    ]


def test_no_intact_state_raises_checkpoint_damaged(tmp_path: Path) -> None:
    """Every committed state damaged: `CheckpointDamaged`, one line naming each state and
    how to start over."""
    ckpt = Checkpoint(tmp_path / "c", FINGERPRINT)
    for n in (1, 2, 3):
        ckpt.save(make_state(n), n)
    for state in (tmp_path / "c").glob("state-*"):
        (state / "state.json").write_text("{")
    with pytest.raises(CheckpointDamaged) as err:
        Checkpoint(tmp_path / "c", FINGERPRINT).load()
    message = str(err.value)
    assert "\n" not in message and "fit(..., restart=True)" in message
    assert "--restart" in err.value.render(OPTION_NAMES)  # as the CLI says it
    for n in (1, 2, 3):
        assert f"state-{n:06d}: state.json is unreadable" in message


@pytest.mark.parametrize("manifest", ["garbage", "missing", "wrong shape"])
def test_unreadable_manifest_falls_back_to_scanning_states(tmp_path: Path, manifest: str) -> None:
    """Without a readable manifest the newest intact state directory is used, and the
    next save writes a good manifest again."""
    ckpt = Checkpoint(tmp_path / "c", FINGERPRINT)
    for n in (1, 2, 3):
        ckpt.save(make_state(n), n)
    path = tmp_path / "c" / MANIFEST
    if manifest == "garbage":
        path.write_bytes(b"\x00\xff{not json")
    elif manifest == "missing":
        path.unlink()
    else:
        path.write_text(json.dumps({"states": "state-000003"}))
    loaded = Checkpoint(tmp_path / "c", FINGERPRINT).load()
    assert loaded is not None and loaded.state.runs[0].n_iter == 3
    Checkpoint(tmp_path / "c", FINGERPRINT).save(make_state(4), 4)
    states = ["state-000004", "state-000003", "state-000002"]
    assert json.loads(path.read_text())["states"] == states
    assert sorted(p.name for p in (tmp_path / "c").glob("state-*")) == states[::-1]


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    """A state of an unknown format version is refused, naming the version."""
    ckpt = Checkpoint(tmp_path / "c", FINGERPRINT)
    ckpt.save(make_state(1), 1)
    meta_path = newest(tmp_path / "c") / "state.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointDamaged, match="format version 99"):
        Checkpoint(tmp_path / "c", FINGERPRINT).load()


def test_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    """Missing or empty: nothing to resume (None). Holding other files: refused by load,
    and `discard` refuses to delete it; a checkpoint is discarded completely."""
    assert Checkpoint(tmp_path / "missing", FINGERPRINT).load() is None
    (tmp_path / "empty").mkdir()
    assert Checkpoint(tmp_path / "empty", FINGERPRINT).load() is None

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointDamaged, match="not a dask-em checkpoint"):
        Checkpoint(other, FINGERPRINT).load()
    with pytest.raises(CheckpointDamaged, match="notes.txt"):
        discard(other)
    assert (other / "notes.txt").read_text() == "keep me"

    ckpt = Checkpoint(tmp_path / "c", FINGERPRINT)
    for n in (1, 2):
        ckpt.save(make_state(n), n)
    (tmp_path / "c" / ".tmp-leftover").mkdir()
    discard(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []
    assert Checkpoint(tmp_path / "c", FINGERPRINT).load() is None


# ------------------------------------------------------------------ crashes
@pytest.mark.parametrize("leftover", ["temporary state", "uncommitted state", "manifest temp"])
def test_leftovers_of_a_crash_are_ignored_then_cleaned(tmp_path: Path, leftover: str) -> None:
    """What a crash between the steps of a save leaves (a half-written temporary state,
    a complete state the manifest does not list yet, a half-written manifest): load
    returns the last committed state and the next save removes the leftovers."""
    ckpt = Checkpoint(tmp_path / "c", FINGERPRINT)
    for n in (1, 2):
        ckpt.save(make_state(n), n)
    c = tmp_path / "c"
    if leftover == "temporary state":
        shutil.copytree(c / "state-000002", c / ".tmp-0123abcd")
        (c / ".tmp-0123abcd" / "run0_means.npy").write_bytes(b"\x93NUMPY")
    elif leftover == "uncommitted state":
        shutil.copytree(c / "state-000002", c / "state-000003")
    else:
        (c / f".{MANIFEST}.tmp-0123abcd").write_text('{"format": "dask-em-check')
    loaded = Checkpoint(c, FINGERPRINT).load()
    assert loaded is not None and loaded.sequence == 2

    Checkpoint(c, FINGERPRINT).save(make_state(3), 3)
    names = sorted(p.name for p in c.iterdir())
    assert not [n for n in names if n.startswith(".")]
    loaded = Checkpoint(c, FINGERPRINT).load()
    assert loaded is not None and loaded.state.runs[0].n_iter == 3 and loaded.skipped == []


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from dask_em.checkpoint import Checkpoint
    from dask_em.em import EMResult, FitState
    from dask_em.params import GMMParams

    ckpt = Checkpoint(sys.argv[1], {"writer": 1})
    cov = np.tile(np.eye(4), (3, 1, 1))
    n = 0
    while True:
        n += 1
        params = GMMParams(np.full(3, 1 / 3), np.full((3, 4), float(n)), cov, cov, "full")
        run = EMResult(params, n, False, -float(n), [-float(i) for i in range(1, n + 1)])
        ckpt.save(FitState((n,), (run,)), n)
    """
)


@pytest.mark.parametrize("target", [2, 9, 30])
def test_sigkill_at_any_instant_leaves_the_last_committed_state(
    tmp_path: Path, target: int
) -> None:
    """A process saving states back to back is SIGKILLed as soon as state ``target`` is
    committed (the kill lands in whatever phase of a save it is): the checkpoint still
    loads, with no damage reported, a consistent state at least that new, and the next
    save cleans what the killed save left."""
    c = tmp_path / "c"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(c)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def committed() -> int:
        """Number of the newest state the manifest lists (0 before the first commit)."""
        try:
            newest_name = json.loads((c / MANIFEST).read_text())["states"][0]
        except (OSError, ValueError, KeyError, IndexError):
            return 0
        return int(newest_name.split("-")[1])

    try:
        wait_for(lambda: writer.poll() is not None or committed() >= target, 60, "saves")
        assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
    finally:
        kill_group(writer)  # type: ignore[arg-type]

    loaded = Checkpoint(c, {"writer": 1}).load()
    assert loaded is not None and loaded.skipped == []
    run = loaded.state.run(0)
    assert run is not None and run.n_iter >= target
    assert loaded.sequence == run.n_iter == loaded.n_passes == loaded.state.seeds[0]
    np.testing.assert_array_equal(run.params.means, np.full((3, 4), float(run.n_iter)))
    assert run.lower_bounds == [-float(i) for i in range(1, run.n_iter + 1)]

    Checkpoint(c, {"writer": 1}).save(FitState((0,), (run,)), 0)
    assert not [p.name for p in c.iterdir() if p.name.startswith(".")]
    assert len(list(c.glob("state-*"))) == KEEP_STATES
