"""Getting a Dask ``distributed.Client``: an embedded local cluster, an address, a scheduler
file, or workers started as SLURM jobs.

`connect` is a context manager that yields a client set as Dask's default scheduler
for the duration, so the library's ``compute`` calls run on it, and closes what it
started. Connection problems become one-line `dask_em.errors.ClusterError` messages, also
the loss of an external scheduler mid-work (`scheduler_loss_reported`) and workers
dying on a task (`killed_workers_reported`). `tls_security`
builds the ``distributed.Security`` of a TLS connection (``tls://`` addresses).
`slurm_cluster` and `connect_slurm` start the workers as SLURM jobs through
dask-jobqueue's ``SLURMCluster`` (the ``slurm`` extra; imported here only, when used).
`open_cluster` runs a block where `choose_cluster` says: ``'auto'`` picks Dask's threaded
scheduler in this process (`threads`) for data small against this machine's memory, and
the local cluster otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import CancelledError
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from dask_em.errors import ClusterError, ParameterError, invalid_parameter, stop_deferred

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
start keep their own settings (see the README's Clusters section). Small workers keep
less: see `worker_malloc_environ`."""

MALLOC_RETAINED_SHARE = 8
"""A worker keeps at most 1/8 of its memory limit as freed heap (and takes buffers up to
that size from the heap). Dask pauses a worker at 80% of its limit, and memory that
malloc keeps is not released by pausing: with 256 MiB kept, a 512 MiB worker that had
loaded the compiled kernel (numba, about 120 MiB) paused for good while writing a
20 GiB store."""


def worker_malloc_environ(memory_limit: float | None) -> dict[str, int]:
    """`WORKER_MALLOC_ENVIRON` for workers of ``memory_limit`` bytes each (None: unknown),
    each threshold at most ``memory_limit / MALLOC_RETAINED_SHARE``."""
    if not memory_limit:
        return dict(WORKER_MALLOC_ENVIRON)
    cap = int(memory_limit) // MALLOC_RETAINED_SHARE
    return {name: min(value, cap) for name, value in WORKER_MALLOC_ENVIRON.items()}


