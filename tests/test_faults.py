"""Fault injection with real processes: each faulty fit is compared with a fault-free one.

- A worker process SIGKILLed while a pass runs (on a real multi-process cluster, with
  the data streamed or cached in worker memory): Dask recomputes the lost tasks and
  chunks on the other workers and the fit ends with the fault-free parameters, since the
  reduction order is fixed by chunk index, not by worker.
- The scheduler of an external cluster SIGKILLed mid-fit: ``dask-em fit`` fails with a
  one-line message (no traceback); the same command on a fresh cluster resumes from the
  checkpoint and ends equal to an uninterrupted run.
- ``dask-em fit`` SIGKILLed after every committed iteration and run again each time
  ends equal to a straight run.
- The graph of an iteration does not grow over a long fit (task count and pickled bytes).
- Chunks too large for the workers' memory limit fail at once with a one-line message
  suggesting smaller chunks, instead of a loop of worker restarts.
- Workers dying on a task (``KilledWorker``, as out of memory): one line suggesting
  smaller chunks or more memory, no traceback.
- ``dask-em predict`` SIGKILLed mid-write: the output path never shows a half-written
  array, an earlier output stays intact, and the next run cleans up and publishes.

Waits are on conditions (checkpoint progress, tasks processing on a worker), never on
fixed sleeps; every process a test starts is killed with its process group.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_same_fit,
    assert_usage_error,
    current_iteration,
    ended_or_reached,
    kill_group,
    mixture,
    peek_checkpoint,
    run_cli,
    snapshot,
    start_cli,
    start_external_cluster,
    wait_for,
    wait_for_committed,
    write_array,
)
from sklearn.exceptions import ConvergenceWarning
from test_graph import GraphRecorder, graph_keys, keys_calling

from dask_em import GaussianMixture, kernels, load_model
from dask_em.cluster import local_cluster


# ------------------------------------------------------------ a worker killed mid-pass
@pytest.fixture
def fresh_cluster() -> Iterator[Any]:
    """A Client on a new ``LocalCluster`` of 2 single-threaded worker processes (with
    nannies, which restart a killed worker), the default scheduler for one test; its own,
    so that killing its workers cannot disturb other tests."""
    from distributed import Client

    cluster = local_cluster(2, 1, silence_logs=logging.CRITICAL)
    try:
        with Client(cluster) as client:
            client.wait_for_workers(2)
            yield client
    finally:
        cluster.close()


def fit_gm(data: str, checkpoint_dir: Path | None = None, **options: Any) -> GaussianMixture:
    """A 3-component ``GaussianMixture`` fitted for exactly 25 iterations on the Zarr
    array ``data``, one task per store chunk (so that both workers get chunks)."""
    gm = GaussianMixture(
        3, tol=0, max_iter=25, random_state=0, checkpoint_dir=checkpoint_dir, **options
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gm.fit(da.from_zarr(data))


def busy_worker(client: Any) -> str | None:
    """Address of a worker that is processing tasks right now, or None."""
    busy = [w for w, keys in client.processing().items() if keys]
    return busy[0] if busy else None


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["streamed", "cached"])
def test_worker_killed_mid_pass_gives_the_fault_free_fit(
    fresh_cluster: Any, tmp_path: Path, cache: bool
) -> None:
    """SIGKILL a worker process while it runs tasks of a pass (after >= 2 committed
    iterations): the fit completes with the fault-free parameters (<= 1e-12) and history.
    With ``cache=True`` the killed worker held persisted chunks, which are recomputed
    elsewhere although their placement named it."""
    client = fresh_cluster
    data = write_array(tmp_path / "data.zarr", mixture(20_000, 4, 3, seed=21), (1000, 4))
    reference = fit_gm(data, cache=cache)  # 20 chunks, 10 on each worker when cached

    ckpt = tmp_path / "ckpt"
    with ThreadPoolExecutor(1) as pool:
        fitting = pool.submit(fit_gm, data, ckpt, cache=cache)
        wait_for(
            lambda: fitting.done() or current_iteration(peek_checkpoint(ckpt)) >= 2,
            180,
            "2 committed iterations",
        )
        victim = wait_for(lambda: fitting.done() or busy_worker(client), 60, "a busy worker")
        assert not fitting.done(), "the fit ended before a worker could be killed"
        held = client.has_what().get(victim, ())
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        killed_at = current_iteration(peek_checkpoint(ckpt))
        faulty = fitting.result(timeout=300)

    assert killed_at < 25
    assert victim not in client.scheduler_info(n_workers=-1)["workers"]
    if cache:
        assert held, "the killed worker held no persisted chunk"
    assert_same_fit(faulty, reference)


# ------------------------------------------------------------ the scheduler killed
@pytest.mark.slow
def test_scheduler_killed_fails_in_one_line_then_resumes_on_a_fresh_cluster(
    tmp_path: Path,
) -> None:
    """SIGKILL the scheduler of an external cluster after >= 3 committed iterations of a
    checkpointed ``dask-em fit --scheduler-file F``: the command exits non-zero with a
    one-line message and no traceback; the same command on a fresh scheduler and
    workers resumes and ends equal to an uninterrupted run."""
    max_iter = 25
    data = write_array(tmp_path / "data.zarr", mixture(40_000, 4, 3, seed=22), (2000, 4))
    common = ["fit", data, "--n-components", "3", "--tol", "0", "--max-iter", max_iter]
    reference = run_cli(*common, "--output", tmp_path / "reference.zarr", "--quiet", *LOCAL)
    assert_ok(reference)

    root, ckpt, model = tmp_path / "cluster", tmp_path / "ckpt", tmp_path / "model.zarr"
    command = [*common, "--output", model, "--checkpoint-dir", ckpt]
    command += ["--scheduler-file", root / "scheduler.json"]
    with start_external_cluster(root) as cluster:
        process = start_cli(*command)
        try:
            wait_for_committed(process, ckpt, 3, 180)
            kill_group(cluster.scheduler)
            process.wait(timeout=300)
            stderr = process.stderr.read()  # type: ignore[union-attr]
        finally:
            kill_group(process)
    assert process.returncode == 2, stderr  # as an unreachable scheduler
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("dask-em fit: error: "), stderr
    assert "scheduler" in errors[0], errors[0]
    killed_at = current_iteration(peek_checkpoint(ckpt))
    assert 3 <= killed_at < max_iter
    assert not model.exists()

    with start_external_cluster(root):
        resumed = run_cli(*command, timeout=300)
    assert_ok(resumed)
    assert re.search(rf"Resuming initialization 0 at iteration {killed_at}\b", resumed.stderr)
    assert_same_fit(load_model(model), load_model(tmp_path / "reference.zarr"), redone_passes=True)


# ------------------------------------------------------------ workers dying on a task
@pytest.mark.slow
def test_workers_dying_on_a_task_fail_in_one_line_suggesting_chunk_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An external cluster whose scheduler allows no task a second worker
    (``allowed-failures`` 0): SIGKILL the worker running a task of ``dask-em fit``, as
    the kernel's OOM killer would. distributed raises ``KilledWorker``; the command exits
    2 with one line that names the dead worker and suggests ``--chunk-rows`` and more
    memory, with no traceback."""
    from distributed import Client

    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES", "0")
    data = write_array(tmp_path / "data.zarr", mixture(800_000, 8, 3, seed=25), (200_000, 8))
    root, model = tmp_path / "cluster", tmp_path / "model.zarr"
    with start_external_cluster(root) as cluster:
        process = start_cli(
            "fit", data, "--n-components", "3", "--tol", "0", "--max-iter", "500",
            "--output", model, "--scheduler-file", cluster.scheduler_file,
        )  # fmt: skip
        try:
            with Client(scheduler_file=str(cluster.scheduler_file), timeout="30s") as client:
                for _ in range(20):  # until a kill lands while a task runs
                    victim = wait_for(
                        lambda: process.poll() is not None or busy_worker(client),
                        120,
                        "a busy worker",
                    )
                    if process.poll() is not None:
                        break
                    try:
                        pid = client.run(os.getpid, workers=[victim])[victim]
                    except Exception:  # it died meanwhile: look again
                        continue
                    os.kill(pid, signal.SIGKILL)
                    wait_for(
                        lambda: (
                            process.poll() is not None
                            or len(client.scheduler_info(n_workers=-1)["workers"]) == 2
                        ),
                        120,
                        "the nanny to restart the worker",
                    )
            process.wait(timeout=120)
            stderr = process.stderr.read()  # type: ignore[union-attr]
        finally:
            kill_group(process)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("dask-em fit: error: "), stderr
    for fragment in (
        "worker(s) died while running the same task",
        "--chunk-rows",
        "--memory-limit",
    ):
        assert fragment in errors[0], errors[0]
    assert not model.exists()


