"""Ingest speed and memory: Parquet dataset -> Zarr with dask-em against two other routes.

DuckDB writes a hive-partitioned Parquet dataset (``--rows`` x ``--columns`` float64
features, ``--partitions`` dates, a string column); then each route runs in its own
subprocess (so its peak RSS is its own) and the table gives seconds, rows/s, the RSS
after imports and the peak RSS:

- ``dask-em ingest``: `dask_em.ingest.ingest` reading the files with pyarrow;
- ``dask-em ingest --query``: the same through DuckDB (``SELECT … FROM source``);
- ``duckdb -> numpy``: DuckDB's own Parquet read into one in-memory NumPy array;
- ``duckdb -> numpy -> zarr``: that array then written to Zarr (same chunks, codecs);
- ``dask.dataframe -> to_zarr``: ``read_parquet`` → ``to_dask_array`` →
  ``compute_chunk_sizes`` → rechunk → ``to_zarr`` (``lengths=True`` fails on partitioned
  datasets, dask issue 12411).

Every route's stored rows are checked against dask-em's (column sums).

    python benchmarks/ingest.py                                  # 2M rows x 16, a few minutes
    python benchmarks/ingest.py --rows 20000000 --partitions 8   # the issue's size
    python benchmarks/ingest.py --small                          # seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROUTES = (
    "dask-em ingest",
    "dask-em ingest --query",
    "duckdb -> numpy",
    "duckdb -> numpy -> zarr",
    "dask.dataframe -> to_zarr",
)


def make_dataset(root: Path, rows: int, columns: int, partitions: int) -> float:
    """DuckDB writes the partitioned dataset; return seconds."""
    import duckdb

    features = ", ".join(f"random() * 10 + {j} AS c{j}" for j in range(columns))
    began = time.perf_counter()
    con = duckdb.connect()
    con.execute(
        f"""COPY (SELECT ('2026-11-' || lpad((i % {partitions} + 1)::VARCHAR, 2, '0')) AS dt,
                         {features}, 'row-' || i AS label
                  FROM range({rows}) t(i))
            TO '{root}' (FORMAT parquet, PARTITION_BY (dt))"""
    )
    con.close()
    return time.perf_counter() - began


def _rss_mib() -> float:
    """Peak RSS of this process so far, MiB (``VmHWM``: unlike ``ru_maxrss`` it does not
    carry the parent's peak across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_route(route: str, root: Path, out: Path, columns: int, chunk_rows: int) -> dict[str, Any]:
    """Run one route in this process; return rows, seconds, RSS and the column sums."""
    import numpy as np
    import zarr

    from dask_em.io import ARRAY_COMPRESSORS

    names = [f"c{j}" for j in range(columns)]
    if route.startswith("dask-em"):
        from dask_em.ingest import ingest
    elif route.startswith("duckdb"):
        import duckdb
    else:
        import dask.array as da
        import dask.dataframe as dd
    imported = _rss_mib()
    began = time.perf_counter()
    if route == "dask-em ingest":
        ingest(root, out, columns=names, chunk_rows=chunk_rows)
    elif route == "dask-em ingest --query":
        ingest(root, out, query=f"SELECT {', '.join(names)} FROM source", chunk_rows=chunk_rows)
    elif route.startswith("duckdb"):
        con = duckdb.connect()
        cols = con.sql(
            f"SELECT {', '.join(names)} FROM read_parquet('{root}/*/*.parquet')"
        ).fetchnumpy()
        X = np.empty((len(cols[names[0]]), columns))
        for j, name in enumerate(names):
            X[:, j] = cols.pop(name)
        if route.endswith("zarr"):
            z = zarr.create_array(
                store=str(out),
                shape=X.shape,
                chunks=(chunk_rows, columns),
                dtype=X.dtype,
                compressors=list(ARRAY_COMPRESSORS),
            )
            z[...] = X
    else:
        frame = dd.read_parquet(str(root), columns=names)
        X = frame.to_dask_array().compute_chunk_sizes()
        da.to_zarr(
            X.rechunk((chunk_rows, columns)).astype(np.float64),
            str(out),
            compressors=list(ARRAY_COMPRESSORS),
        )
    seconds = time.perf_counter() - began
    peak = _rss_mib()  # before the check below reads the stored rows
    if route == "duckdb -> numpy":
        sums, rows = X.sum(axis=0), X.shape[0]
    else:
        stored = zarr.open_array(str(out), mode="r")
        step = 1 << 18
        sums = sum(stored[i : i + step].sum(axis=0) for i in range(0, stored.shape[0], step))
        rows = stored.shape[0]
    return {
        "rows": int(rows),
        "seconds": seconds,
        "rss_imported_mib": imported,
        "peak_rss_mib": peak,
        "sums": np.asarray(sums).tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--columns", type=int, default=16)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--chunk-rows", type=int, default=65_536)
    parser.add_argument("--workdir", help="where the dataset and stores go (default: a temp dir)")
    parser.add_argument("--small", action="store_true", help="20,000 rows, for a quick check")
    parser.add_argument("--route", choices=ROUTES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.rows, args.chunk_rows = 20_000, 4_096
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dask-em-ingest-bench-"))
    root = work / "dataset"
    if args.route:  # a child: one route, JSON on stdout
        out = work / f"{ROUTES.index(args.route)}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        result = run_route(args.route, root, out, args.columns, args.chunk_rows)
        print(json.dumps(result))
        return 0
    try:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        made = make_dataset(root, args.rows, args.columns, args.partitions)
        size = sum(p.stat().st_size for p in root.rglob("*.parquet")) / 2**20
        print(
            f"dataset: {args.rows} rows x {args.columns} float64 columns + a string, "
            f"{args.partitions} partitions, {size:.0f} MiB of Parquet (written in {made:.1f} s); "
            f"chunks of {args.chunk_rows} rows"
        )
        print(f"{'route':<28}{'seconds':>9}{'rows/s':>13}{'RSS imported':>14}{'peak RSS':>10}")
        results = {}
        for route in ROUTES:
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--route",
                    route,
                    "--workdir",
                    str(work),
                    "--rows",
                    str(args.rows),
                    "--columns",
                    str(args.columns),
                    "--chunk-rows",
                    str(args.chunk_rows),
                ],
                capture_output=True,
                text=True,
            )
            if child.returncode != 0:
                print(f"{route:<28} failed: {child.stderr.strip().splitlines()[-1]}")
                continue
            r = results[route] = json.loads(child.stdout.strip().splitlines()[-1])
            print(
                f"{route:<28}{r['seconds']:>9.2f}{r['rows'] / r['seconds']:>13,.0f}"
                f"{r['rss_imported_mib']:>11.0f} MiB{r['peak_rss_mib']:>6.0f} MiB"
            )
        reference = results["dask-em ingest"]["sums"]
        for route, r in results.items():
            diff = max(
                abs(a - b) / max(abs(b), 1.0) for a, b in zip(r["sums"], reference, strict=True)
            )
            same = r["rows"] == args.rows and diff <= 1e-9
            print(f"  {route}: {r['rows']} rows, column sums {'agree' if same else 'DIFFER'}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