def local_cluster(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float | None = None,
    **kwargs: Any,
) -> Any:
    """A ``distributed.LocalCluster`` of worker processes with `worker_malloc_environ`.

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
    from dask.utils import parse_bytes
    from distributed import LocalCluster
    from distributed.system import MEMORY_LIMIT

    if memory_limit is None or memory_limit == "auto":  # as LocalCluster splits the machine
        limit = MEMORY_LIMIT / max(1, n_workers or os.cpu_count() or 1)
    else:
        limit = parse_bytes(memory_limit) if isinstance(memory_limit, str) else memory_limit
    malloc = {name: str(value) for name, value in worker_malloc_environ(limit).items()}
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **malloc}
    # A Nanny prefers this process's environment to its configuration, and writes its
    # settings into that environment when it spawns a worker: any cluster started here
    # before (Dask's default 64 KiB, or another limit's) would otherwise win.
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ": environ}),
        _environment(malloc),
    ):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            memory_limit=memory_limit if memory_limit is not None else "auto",
            processes=True,
            dashboard_address=kwargs.pop("dashboard_address", ":0"),
            **kwargs,
        )


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the duration, then restore what was there."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
        address = _scheduler_address(scheduler, scheduler_file)
        if address is None:
            raise ClusterError(
                f"{where!r} is not a Dask scheduler file (no 'address' in its JSON); pass the "
                "scheduler file that a running 'dask scheduler' wrote.",
                parameter="scheduler_file",
            )
        _check_protocol(address, where, security)
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
    with ExitStack() as started:
        # a stop by signal waits until the cluster is up and owned by this block, which
        # then closes it: one cut short mid-start could not be closed
        with stop_deferred():
            cluster = started.enter_context(
                local_cluster(
                    n_workers,
                    threads_per_worker,
                    memory_limit,
                    # A task's exception reaches the caller, which reports it once; the
                    # workers' "Compute Failed" ERROR logs would repeat it on stderr with
                    # a traceback.
                    silence_logs=logging.CRITICAL,
                )
            )
            client = started.enter_context(Client(cluster, set_as_default=True))
            started.enter_context(killed_workers_reported())
        try:
            client.register_plugin(_object_store_sessions())
        except OSError:
            # Only quiets the workers' exit; a worker lost meanwhile (seen under heavy
            # load with a small memory_limit) is reported by the computation itself.
            pass
        if not quiet:
            workers = len(cluster.workers)
            print(
                f"local Dask cluster: {workers} worker process(es), dashboard {client.dashboard_link}",
                file=sys.stderr,
                flush=True,
            )
        yield client


SLURM_JOB_OPTIONS = "{cores}, {memory}, {walltime}, {queue} and {job_extra_directives}"
"""The options of a SLURM worker job (parameters of `slurm_cluster`), as
`dask_em.errors.UserError` fields."""


def slurm_cluster(
    jobs: int = 1,
    *,
    cores: int | None = None,
    memory: str | None = None,
    walltime: str | None = None,
    queue: str | None = None,
    job_extra_directives: list[str] | None = None,
    **kwargs: Any,
) -> Any:
    """A dask-jobqueue ``SLURMCluster`` that has asked SLURM for ``jobs`` worker jobs.

    Options left as None take their value from the dask-jobqueue configuration
    (``jobqueue.slurm.*`` in ``~/.config/dask/jobqueue.yaml`` or ``$DASK_CONFIG``), then
    from dask-jobqueue's defaults. The job script is checked by ``sbatch`` in its test-only mode
    before any job is submitted, so options SLURM refuses fail at once.

    Parameters
    ----------
    jobs : int, default 1
        SLURM jobs to submit; each runs ``processes`` Dask workers (dask-jobqueue's
        default or configuration: about the square root of ``cores``).
    cores : int, optional
        CPU cores of each job (SLURM's cpus-per-task), shared by its workers.
    memory : str, optional
        Memory of each job, e.g. ``'4GiB'`` (SLURM's mem), shared by its workers.
    walltime : str, optional
        Time limit of each job, ``'HH:MM:SS'`` (``#SBATCH -t``).
    queue : str, optional
        SLURM partition (``#SBATCH -p``).
    job_extra_directives : list of str, optional
        More ``sbatch`` options, one per ``#SBATCH`` line, e.g. ``['-A proj']``;
        replaces the configuration's list.
    **kwargs
        Passed to ``SLURMCluster`` (e.g. ``processes``, ``interface``, ``log_directory``);
        ``scheduler_options`` are merged with the configured ones, and the dashboard
        takes a free port unless they name one.

    Returns
    -------
    dask_jobqueue.SLURMCluster

    Raises
    ------
    ClusterError
        If dask-jobqueue or ``sbatch`` is missing, or SLURM refuses the job script.
    ParameterError
        If ``jobs`` is not a positive integer, or ``cores`` or ``memory`` is neither
        given nor configured.
    """
    import dask

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise invalid_parameter("jobs", jobs, "use a positive integer")
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterError(
            "SLURM clusters need the dask-jobqueue package: pip install 'dask-em[slurm]'."
        ) from None
    if shutil.which("sbatch") is None:
        raise ClusterError(
            "no sbatch command here: start dask-em on a machine that submits SLURM jobs "
            "(a login node) with SLURM's commands on its PATH."
        )
    options = {
        "cores": cores,
        "memory": memory,
        "walltime": walltime,
        "queue": queue,
        "job_extra_directives": job_extra_directives,
    }
    options = {name: value for name, value in options.items() if value is not None}
    for name in ("cores", "memory"):
        if name not in options and dask.config.get(f"jobqueue.slurm.{name}", None) is None:
            raise ParameterError(
                "give the {cores} and {memory} of each SLURM job, or set them as "
                "jobqueue.slurm.cores and jobqueue.slurm.memory in a dask-jobqueue "
                "configuration file.",
                parameter=name,
            )
    # the dashboard on a free port (as the local cluster's) unless configured: a busy
    # 8787 would be a warning on stderr
    scheduler_options = {
        "dashboard_address": ":0",
        **dask.config.get("jobqueue.slurm.scheduler-options", {}),
        **kwargs.pop("scheduler_options", {}),
    }
    cluster = SLURMCluster(**options, scheduler_options=scheduler_options, **kwargs)
    try:
        _check_job_script(cluster.job_script())
        cluster.scale(jobs=jobs)
    except BaseException:
        cluster.close()
        raise
    return cluster


def _check_job_script(script: str) -> None:
    """Raise `ClusterError` with sbatch's words if SLURM would refuse ``script``."""
    result = subprocess.run(
        ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        said = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        raise ClusterError(
            f"SLURM refused the Dask worker job ({said or f'sbatch exit status {result.returncode}'}); "
            f"check {SLURM_JOB_OPTIONS}."
        )


def _slurm_jobs_queued(job_ids: list[str]) -> bool:
    """Whether SLURM still has one of ``job_ids`` pending or running (per ``squeue``)."""
    result = subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode == 0 and bool(result.stdout.strip())


SLURM_POLL_SECONDS = 2.0
"""How often `connect_slurm` checks, while no worker has connected, that its jobs are queued."""


def _wait_for_slurm_worker(cluster: Any, client: Any) -> None:
    """Return once a worker of ``cluster`` has connected to ``client``'s scheduler.

    Waits as long as SLURM keeps a job of the cluster pending or running (a busy queue
    can take hours); raises `ClusterError` if they all ended with no worker connected.
    """
    while True:
        try:
            client.wait_for_workers(1, timeout=SLURM_POLL_SECONDS)
            return
        except TimeoutError:
            pass
        job_ids = [job.job_id for job in cluster.workers.values() if job.job_id]
        if job_ids and not _slurm_jobs_queued(job_ids):
            raise ClusterError(
                f"the SLURM job(s) {', '.join(job_ids)} ended before their Dask worker "
                "connected; their output (slurm-JOBID.out in the working directory, or the "
                "log-directory of the dask-jobqueue configuration) says why."
            )


@contextmanager
def connect_slurm(jobs: int = 1, *, quiet: bool = False, **options: Any) -> Iterator[object]:
    """A ``distributed.Client`` on workers started as SLURM jobs, for the ``with`` block.

    The scheduler runs in this process; `slurm_cluster` submits the jobs. The block starts
    once a worker has connected, and the jobs are cancelled (``scancel``) when it ends.

    Parameters
    ----------
    jobs : int, default 1
        SLURM jobs to submit.
    quiet : bool
        Do not print the job ids and the dashboard address.
    **options
        The job options of `slurm_cluster` (``cores``, ``memory``, ``walltime``,
        ``queue``, ``job_extra_directives``...).

    Yields
    ------
    distributed.Client

    Raises
    ------
    ClusterError
        As `slurm_cluster`; also if every job ended before a worker connected, or if
        workers died on a task within the block (``KilledWorker``).
    ParameterError
        As `slurm_cluster`.
    """
    from distributed import Client

    cluster = slurm_cluster(jobs, **options)
    with cluster, Client(cluster, set_as_default=True) as client, killed_workers_reported():
        if not quiet:
            print(
                f"submitted {jobs} SLURM job(s) of Dask workers; waiting for one to connect",
                file=sys.stderr,
                flush=True,
            )
        _wait_for_slurm_worker(cluster, client)
        if not quiet:
            job_ids = ", ".join(job.job_id for job in cluster.workers.values() if job.job_id)
            print(
                f"SLURM cluster: job(s) {job_ids}, dashboard {client.dashboard_link}",
                file=sys.stderr,
                flush=True,
            )
        yield client


AUTO_THREADS_FRACTION = 0.25
"""``cluster='auto'`` runs in threads when the data takes less than this fraction of the
machine's memory (`choose_cluster`): its passes then cost less than starting worker
processes and sending them the data (``benchmarks/small_jobs.py``)."""

CLUSTER_KINDS = ("threads", "local", "scheduler", "slurm")
"""Where `open_cluster` runs the work: Dask's threaded scheduler in this process, an
embedded local cluster of worker processes, a running scheduler (address or file), or
workers started as SLURM jobs."""


@dataclass(frozen=True)
class ClusterChoice:
    """Where the work runs, and why (see `choose_cluster`).

    Attributes
    ----------
    kind : str
        One of `CLUSTER_KINDS`.
    reason : str
        Why, in one line (printed by `open_cluster` when ``'auto'`` chose).
    chosen : bool
        Whether ``'auto'`` chose by the size of the data (False when the arguments said).
    """

    kind: str
    reason: str
    chosen: bool = False


def machine_memory() -> int:
    """This machine's total memory, in bytes."""
    import psutil

    return int(psutil.virtual_memory().total)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def choose_cluster(
    cluster: str = "auto",
    nbytes: float | None = None,
    *,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    local_options: bool = False,
) -> ClusterChoice:
    """Where to run work on ``nbytes`` of data.

    ``'auto'`` picks a running scheduler when ``scheduler`` or ``scheduler_file`` is
    given, a local cluster when ``local_options`` (its shape was given), else Dask's
    threaded scheduler in this process when the data takes less than
    `AUTO_THREADS_FRACTION` of the machine's memory, and a local cluster otherwise
    (or when ``nbytes`` is unknown). Results are identical whichever runs them.

    Parameters
    ----------
    cluster : {'auto', 'local', 'threads', 'slurm'}, default 'auto'
    nbytes : float, optional
        Size of the data the work reads (e.g. ``X.nbytes``).
    scheduler, scheduler_file : optional
        A running scheduler's address or scheduler file (`connect`).
    local_options : bool
        Whether the local cluster's shape (``n_workers``...) was given.

    Returns
    -------
    ClusterChoice

    Raises
    ------
    ParameterError
        If ``cluster`` is not one of the above, or is ``'threads'`` or ``'slurm'`` with a
        ``scheduler``/``scheduler_file``.
    """
    if cluster not in ("auto", "local", "threads", "slurm"):
        raise invalid_parameter("cluster", cluster, "use 'auto', 'local', 'threads' or 'slurm'")
    external = scheduler is not None or scheduler_file is not None
    if external and cluster in ("threads", "slurm"):
        raise ParameterError(
            f"cluster={cluster!r} runs its own workers: drop {{scheduler}} and {{scheduler_file}}.",
            parameter="scheduler",
        )
    if cluster == "threads":
        return ClusterChoice("threads", "in-process threads")
    if cluster == "slurm":
        return ClusterChoice("slurm", "SLURM jobs")
    if external:
        where = scheduler if scheduler is not None else os.fspath(scheduler_file)  # type: ignore[arg-type]
        return ClusterChoice("scheduler", f"the Dask scheduler at {where}")
    if cluster == "local" or local_options:
        return ClusterChoice("local", "a local cluster of worker processes")
    memory = machine_memory()
    share = f"{AUTO_THREADS_FRACTION:.0%} of this machine's {_size(memory)} of memory"
    if nbytes is not None and nbytes < AUTO_THREADS_FRACTION * memory:
        return ClusterChoice(
            "threads", f"in-process threads: the data ({_size(nbytes)}) is under {share}", True
        )
    said = "of unknown size" if nbytes is None else f"({_size(nbytes)}) is not under {share}"
    return ClusterChoice("local", f"a local cluster: the data {said}", True)


@contextmanager
def threads() -> Iterator[None]:
    """Dask's threaded scheduler in this process for the ``with`` block, with BLAS limited
    to one thread per Dask thread (threadpoolctl), as the workers of a local cluster are.

    Yields
    ------
    None
    """
    import dask
    from threadpoolctl import threadpool_limits

    with dask.config.set(scheduler="threads"), threadpool_limits(limits=1):
        yield


@contextmanager
def open_cluster(
    cluster: str = "auto",
    nbytes: float | None = None,
    *,
    quiet: bool = False,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    security: Any = None,
    jobs: int = 1,
    **slurm_options: Any,
) -> Iterator[ClusterChoice]:
    """Run the ``with`` block where `choose_cluster` says: Dask's default scheduler is set
    to it for the block, and what was started is stopped at its end.

    Parameters
    ----------
    cluster : {'auto', 'local', 'threads', 'slurm'}, default 'auto'
    nbytes : float, optional
        Size of the data, for ``'auto'``.
    quiet : bool
        Print nothing (else: the choice of ``'auto'``, and what `connect` and
        `connect_slurm` print).
    scheduler, scheduler_file, n_workers, threads_per_worker, memory_limit, security
        As `connect`.
    jobs, **slurm_options
        As `connect_slurm` (``cluster='slurm'`` only).

    Yields
    ------
    ClusterChoice
        What was chosen.

    Raises
    ------
    ParameterError
        As `choose_cluster`; also if local-cluster options are given with ``'threads'``
        or ``'slurm'``.
    ClusterError
        As `connect` and `connect_slurm`.
    """
    # ``security`` without a scheduler goes to `connect`, which says what it is for
    given = (n_workers, threads_per_worker, memory_limit, security)
    local_options = any(v is not None for v in given)
    choice = choose_cluster(
        cluster,
        nbytes,
        scheduler=scheduler,
        scheduler_file=scheduler_file,
        local_options=local_options,
    )
    if choice.kind in ("threads", "slurm") and local_options:
        raise ParameterError(
            f"cluster={cluster!r} takes no {{memory_limit}} (nor n_workers, "
            "threads_per_worker or security): they shape a local cluster.",
            parameter="memory_limit",
        )
    if choice.chosen and not quiet:
        print(f"running on {choice.reason}", file=sys.stderr, flush=True)
    if choice.kind == "threads":
        with threads():
            yield choice
    elif choice.kind == "slurm":
        with connect_slurm(jobs, quiet=quiet, **slurm_options):
            yield choice
    else:
        with connect(
            scheduler,
            scheduler_file,
            n_workers,
            threads_per_worker,
            memory_limit,
            quiet=quiet,
            security=security,
        ):
            yield choice
