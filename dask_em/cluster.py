"""Getting a Dask ``distributed.Client``: an embedded local cluster, an address or a scheduler file.

`connect` is a context manager that yields a client set as Dask's default scheduler
for the duration, so the library's ``compute`` calls run on it, and closes what it
started. Connection problems become one-line `dask_em.errors.ClusterError` messages, also
the loss of an external scheduler mid-work (`scheduler_loss_reported`) and workers
dying on a task (`killed_workers_reported`). `tls_security`
builds the ``distributed.Security`` of a TLS connection (``tls://`` addresses).
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import sys
from collections.abc import Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from typing import Any

from dask_em.errors import ClusterError, ParameterError

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
    """Turn an error raised because ``client`` lost its scheduler into a `ClusterError`.

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
        raise ClusterError(
            f"lost the connection to the Dask scheduler at {where}; check that it is running "
            "and run the fit again (with {checkpoint_dir} it resumes from the last completed "
            "iteration)."
        ) from None


@contextmanager
def killed_workers_reported() -> Iterator[None]:
    """Turn distributed's ``KilledWorker`` into a one-line `ClusterError` with the usual fix.

    The scheduler raises it when every worker that ran one task died while running it
    (``distributed.scheduler.allowed-failures`` + 1 of them), which nearly always means
    the task made its worker run out of memory.
    """
    from distributed import KilledWorker

    try:
        yield
    except KilledWorker as err:
        raise ClusterError(
            f"{err.allowed_failures + 1} worker(s) died while running the same task (the "
            f"last one: {err.last_worker.address}); workers "
            "that die mid-task have usually run out of memory: use a smaller {chunk_rows} "
            "or give the workers more memory ({memory_limit}), then run again (with "
            "{checkpoint_dir} it resumes from the last completed iteration)."
        ) from None


TLS_FILES = "{ca_file}, {cert} and {key}"
"""The certificate files of a TLS connection (the parameters of `tls_security`), as
`dask_em.errors.UserError` fields."""


def tls_security(
    ca_file: str | os.PathLike[str],
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str] | None = None,
) -> Any:
    """A ``distributed.Security`` for a client of a TLS-only scheduler.

    Parameters
    ----------
    ca_file : str or path
        PEM file of the CA(s) that signed the scheduler's and workers' certificates.
    cert : str or path
        PEM file of this client's certificate (signed by a CA the scheduler trusts).
    key : str or path, optional
        PEM file of the certificate's private key; None when ``cert`` holds it too.

    Raises
    ------
    ClusterError
        If one of the files does not exist.
    """
    from distributed import Security

    for name, path in (("ca_file", ca_file), ("cert", cert), ("key", key)):
        if path is not None and not os.path.isfile(path):
            raise ClusterError(
                f"{{{name}}}: no such file {os.fspath(path)!r}; check the path.", parameter=name
            )
    return Security(
        tls_ca_file=os.fspath(ca_file),
        tls_client_cert=os.fspath(cert),
        tls_client_key=None if key is None else os.fspath(key),
        require_encryption=True,
    )


