"""Getting a Dask ``distributed.Client``: an embedded local cluster, an address or a scheduler file.

`connect` is a context manager that yields a client set as Dask's default scheduler
for the duration, so the library's ``compute`` calls run on it, and closes what it
started. Connection problems become one-line `dask_em.errors.DataError` messages, also
the loss of an external scheduler mid-work (`scheduler_loss_reported`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from typing import Any

from dask_em.errors import DataError

CONNECT_TIMEOUT = "20s"

WORKER_MALLOC_ENVIRON = {
    "MALLOC_MMAP_THRESHOLD_": 128 * 2**20,
    "MALLOC_TRIM_THRESHOLD_": 256 * 2**20,
}
"""glibc settings for the worker processes of the embedded local cluster.

Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so freed memory goes back to
the system at once. Then every chunk read from Zarr on every pass (tens of MB) lands on
fresh pages, and the page faults cost more than decoding: streaming shape A
(``benchmarks/peers.py``) took 1.5x the cached time. Buffers of up to 128 MiB from the
heap, and up to 256 MiB of freed heap kept per process, let the next pass reuse the
same pages (streaming 1.1x cached); a worker's memory stays bounded by its largest
working set, as the out-of-core benchmark checks. Workers of a cluster dask-em does not
start keep their own settings (see the README's Clusters section)."""


def local_cluster(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float | None = None,
    **kwargs: Any,
) -> Any:
    """A ``distributed.LocalCluster`` of worker processes with `WORKER_MALLOC_ENVIRON`.

    Parameters
    ----------
    n_workers, threads_per_worker : int, optional
        Dask's defaults when None.
    memory_limit : str or float, optional
        Per worker, e.g. ``'2GiB'``; Dask's split of the machine's memory when None.
    **kwargs
        Passed to ``LocalCluster``.
    """
    import dask
    from distributed import LocalCluster

    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_MALLOC_ENVIRON}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            memory_limit=memory_limit if memory_limit is not None else "auto",
            processes=True,
            dashboard_address=kwargs.pop("dashboard_address", ":0"),
            **kwargs,
        )


@contextmanager
def silenced(package: str) -> Iterator[None]:
    """Raise the level of ``package``'s loggers to CRITICAL for the duration.

    All existing loggers of the package, not only its root: distributed configures
    levels on some of its sub-loggers (``distributed.client``...). Levels are restored
    afterwards.
    """
    names = [package] + [
        name for name in logging.root.manager.loggerDict if name.startswith(package + ".")
    ]
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


@contextmanager
def scheduler_loss_reported(client: Any, where: str) -> Iterator[None]:
    """Turn an error raised because ``client`` lost its scheduler into a `DataError`.

    A scheduler that dies mid-work cancels the client's futures
    (``FutureCancelledError``, reason ``scheduler-connection-lost``) or leaves the client
    reconnecting or closed when the next call fails; any other error passes unchanged.
    """
    try:
        yield
    except Exception as err:
        lost = isinstance(err, CancelledError) and (
            getattr(err, "reason", None) == "scheduler-connection-lost"
        )
        if not lost and client.status == "running":
            raise
        raise DataError(
            f"lost the connection to the Dask scheduler at {where}; check that it is running "
            "and rerun the command (with --checkpoint-dir it resumes from the last completed "
            "iteration)."
        ) from None


@contextmanager
def connect(
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    quiet: bool = False,
) -> Iterator[object]:
    """A ``distributed.Client`` for the duration of the ``with`` block.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler, e.g. ``tcp://10.0.0.5:8786``.
    scheduler_file : str or path, optional
        JSON file written by ``dask scheduler --scheduler-file``.
    n_workers, threads_per_worker, memory_limit : optional
        Shape of the embedded local cluster (worker processes) started when neither
        ``scheduler`` nor ``scheduler_file`` is given. ``memory_limit`` is per worker,
        e.g. ``'2GiB'``. Defaults: one worker per core pair, Dask's memory split.
    quiet : bool
        Do not print the dashboard address of a started local cluster.

    Yields
    ------
    distributed.Client

    Raises
    ------
    DataError
        If the scheduler cannot be reached or the scheduler file is missing, or (external
        scheduler) if the connection to it is lost within the block. The logs of
        distributed's client (e.g. tracebacks of failed reconnections) are silenced
        then: the error says what happened, once.
    """
    from distributed import Client

    if scheduler is not None and scheduler_file is not None:
        raise DataError("give either --scheduler or --scheduler-file, not both.")
    if scheduler_file is not None and not os.path.exists(scheduler_file):
        raise DataError(f"no such scheduler file: {os.fspath(scheduler_file)!r}; check the path.")
    if scheduler is not None or scheduler_file is not None:
        where = scheduler if scheduler is not None else os.fspath(scheduler_file)  # type: ignore[arg-type]
        try:
            client = Client(
                address=scheduler,
                scheduler_file=None if scheduler_file is None else os.fspath(scheduler_file),
                timeout=CONNECT_TIMEOUT,
                set_as_default=True,
            )
        except (OSError, TimeoutError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(
                f"cannot connect to the Dask scheduler at {where}: {reason}; check the address "
                "and that the scheduler is running."
            ) from None
        with silenced("distributed"), client, scheduler_loss_reported(client, where):
            yield client
        return
    cluster = local_cluster(
        n_workers,
        threads_per_worker,
        memory_limit,
        # A task's exception reaches the caller, which reports it once; the workers'
        # "Compute Failed" ERROR logs would repeat it on stderr with a traceback.
        silence_logs=logging.CRITICAL,
    )
    with cluster, Client(cluster, set_as_default=True) as client:
        if not quiet:
            workers = len(cluster.workers)
            print(
                f"local Dask cluster: {workers} worker process(es), dashboard {client.dashboard_link}",
                file=sys.stderr,
                flush=True,
            )
        yield client
