"""Helpers for the tests of the ``dask-em`` command, its checkpoints and its clusters.

Plain functions (no fixtures) shared by ``test_cli.py``, ``test_checkpoint.py``,
``test_resume.py`` and ``test_cli_cluster.py``:

- `run_cli` runs the real ``dask-em`` command in a subprocess (the console script
  installed next to ``sys.executable``, else ``python -m dask_em.cli``); `run_many` runs
  independent commands a few at a time; `start_cli` starts one in its own session;
- `assert_usage_error` checks the contract for bad input: exit status 2, exactly one
  line on stderr, no traceback;
- `write_array`/`mixture` write real Zarr stores of reproducible mixture rows;
- `snapshot` reads every file of a directory, to prove it was left untouched;
- `wait_for` polls a condition with a deadline (no bare sleeps as synchronization);
- `peek_checkpoint` reads a checkpoint that another process may be writing;
  `ended_or_reached` tells whether a fit has ended or committed some iterations,
  `wait_for_committed` waits until a running fit has committed some;
- `process_group_alive` tells whether any live process remains in a process group;
- `assert_same_fit` compares two fitted models (parameters and history);
- `start_in_session`/`start_external_cluster` start real ``dask scheduler``/``dask worker``
  processes (each in its own session) and kill them all on exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dask_em.checkpoint import Checkpoint, CheckpointDamaged, Loaded

LOCAL = ("--n-workers", "1", "--threads-per-worker", "2")
"""Options of a small, quick-starting local cluster for the command (2-core machines)."""

PARAMS = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def dask_em_command() -> list[str]:
    """The argv prefix of the real ``dask-em`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("dask-em")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "dask_em.cli"]


def dask_command() -> list[str]:
    """The argv prefix of Dask's ``dask`` command (scheduler, worker) of this environment."""
    script = Path(sys.executable).with_name("dask")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "dask"]


def run_cli(
    *args: object, timeout: float = 180, cwd: str | os.PathLike[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``dask-em ARGS`` to completion; return the process with text stdout/stderr."""
    return subprocess.run(
        [*dask_em_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def run_many(
    commands: dict[str, Sequence[object]], max_workers: int = 4
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run several independent ``dask-em`` commands, a few at a time (each is a separate
    process that mostly spends its time importing); return their results by key."""
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = {key: pool.submit(run_cli, *args) for key, args in commands.items()}
        return {key: future.result() for key, future in futures.items()}


def start_cli(*args: object, **popen: Any) -> subprocess.Popen[str]:
    """Start ``dask-em ARGS`` in a new session (its own process group, so the whole group,
    local cluster workers included, can be killed with ``os.killpg``)."""
    return subprocess.Popen(
        [*dask_em_command(), *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Assert the bad-input contract: status 2, one line on stderr naming ``fragments``,
    no traceback, nothing on stdout. Returns the line."""
    detail = f"status {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode == 2, detail
    assert "Traceback" not in result.stderr, detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), detail
    assert result.stdout == "", detail
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    """Assert exit status 0 (showing the streams otherwise)."""
    assert result.returncode == 0, (
        f"status {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    )


def mixture(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """``n`` rows of a random ``k``-component Gaussian mixture in ``d`` dimensions (float64)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(k, d))
    a = rng.normal(size=(k, d, d))
    chol = np.linalg.cholesky(a @ np.swapaxes(a, 1, 2) / d + 0.3 * np.eye(d))
    labels = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 5.0)))
    return means[labels] + np.einsum("nij,nj->ni", chol[labels], rng.standard_normal((n, d)))


def write_array(
    path: str | os.PathLike[str], X: np.ndarray, chunks: Sequence[int] | None = None
) -> str:
    """Write ``X`` to a new Zarr array at ``path`` (rows chunked by 100 unless ``chunks``)."""
    X = np.asarray(X)
    if chunks is None:
        chunks = (100,) + tuple(X.shape[1:])
    z = zarr.create_array(store=str(path), shape=X.shape, chunks=tuple(chunks), dtype=X.dtype)
    if X.size:
        z[...] = X
    return str(path)


def snapshot(root: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes); empty if ``root`` does not exist."""
    root = Path(root)
    if root.is_file():
        return {".": root.read_bytes()}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``condition()`` until it returns a truthy value; return it. Fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def peek_checkpoint(directory: str | os.PathLike[str]) -> Loaded | None:
    """The newest intact state of a checkpoint another process may be writing right now.

    A reader racing the writer's pruning can find a listed state gone; that is reported
    as None (nothing readable yet) and the caller polls again.
    """
    try:
        return Checkpoint(directory, {}).load(check_fingerprint=False)
    except (FileNotFoundError, CheckpointDamaged):
        return None


def current_iteration(loaded: Loaded | None) -> int:
    """Iterations done by the first initialization's run in a loaded state (-1 if none)."""
    if loaded is None or loaded.state.run(0) is None:
        return -1
    return loaded.state.runs[0].n_iter


def ended_or_reached(
    process: subprocess.Popen[str], directory: str | os.PathLike[str], n_iter: int
) -> bool:
    """Whether ``process`` has ended or the checkpoint it writes in ``directory`` holds at
    least ``n_iter`` iterations (`current_iteration`): the condition to wait for before
    killing a fit mid-run."""
    return process.poll() is not None or current_iteration(peek_checkpoint(directory)) >= n_iter


def wait_for_committed(
    process: subprocess.Popen[str],
    directory: str | os.PathLike[str],
    n_iter: int,
    timeout: float,
    hint: str = "",
) -> None:
    """Wait until the fit ``process`` has committed ``n_iter`` iterations to its checkpoint
    ``directory`` while still running (to be killed mid-fit next); fail if it ended first,
    with its stderr and ``hint`` (what to change) in the message."""
    wait_for(
        partial(ended_or_reached, process, directory, n_iter),
        timeout,
        f"{n_iter} committed iterations in {directory}",
    )
    if process.poll() is not None:
        stderr = process.stderr.read() if process.stderr else ""
        raise AssertionError(f"the fit ended before it could be killed{hint}\n{stderr}")


def process_group_alive(pgid: int) -> bool:
    """Whether a process that is not a zombie remains in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.exists():  # not Linux: signal 0 tells whether the group exists
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # fields after the parenthesized command: state ppid pgrp ...
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def kill_group(process: subprocess.Popen[str], timeout: float = 30) -> None:
    """SIGKILL the process group of ``process`` (started with `start_cli`) and wait until
    no process of it is left."""
    pgid = process.pid  # a session leader's process group id is its pid
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=timeout)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()
    wait_for(lambda: not process_group_alive(pgid), timeout, f"process group {pgid} to die")


def assert_same_fit(a: Any, b: Any, atol: float = 1e-12, redone_passes: bool = False) -> None:
    """Assert two fitted `GaussianMixture` have the same parameters (max abs difference
    <= ``atol``), the same ``n_iter_``, ``converged_``, ``n_passes_`` and an identical
    ``lower_bounds_`` history.

    With ``redone_passes``, ``a`` is a fit resumed after stops with several
    initializations: an initialization cut short by a stop is not resumable and is
    redone, so ``a.n_passes_`` may exceed ``b.n_passes_`` (never fall short of it)."""
    for name in PARAMS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        diff = float(np.max(np.abs(x - y)))
        assert diff <= atol, f"{name} differs by {diff:.3e}"
    assert a.n_iter_ == b.n_iter_
    assert a.converged_ == b.converged_
    assert a.lower_bounds_ == b.lower_bounds_
    if redone_passes:
        assert a.n_passes_ >= b.n_passes_, (a.n_passes_, b.n_passes_)
    else:
        assert a.n_passes_ == b.n_passes_, (a.n_passes_, b.n_passes_)


def start_in_session(args: list[str], log: Path) -> subprocess.Popen[str]:
    """Start a process in a new session (own process group) with output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
        )


@dataclass
class ExternalCluster:
    """A running ``dask scheduler`` and its ``dask worker`` processes.

    Attributes
    ----------
    scheduler_file : Path
        The file written by ``dask scheduler --scheduler-file``.
    address : str
        The scheduler's address.
    scheduler : subprocess.Popen
        The scheduler process (a session leader: `kill_group` kills it).
    workers : list of subprocess.Popen
        The worker processes (each a session leader, nanny and worker in one group).
    """

    scheduler_file: Path
    address: str
    scheduler: subprocess.Popen[str]
    workers: list[subprocess.Popen[str]] = field(default_factory=list)


def scheduler_address(
    scheduler: subprocess.Popen[str], scheduler_file: Path, log: Path, timeout: float = 60
) -> str:
    """The address a ``dask scheduler`` process writes to its scheduler file, once it has
    (fails with the scheduler's log if the process exits first)."""

    def address() -> str | None:
        if scheduler.poll() is not None:
            raise AssertionError(log.read_text())
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            return None

    return wait_for(address, timeout, f"the scheduler file {scheduler_file}")


@contextmanager
def start_external_cluster(
    root: Path,
    n_workers: int = 2,
    *,
    scheduler_options: Sequence[str] = (),
    options: Sequence[str] = (),
    security: Any = None,
) -> Iterator[ExternalCluster]:
    """``dask scheduler --host 127.0.0.1 --port 0 --scheduler-file F`` and ``n_workers``
    ``dask worker ADDRESS --nworkers 1 --nthreads 1`` processes, up and connected (logs
    and worker directories under ``root``). Every process is killed with its process
    group on exit (also those a test has killed already).

    ``scheduler_options`` go to the scheduler alone (``--protocol tls``), ``options`` to
    the scheduler and every worker (``--tls-ca-file``...); ``security`` (a
    ``distributed.Security``) is how the client waiting for the workers connects.
    """
    from distributed import Client

    root.mkdir(parents=True, exist_ok=True)
    scheduler_file = root / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)  # a previous cluster's, not this one's address
    processes: list[subprocess.Popen[str]] = []
    try:
        scheduler = start_in_session(
            [*dask_command(), "scheduler", *scheduler_options, "--host", "127.0.0.1",
             "--port", "0", "--scheduler-file", str(scheduler_file), "--no-dashboard", *options],
            root / "scheduler.log",
        )  # fmt: skip
        processes.append(scheduler)
        addr = scheduler_address(scheduler, scheduler_file, root / "scheduler.log")
        cluster = ExternalCluster(scheduler_file, addr, scheduler)
        for i in range(n_workers):
            worker = start_in_session(
                [*dask_command(), "worker", addr, "--nworkers", "1", "--nthreads", "1",
                 "--no-dashboard", "--local-directory", str(root / f"worker-{i}"), *options],
                root / f"worker-{i}.log",
            )  # fmt: skip
            processes.append(worker)
            cluster.workers.append(worker)
        with Client(addr, security=security, timeout="30s") as client:
            wait_for(
                lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == n_workers,
                90,
                f"{n_workers} workers to connect to {addr}",
            )
        yield cluster
    finally:
        for process in reversed(processes):
            kill_group(process)
