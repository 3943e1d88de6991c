"""Graceful stop: SIGTERM and SIGINT end a running ``dask-em`` command cleanly.

A batch system (SLURM, Kubernetes, Airflow) stops a job with SIGTERM before SIGKILL.
``dask-em fit`` then stops at once and:

- exits with status 143 (SIGTERM) or 130 (SIGINT);
- prints one line on stderr saying after which iteration it stopped and how to resume
  (or, without ``--checkpoint-dir``, that nothing was kept and how to make it resumable);
- keeps the last committed checkpoint (it loads) and removes its lock file;
- leaves no process of the embedded local cluster behind (its process group empties);
- and run again with the same command, resumes to exactly the uninterrupted result.

The signal goes to the ``dask-em`` process alone, as ``kill PID`` does, not to its
process group: the command itself must stop the workers it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import warnings
from pathlib import Path

import pytest
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_same_fit,
    current_iteration,
    kill_group,
    mixture,
    peek_checkpoint,
    process_group_alive,
    run_cli,
    start_cli,
    wait_for,
    wait_for_committed,
    write_array,
)
from sklearn.exceptions import ConvergenceWarning

from dask_em import GaussianMixture, load_model
from dask_em.checkpoint import LOCK
from dask_em.cli import stop_on_signals
from dask_em.errors import Interrupted, stop_deferred

MAX_ITER = 30
"""Iterations of the fits (tol=0 runs them all): long enough to be stopped mid-fit."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Zarr store of 100k rows of a 4-component mixture in 4 dimensions (chunks of
    10k rows): an iteration takes a noticeable fraction of a second."""
    root = tmp_path_factory.mktemp("signals")
    return write_array(root / "data.zarr", mixture(100_000, 4, 4, seed=5), (10_000, 4))


def fit_args(data: str, root: Path, *cluster: str) -> list[object]:
    """A ``dask-em fit`` of `MAX_ITER` iterations with one initialization (so passes
    compare with an uninterrupted run), checkpointed in ``root/ckpt``."""
    return [
        "fit", data, "--n-components", "4", "--tol", "0", "--max-iter", MAX_ITER,
        "--n-init", "1", "--seed", "3", "--output", root / "model.zarr",
        "--checkpoint-dir", root / "ckpt", "--quiet", *cluster,
    ]  # fmt: skip


def stop_after_committed(
    process: subprocess.Popen[str], ckpt: Path, signum: int
) -> tuple[int, str]:
    """Send ``signum`` to ``process`` alone once it has committed 2 iterations; return its
    exit status and stderr once it has ended, and check its process group is left empty."""
    try:
        wait_for_committed(process, ckpt, 2, timeout=120)
        os.kill(process.pid, signum)
        _, stderr = process.communicate(timeout=120)
    except BaseException:
        kill_group(process)
        raise
    pgid = process.pid  # the session leader's process group
    wait_for(lambda: not process_group_alive(pgid), 30, "the stopped command's workers to exit")
    return process.returncode, stderr


def assert_stopped_and_resumable(
    status: int, stderr: str, expected_status: int, name: str, ckpt: Path
) -> None:
    """The contract of a fit stopped by signal ``name``: its status, one line naming the
    iteration of the checkpoint it kept, the checkpoint intact and unlocked."""
    assert status == expected_status, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    kept = current_iteration(peek_checkpoint(ckpt))
    assert kept >= 2
    assert lines[0] == (
        f"dask-em fit: stopped by {name} after iteration {kept}; run the same command "
        f"again to resume from {ckpt}"
    )
    assert not (ckpt / LOCK).exists()


@pytest.fixture(scope="module")
def uninterrupted(data: str) -> GaussianMixture:
    """The straight fit that a stopped and resumed `fit_args` run must equal (tol=0: it
    does not converge, and says so)."""
    gm = GaussianMixture(4, tol=0, max_iter=MAX_ITER, n_init=1, random_state=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gm.fit(data)


def test_sigint_stops_a_threaded_fit_which_then_resumes_to_the_uninterrupted_result(
    data: str, uninterrupted: GaussianMixture, tmp_path: Path
) -> None:
    """SIGINT (Ctrl-C) to ``dask-em fit --cluster threads``: status 130, one line, the
    checkpoint kept and unlocked; the same command then resumes to the straight fit."""
    args = fit_args(data, tmp_path, "--cluster", "threads")
    status, stderr = stop_after_committed(start_cli(*args), tmp_path / "ckpt", signal.SIGINT)
    assert_stopped_and_resumable(status, stderr, 130, "SIGINT", tmp_path / "ckpt")
    assert_ok(run_cli(*args))
    assert_same_fit(load_model(tmp_path / "model.zarr"), uninterrupted)


@pytest.mark.slow
def test_sigterm_stops_a_local_cluster_fit_leaving_no_worker_and_it_resumes(
    data: str, uninterrupted: GaussianMixture, tmp_path: Path
) -> None:
    """SIGTERM to ``dask-em fit`` on its embedded local cluster (worker processes): status
    143, one line, the checkpoint kept and unlocked, no worker process left; the same
    command then resumes to the straight fit."""
    args = fit_args(data, tmp_path, *LOCAL)
    status, stderr = stop_after_committed(start_cli(*args), tmp_path / "ckpt", signal.SIGTERM)
    assert_stopped_and_resumable(status, stderr, 143, "SIGTERM", tmp_path / "ckpt")
    assert_ok(run_cli(*args))
    assert_same_fit(load_model(tmp_path / "model.zarr"), uninterrupted)


def test_sigterm_without_checkpoint_says_nothing_was_kept(data: str, tmp_path: Path) -> None:
    """Stopped without ``--checkpoint-dir``, the one line says that nothing was kept and
    how to make the next run resumable; no model is written."""
    process = start_cli(
        "fit", data, "--n-components", "4", "--tol", "0", "--max-iter", MAX_ITER,
        "--n-init", "1", "--output", tmp_path / "model.zarr", "--cluster", "threads",
    )  # fmt: skip
    try:
        assert process.stderr is not None
        for line in process.stderr:  # progress: wait for the fit's second iteration
            if line.startswith("iteration    2 "):
                break
        os.kill(process.pid, signal.SIGTERM)
        _, rest = process.communicate(timeout=120)
    except BaseException:
        kill_group(process)
        raise
    assert process.returncode == 143, rest
    last = [line for line in rest.splitlines() if not line.startswith("iteration")]
    assert last == [
        "dask-em fit: stopped by SIGTERM; nothing was kept (no --checkpoint-dir): give "
        "--checkpoint-dir DIR to make the next run resumable"
    ], rest
    assert not (tmp_path / "model.zarr").exists()


def test_a_stop_during_a_deferred_step_is_raised_when_the_step_ends() -> None:
    """A real SIGTERM to this process under the command's handlers: outside
    `stop_deferred` it raises `Interrupted` at once; inside, only when the block ends
    (the step, e.g. a cluster's start, is never cut short). The handlers are restored."""
    before = signal.getsignal(signal.SIGTERM)
    steps = []
    with pytest.raises(Interrupted) as stopped:
        with stop_on_signals():
            with stop_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs between these bytecodes
                    steps.append(1)
                steps.append("done")
    assert steps[-1] == "done" and stopped.value.signum == signal.SIGTERM
    assert stopped.value.name == "SIGTERM"
    with pytest.raises(Interrupted):
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
            raise AssertionError("not stopped at once")
    assert signal.getsignal(signal.SIGTERM) == before