def _scheduler_address(
    scheduler: str | None, scheduler_file: str | os.PathLike[str] | None
) -> str | None:
    """The address given, or the one a readable scheduler file holds (None otherwise)."""
    if scheduler is not None:
        return scheduler
    try:
        with open(scheduler_file) as f:  # type: ignore[arg-type]
            address = json.load(f)["address"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return address if isinstance(address, str) else None


def _check_protocol(address: str | None, where: str, security: Any) -> None:
    """Refuse a TLS address without certificates, and certificates for a non-TLS address.

    distributed itself fails late on both (a ``TypeError`` about ``ssl_context``, a
    ``RuntimeError`` about required encryption) and leaves a half-made client behind.
    """
    if address is None:
        return
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if scheme == "tls" and security is None:
        raise ClusterError(
            f"the Dask scheduler at {where} uses TLS ({address}): give {TLS_FILES} "
            "(the CA that signed its certificate, and a client certificate and key)."
        )
    if scheme != "tls" and security is not None:
        raise ClusterError(
            f"{TLS_FILES} need a TLS scheduler, but {where} has the {scheme}:// address "
            f"{address}; give its tls:// address."
        )


def _ssl_error(err: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` among the causes and contexts of ``err``, if any."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return e
        todo += [e.__cause__, e.__context__]
    return None


_CLIENT_CERT_REJECTED = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED")
"""OpenSSL alerts a server sends when it refuses the client's certificate."""


def _connect_failure(err: BaseException, where: str, security: Any) -> str:
    """The one-line message for a failed connection to the scheduler at ``where``."""
    from distributed.comm.core import CommClosedError, FatalCommClosedError

    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    tls_error = _ssl_error(err)
    if tls_error is not None or isinstance(err, FatalCommClosedError):
        named = re.search(r"\[SSL: (\w+)\]", reason)
        detail = getattr(tls_error, "reason", None) or (named.group(1) if named else reason)
        closed = isinstance(tls_error, ssl.SSLEOFError) or "SSLEOFError" in reason
        client_cert = (
            "rejected the client certificate: {cert}/{key} must be a certificate "
            "and key signed by a CA the scheduler trusts."
        )
        if any(alert in detail for alert in _CLIENT_CERT_REJECTED):
            advice = f"the scheduler {client_cert}"
        elif closed and security is not None:
            # with TLS 1.3 the server checks the client's certificate after the client
            # has finished its side of the handshake; refusing it, the server may just
            # close the connection before its alert is read
            detail = "the scheduler closed the connection"
            advice = f"it does so when it {client_cert}"
        elif "CERTIFICATE_VERIFY_FAILED" in detail:
            advice = (
                "the scheduler's certificate was not accepted: {ca_file} must be the CA "
                "that signed it, and it must name the host in the address."
            )
        else:
            advice = (
                "the certificates are the likely cause: check that {ca_file} is the CA "
                "that signed the scheduler's certificate and that {cert}/{key} are a "
                "client certificate and key signed by a CA the scheduler trusts."
            )
        return (
            f"cannot connect to the Dask scheduler at {where}: the TLS handshake failed "
            f"({detail}); {advice}"
        )
    if security is None and isinstance(err, CommClosedError):
        return (
            f"cannot connect to the Dask scheduler at {where}: the scheduler closed the "
            f"connection ({reason}); it likely requires TLS: give its tls:// address with "
            f"{TLS_FILES}."
        )
    return (
        f"cannot connect to the Dask scheduler at {where}: {reason}; check the address "
        "and that the scheduler is running."
    )


def _object_store_sessions() -> Any:
    """A worker plugin closing a local worker's object-store sessions when it stops
    (`dask_em.store.close_sessions`), so its exit prints no aiohttp warnings."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class ObjectStoreSessions(WorkerPlugin):
        name = "dask-em-object-store-sessions"

        def teardown(self, worker: Any) -> None:
            from dask_em.store import close_sessions

            close_sessions()

    return ObjectStoreSessions()


@contextmanager
def connect(
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    quiet: bool = False,
    security: Any = None,
) -> Iterator[object]:
    """A ``distributed.Client`` for the duration of the ``with`` block.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler, e.g. ``tcp://10.0.0.5:8786``.
    scheduler_file : str or path, optional
        The JSON scheduler file a ``dask scheduler`` wrote.
    n_workers, threads_per_worker, memory_limit : optional
        Shape of the embedded local cluster (worker processes) started when neither
        ``scheduler`` nor ``scheduler_file`` is given. ``memory_limit`` is per worker,
        e.g. ``'2GiB'``. Defaults: one worker per core pair, Dask's memory split.
    quiet : bool
        Do not print the dashboard address of a started local cluster.
    security : distributed.Security, optional
        For a TLS scheduler (``tls://`` address), e.g. from `tls_security`; only with
        ``scheduler`` or ``scheduler_file``.

    Yields
    ------
    distributed.Client

    Raises
    ------
    ClusterError
        If the scheduler cannot be reached (also: TLS handshake failed, a TLS scheduler
        without ``security`` or the reverse) or the scheduler file is missing, or (external
        scheduler) if the connection to it is lost within the block, or if workers died
        on a task within the block (``KilledWorker``, usually out of memory). The logs
        of distributed's client (e.g. tracebacks of failed reconnections) are silenced
        then: the error says what happened, once.
    """
    from distributed import Client

    if scheduler is not None and scheduler_file is not None:
        raise ParameterError(
            "give either {scheduler} or {scheduler_file}, not both.", parameter="scheduler"
        )
    if scheduler_file is not None and not os.path.exists(scheduler_file):
        raise ClusterError(
            f"no such scheduler file: {os.fspath(scheduler_file)!r}; check the path.",
            parameter="scheduler_file",
        )
    if security is not None and scheduler is None and scheduler_file is None:
        raise ParameterError(
            "{security} is for a TLS scheduler: give its address as {scheduler}="
            "tls://HOST:PORT or a {scheduler_file}.",
            parameter="security",
        )
    if scheduler is not None or scheduler_file is not None:
        where = scheduler if scheduler is not None else os.fspath(scheduler_file)  # type: ignore[arg-type]
        _check_protocol(_scheduler_address(scheduler, scheduler_file), where, security)
        try:
            client = Client(
                address=scheduler,
                scheduler_file=None if scheduler_file is None else os.fspath(scheduler_file),
                timeout=CONNECT_TIMEOUT,
                set_as_default=True,
                security=security,
            )
        except (OSError, TimeoutError, ValueError) as err:
            raise ClusterError(_connect_failure(err, where, security)) from None
        with (
            silenced("distributed"),
            client,
            scheduler_loss_reported(client, where),
            killed_workers_reported(),
        ):
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
    with cluster, Client(cluster, set_as_default=True) as client, killed_workers_reported():
        client.register_plugin(_object_store_sessions())
        if not quiet:
            workers = len(cluster.workers)
            print(
                f"local Dask cluster: {workers} worker process(es), dashboard {client.dashboard_link}",
                file=sys.stderr,
                flush=True,
            )
        yield client
