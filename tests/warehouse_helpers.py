"""A small warehouse for the ingest tests: hive-partitioned Parquet written by DuckDB.

`write_date` writes one date's partition (float and integer features, NULLs in two of
them, a string column); `duckdb_rows` is the oracle, DuckDB's own reading of the
feature rows. The ``warehouse`` fixture (conftest.py) holds the first three dates.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

DATES = ("2026-11-20", "2026-11-21", "2026-11-22", "2026-11-23")
ROWS = (611, 702, 577, 455)
FEATURES = ["f1", "i1", "f2", "i2"]


def write_date(root: Path, day: int, seed: int | None = None) -> None:
    """DuckDB writes ``root/dt=DATE/data_0.parquet``: float and integer features (f2 and
    i2 with NULLs), a string column; ``seed`` other than the day's gives changed data."""
    rng = np.random.default_rng(day if seed is None else seed)
    n = ROWS[day]
    centers = rng.normal(scale=4.0, size=(3, 4))[rng.integers(0, 3, n)]
    x = centers + rng.normal(size=(n, 4))
    table = {
        "row": np.arange(n),
        "f1": x[:, 0],
        "i1": np.round(10 * x[:, 1]).astype(np.int32),
        "f2": x[:, 2],
        "i2": np.round(10 * x[:, 3]).astype(np.int64),
        "s": np.array([f"id-{day}-{i}" for i in range(n)]),
    }
    arrow = pa.table(table)  # noqa: F841  (read by DuckDB's replacement scan)
    target = root / f"dt={DATES[day]}"
    target.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET threads = 1")
    con.execute(
        f"""COPY (SELECT f1, i1,
                   CASE WHEN row % 13 = 5 THEN NULL ELSE f2 END AS f2,
                   CASE WHEN row % 17 = 3 THEN NULL ELSE i2 END AS i2, s
                 FROM arrow ORDER BY row)
            TO '{target / "data_0.parquet"}' (FORMAT parquet)"""
    )
    con.close()


def duckdb_rows(root: Path, where: str = "TRUE") -> np.ndarray:
    """The feature rows DuckDB reads from the dataset, NULL rows dropped, in partition,
    file and row order, as float64."""
    con = duckdb.connect()
    cols = con.sql(
        f"""SELECT {", ".join(FEATURES)} FROM read_parquet('{root}/*/*.parquet',
                 hive_partitioning = true, filename = true, file_row_number = true)
            WHERE {" AND ".join(f"{c} IS NOT NULL" for c in FEATURES)} AND ({where})
            ORDER BY dt, filename, file_row_number"""
    ).fetchnumpy()
    con.close()
    return np.column_stack([np.asarray(cols[c], dtype=np.float64) for c in FEATURES])
