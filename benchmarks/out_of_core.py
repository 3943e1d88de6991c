"""Out-of-core scaling: EM on Zarr data many times larger than the workers' memory.

Generates a mixture dataset into a Zarr store chunk by chunk (never in memory at once),
then fits it with dask-em streaming every pass from the store (``cache=False``) on a
local cluster whose workers have a small memory limit. During the fit a sampler thread
reads every worker's RSS; the report gives peak RSS per worker against its limit,
seconds per iteration, and whether any worker spilled to disk or paused.

With ``--cold`` the page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``,
root only) before every pass, so each pass reads the disk, and the same run measures
the disk itself: the store's chunk files read after a drop by 1, 2 and as many threads as
EM runs tasks at once (workers x threads per worker), a pass of the same graph that only
reads and decodes the chunks,
and, with the store then in the page cache, the same reads and an E-step pass warm.
EM's streaming rate is reported in bytes on disk per second and decoded bytes
(rows x features x 8) per second, and as a fraction of the disk's best read rate. Without
root the drops are skipped and said so (the numbers are then warm).

A worker with one thread reads a chunk, then computes on it: the disk idles while it
computes. With ``--threads-per-worker 2`` one task's read overlaps another's decoding
and E-step (the compiled kernel and Blosc release the GIL); two chunks in flight need
more than 512 MiB per worker (2 x 512 MiB workers of 2 threads paused at Dask's 80%
threshold and never resumed), hence 1 worker of 1 GiB for the same total limit.

    python benchmarks/out_of_core.py --rows 134000000 --memory-limit 512MiB  # 8 GiB vs 2 x 512 MiB
    python benchmarks/out_of_core.py --rows 336e6 --cold --workers 1 --threads-per-worker 2 \
        --memory-limit 1GiB --workdir DIR                                       # 20 GiB, cold
    python benchmarks/out_of_core.py --sweep 1e6,2e6,4e6,8e6,16e6,32e6        # time vs rows
    python benchmarks/out_of_core.py --small [--cold]                          # seconds

The store is written under --workdir (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dask_em import kernels
from dask_em.datasets import generate, true_params
from dask_em.em import EMResult, run_em
from dask_em.params import GMMParams
from dask_em.reduce import RowData
from dask_em.stats import SuffStats

READ_BUFFER = 4 * 2**20
"""Bytes per read call when reading chunk files (as ``dd bs=4M``)."""

WARM_BYTES = 2 * 2**30
"""Bytes of the store (on disk) that the warm passes of ``--cold`` read from the page cache."""

METADATA_FILES = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _spill_state(dask_worker: Any) -> dict[str, int]:
    data = dask_worker.data
    slow = getattr(data, "slow", None)
    return {
        "spilled_keys": len(slow) if slow is not None else 0,
        "paused": int(str(getattr(dask_worker, "status", "")).endswith("paused")),
    }


def _chunk_rows(X: np.ndarray, w: np.ndarray | None, index: int, start: int) -> int:
    """Rows of one chunk: a pass with this chunk function only reads and decodes."""
    return int(X.shape[0])


def drop_page_cache() -> bool:
    """Write dirty pages out and drop the page cache; False when not permitted (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def chunk_files(path: str) -> list[str]:
    """The chunk files of the Zarr array at ``path``, in chunk order (metadata left out)."""
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n not in METADATA_FILES]

    def order(file: str) -> tuple[int, ...]:
        parts = os.path.relpath(file, path).replace(".", "/").split("/")
        return tuple(int(p) for p in parts if p.isdigit())

    return sorted(files, key=order)


def _read_file(file: str, buffer: bytearray) -> int:
    with open(file, "rb", buffering=0) as f:
        total = 0
        while n := f.readinto(buffer):
            total += n
    return total


def read_files(files: list[str], threads: int) -> tuple[int, float]:
    """Read every file once with ``threads`` threads taking files in order; (bytes, seconds)."""
    local = threading.local()

    def read(file: str) -> int:
        if not hasattr(local, "buffer"):
            local.buffer = bytearray(READ_BUFFER)
        return _read_file(file, local.buffer)

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, files))
    return total, time.perf_counter() - began


@contextlib.contextmanager
def rss_sampled(client: Any) -> Iterator[dict[str, int]]:
    """Peak RSS of every worker (address -> bytes), sampled every 0.2 s inside the block."""
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for addr, rss in client.run(_rss).items():
                peaks[addr] = max(peaks.get(addr, 0), rss)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peaks
    finally:
        stop.set()
        sampler.join()