# ------------------------------------------------------------ killed after every iteration
@pytest.mark.slow
def test_fit_killed_after_every_iteration_ends_equal_to_a_straight_run(tmp_path: Path) -> None:
    """SIGKILL ``dask-em fit --checkpoint-dir`` (its whole process group) as soon as it
    commits a new iteration, rerun it, and so on until it finishes by itself: the model
    has the parameters and the lower-bound history of a straight run."""
    max_iter = 8
    data = write_array(tmp_path / "data.zarr", mixture(3000, 3, 3, seed=23), (300, 3))
    common = ["fit", data, "--n-components", "3", "--tol", "0", "--max-iter", max_iter, *LOCAL]
    straight = run_cli(*common, "--output", tmp_path / "straight.zarr", "--quiet")
    assert_ok(straight)

    ckpt, model = tmp_path / "ckpt", tmp_path / "model.zarr"
    command = [*common, "--output", model, "--checkpoint-dir", ckpt, "--quiet"]
    kills: list[int] = []
    for _ in range(max_iter + 2):
        before = current_iteration(peek_checkpoint(ckpt))
        process = start_cli(*command)
        try:
            wait_for(
                partial(ended_or_reached, process, ckpt, before + 1),
                180,
                f"an iteration after {before}",
            )
        finally:
            finished = process.poll() is not None
            kill_group(process)
        if finished:
            assert process.returncode == 0, process.stderr
            break
        kills.append(current_iteration(peek_checkpoint(ckpt)))
    else:
        raise AssertionError(f"not finished after kills at iterations {kills}")
    assert len(kills) >= max_iter // 2, kills  # most iterations were interrupted
    assert_same_fit(load_model(model), load_model(tmp_path / "straight.zarr"), redone_passes=True)