def write_data(
    path: str, rows: int, features: int, components: int, store_chunk_rows: int
) -> float:
    """Write the dataset (`dask_em.datasets.generate`, seed 0); return seconds."""
    began = time.perf_counter()
    generate(path, rows, features, components, 0, store_chunk_rows)
    return time.perf_counter() - began


def timed_pass(
    data: RowData, cold: bool, chunk_fn: Callable[..., Any], *args: Any
) -> tuple[Any, float]:
    """One pass of ``chunk_fn`` (after dropping the page cache if ``cold``); (result, seconds)."""
    if cold:
        drop_page_cache()
    began = time.perf_counter()
    result = data.map_reduce(chunk_fn, *args)
    return result, time.perf_counter() - began


def fit_streamed(
    client: Any, path: str, components: int, iters: int, cold: bool = False, tasks: int = 2
) -> dict[str, Any]:
    """Fit ``iters`` EM iterations streaming from ``path``, sampling worker RSS all along.

    With ``cold``, the page cache is dropped before every pass (the EM is the same), and
    the disk, a read-only pass and warm passes are measured too (see the module's doc);
    ``tasks`` is how many tasks run at once (the disk is also read by that many threads).
    """
    import dask.array as da

    data = RowData(da.from_zarr(path))  # cache=False: every pass reads the store
    X0 = data.read_rows(np.arange(min(100_000, data.shape[0])))
    truth = true_params(components, data.shape[1], 0)
    start = EMResult(
        truth.__class__.from_covariances(
            np.full(components, 1.0 / components), truth.means + 0.3, truth.covariances, "full"
        )
    )
    report: dict[str, Any] = {"rows": data.shape[0], "bytes": int(data.X.nbytes)}
    if cold:
        files = chunk_files(path)
        report["disk_threads"] = sorted({1, 2, tasks})
        for threads in report["disk_threads"]:
            report["page_cache_dropped"] = drop_page_cache()
            report["disk_bytes"], report[f"disk_read_seconds_{threads}"] = read_files(
                files, threads
            )
    pass_seconds: list[float] = []

    def e_step(params: GMMParams) -> SuffStats:
        stats, seconds = timed_pass(data, cold, kernels.em_chunk, params)
        pass_seconds.append(seconds)
        return stats  # type: ignore[no-any-return]

    with rss_sampled(client) as peaks:
        if cold:
            report["read_pass_seconds"] = timed_pass(data, True, _chunk_rows)[1]
        result = run_em(e_step, start, tol=0.0, max_iter=iters, reg_covar=1e-6)
        if cold:
            report.update(warm_passes(data, files, result.params))
    report.update(
        seconds_per_iter=float(np.median(pass_seconds)),
        seconds=pass_seconds,
        peak_rss=peaks,
        spill=client.run(_spill_state),
        lower_bound=result.lower_bound,
        check_loglik_first_rows=float(np.mean(kernels.score_samples_block(X0, result.params))),
    )
    return report


def warm_passes(data: RowData, files: list[str], params: GMMParams) -> dict[str, Any]:
    """The same reads and passes from the page cache, over the leading chunks that fit in
    `WARM_BYTES` (read once untimed to load them): what the disk costs a cold pass."""
    sizes = np.cumsum([os.path.getsize(f) for f in files])
    n = max(1, int(np.searchsorted(sizes, WARM_BYTES, side="right")))
    rows = int(np.sum(data.X.chunks[0][:n]))
    part = RowData(data.X[:rows])
    read_files(files[:n], 2)
    return {
        "warm_disk_bytes": int(sizes[n - 1]),
        "warm_bytes": int(part.X.nbytes),
        "cached_read_seconds_2": read_files(files[:n], 2)[1],
        "warm_read_pass_seconds": timed_pass(part, False, _chunk_rows)[1],
        "warm_em_pass_seconds": timed_pass(part, False, kernels.em_chunk, params)[1],
    }


def cold_table(report: dict[str, Any]) -> str:
    """The cold-disk lines of one run: each read's rate on disk and decoded, vs the disk."""
    disk, decoded = report["disk_bytes"], report["bytes"]
    threads = report["disk_threads"]
    disk_rate = max(disk / report[f"disk_read_seconds_{t}"] for t in threads)
    warm = (report["warm_disk_bytes"], report["warm_bytes"])
    share = f"first {warm[1] / report['bytes']:.0%}"
    rows = [
        (
            f"disk: chunk files, {t} thread{'s' * (t > 1)}, cold",
            report[f"disk_read_seconds_{t}"],
            disk,
            None,
        )
        for t in threads
    ]
    rows += [
        ("read+decode pass (no E-step), cold", report["read_pass_seconds"], disk, decoded),
        (
            f"EM pass, cold (median of {len(report['seconds'])})",
            report["seconds_per_iter"],
            disk,
            decoded,
        ),
        (
            f"page cache: chunk files, 2 threads ({share})",
            report["cached_read_seconds_2"],
            *warm[:1],
            None,
        ),
        (f"read+decode pass, warm ({share})", report["warm_read_pass_seconds"], *warm),
        (f"EM pass, warm ({share})", report["warm_em_pass_seconds"], *warm),
    ]
    lines = [
        f"{'':50s} {'seconds':>8s} {'MB/s on disk':>13s} {'MB/s decoded':>13s} {'vs disk':>8s}"
    ]
    for name, seconds, on_disk, decodes in rows:
        lines.append(
            f"{name:50s} {seconds:8.2f} {on_disk / seconds / 1e6:13.0f} "
            f"{(f'{decodes / seconds / 1e6:.0f}' if decodes else '-'):>13s} "
            f"{on_disk / seconds / disk_rate:8.0%}"
        )
    if not report["page_cache_dropped"]:
        lines.append("page cache NOT dropped (needs root): the cold rows above read the cache")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=float, default=134_000_000, help="rows of the big run (8 features)"
    )
    parser.add_argument("--sweep", help="comma list of row counts instead of one big run")
    parser.add_argument("--small", action="store_true")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every pass; measure the disk",
    )
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--components", type=int, default=5)
    parser.add_argument("--store-chunk-rows", type=int, default=250_000)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--threads-per-worker", type=int, default=1, help="2 overlaps reads with compute"
    )
    parser.add_argument("--memory-limit", default="512MiB", help="per worker")
    parser.add_argument("--workdir", help="where to write the stores (kept)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sweep.split(",")] if args.sweep else [int(args.rows)]
    if args.small:
        sizes, args.store_chunk_rows, args.iters = [200_000], 50_000, 2

    from dask.utils import parse_bytes
    from distributed import Client

    from dask_em.cluster import local_cluster

    limit = parse_bytes(args.memory_limit)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dask-em-ooc-")
    reports = []
    try:
        with (
            local_cluster(args.workers, args.threads_per_worker, args.memory_limit) as cluster,
            Client(cluster) as client,
        ):
            for rows in sizes:
                path = os.path.join(workdir, f"rows-{rows}.zarr")
                gen = (
                    write_data(path, rows, args.features, args.components, args.store_chunk_rows)
                    if not os.path.exists(path)
                    else 0.0
                )
                report = fit_streamed(
                    client,
                    path,
                    args.components,
                    args.iters,
                    args.cold,
                    args.workers * args.threads_per_worker,
                )
                report["generate_seconds"] = gen
                reports.append(report)
                peak = max(report["peak_rss"].values())
                spilled = sum(s["spilled_keys"] for s in report["spill"].values())
                print(
                    f"rows {rows:>11,}  data {report['bytes'] / 2**30:7.2f} GiB "
                    f"({report['bytes'] / (limit * args.workers):6.1f}x the workers' total limit)  "
                    f"{report['seconds_per_iter']:8.2f} s/iter  {report['seconds_per_iter'] / rows * 1e9:6.1f} ns/row  "
                    f"peak worker RSS {peak / 2**20:6.0f} MiB of {limit / 2**20:.0f} MiB  spilled keys {spilled}",
                    flush=True,
                )
                if args.cold:
                    print(
                        f"store {report['disk_bytes'] / 2**30:.2f} GiB on disk "
                        f"({report['disk_bytes'] / report['bytes']:.0%} of decoded), "
                        f"generated in {gen:.0f} s\n{cold_table(report)}",
                        flush=True,
                    )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "memory_limit": limit,
                    "workers": args.workers,
                    "threads_per_worker": args.threads_per_worker,
                    "runs": reports,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