# ------------------------------------------------------------ the graph over a long fit
def test_iteration_graph_does_not_grow_over_100_iterations(
    mixture_zarr: Any, given_inits: Any
) -> None:
    """100 iterations (tol=0) on the threaded scheduler: one graph per iteration, each
    with one E-step task per chunk, the same number of tasks (fused ones counted inside)
    and the same pickled size up to a few percent, without growth."""
    recorder = GraphRecorder()
    gm = GaussianMixture(
        4, tol=0, max_iter=100, cache=False, **given_inits(mixture_zarr.X, 4, "full")
    )
    with dask.config.set(scheduler="threads"), recorder, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(mixture_zarr.dask())  # one task per store chunk
    assert gm.n_iter_ == gm.n_passes_ == len(recorder.graphs) == 100
    passes = recorder.graphs
    assert all(len(keys_calling(g, kernels.em_chunk)) == mixture_zarr.n_chunks for g in passes)
    tasks = [len(graph_keys(g)) for g in passes]
    assert set(tasks) == {tasks[0]}, tasks
    sizes = [len(pickle.dumps(g)) for g in passes]
    # sizes vary by a few bytes with the parameter values' pickles, without a trend
    assert max(sizes) <= 1.05 * min(sizes), (min(sizes), max(sizes))
    assert max(sizes[-10:]) <= 1.01 * max(sizes[:10]), (sizes[:10], sizes[-10:])


# ------------------------------------------------------------ chunks too large for workers
@pytest.mark.slow
def test_chunks_too_large_for_the_memory_limit_fail_fast_suggesting_chunk_rows(
    tmp_path: Path,
) -> None:
    """Tasks of ~38 MiB chunks (``--chunk-rows 600000``, 8 float64 features) on a worker
    with ``--memory-limit 100MiB``: exit 2 before any pass with one line naming the sizes
    and a smaller ``--chunk-rows``, instead of a loop of worker restarts."""
    data = write_array(tmp_path / "data.zarr", mixture(600_000, 8, 2, seed=24), (50_000, 8))
    result = run_cli(
        "fit",
        data,
        "--n-components",
        "2",
        "--output",
        tmp_path / "m.zarr",
        "--chunk-rows",
        "600000",
        "--n-workers",
        "1",
        "--threads-per-worker",
        "1",
        "--memory-limit",
        "100MiB",
        "--quiet",
    )
    line = assert_usage_error(result, "36.6 MiB", "100 MiB memory limit", "--chunk-rows")
    rows = int(line.split("--chunk-rows=")[1].split(",")[0].split()[0])
    assert 0 < rows * 8 * 8 * 3 <= 100 * 2**20 / 2
    assert not (tmp_path / "m.zarr").exists()


# ------------------------------------------------------------ predict output under a kill
def chunk_files(array_dir: Path) -> list[Path]:
    """The chunk files a Zarr v3 array has written so far (under ``c/``)."""
    return [p for p in (array_dir / "c").rglob("*") if p.is_file()] if array_dir.is_dir() else []


def kill_predict_mid_write(model: Path, data: str, out: Path) -> int:
    """Start ``dask-em predict --proba`` into ``out``, SIGKILL its process group once its
    temporary array holds a first chunk, and return how many chunks it had written."""
    process = start_cli(
        "predict", model, data, "--output", out, "--proba", "--chunk-rows", "20000",
        "--n-workers", "1", "--threads-per-worker", "1",
    )  # fmt: skip
    try:
        tmp = wait_for(
            lambda: next(
                (p for p in out.parent.glob(f".{out.name}.tmp-*") if chunk_files(p)), None
            ),
            timeout=120,
            what="the first chunk of the temporary output",
        )
    finally:
        kill_group(process)
    assert process.returncode == -signal.SIGKILL
    return len(chunk_files(tmp))


@pytest.mark.slow
def test_predict_killed_mid_write_never_leaves_a_complete_looking_output(tmp_path: Path) -> None:
    """``dask-em predict`` SIGKILLed while it writes (75 chunks of 20,000 rows): no
    ``OUT`` appears on a first write, and an earlier complete ``OUT`` is left byte for
    byte; the half-written array stays hidden under a temporary name, and the next
    ``predict`` removes it and publishes the complete output."""
    rows = mixture(1_500_000, 8, 3, seed=31)
    data = write_array(tmp_path / "data.zarr", rows, (100_000, 8))
    model = tmp_path / "model.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = GaussianMixture(3, max_iter=5, random_state=0).fit(rows[:20_000])
    gm.save(model)
    out = tmp_path / "proba.zarr"
    total = 1_500_000 // 20_000

    written = kill_predict_mid_write(model, data, out)
    assert 1 <= written < total  # killed mid-write
    assert not out.exists()
    assert len(list(tmp_path.glob(".proba.zarr.tmp-*"))) == 1

    assert_ok(run_cli("predict", model, data, "--output", out, "--proba", *LOCAL))
    assert list(tmp_path.glob(".proba.zarr*")) == []  # the leftover was removed
    expected = gm.predict_proba(rows)
    published = zarr.open_array(str(out), mode="r")[...]
    np.testing.assert_allclose(published, expected, rtol=1e-12, atol=1e-300)
    before = snapshot(out)

    written = kill_predict_mid_write(model, data, out)  # now replacing a complete output
    assert 1 <= written < total
    assert snapshot(out) == before
