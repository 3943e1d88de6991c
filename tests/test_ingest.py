"""`dask_em.ingest`: Parquet datasets written by DuckDB into Zarr stores, on real files.

The oracle for the rows is DuckDB itself: the same columns read back from the same
Parquet files (partition, file and row order) with the NULL rows dropped. Appends are
checked byte for byte against a fresh ingest, and killed appends (SIGKILL of a real
subprocess before each of its renames into the store) against the store before them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pytest
import zarr
from cli_helpers import snapshot
from warehouse_helpers import DATES, FEATURES, ROWS, duckdb_rows, write_date

from dask_em import GaussianMixture
from dask_em.errors import DataError, OutputError, ParameterError
from dask_em.ingest import ATTRIBUTE, ingest
from dask_em.io import open_array

CHUNK = 128


def stored(out: Path) -> tuple[np.ndarray, dict]:
    """What a reader sees: the committed rows and the attributes."""
    array = zarr.open_array(str(out), mode="r")
    return array[...], array.attrs.asdict()


def test_drop_stores_exactly_the_rows_duckdb_returns_without_nulls(
    warehouse: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data.zarr"
    summary = ingest(warehouse, out, missing="drop", chunk_rows=CHUNK)
    expected = duckdb_rows(warehouse)
    X = open_array(out).compute()
    assert X.dtype == np.float64 and np.array_equal(X, expected)
    record = zarr.open_array(str(out)).attrs[ATTRIBUTE]
    assert record["columns"] == FEATURES  # the string column is not a feature
    assert [p["name"] for p in record["partitions"]] == [f"dt={d}" for d in DATES[:3]]
    stops = np.cumsum([p["rows"] for p in record["partitions"]])
    assert [p["row_stop"] for p in record["partitions"]] == stops.tolist()
    assert summary["rows_dropped"] == sum(ROWS[:3]) - len(expected) > 0
    assert summary["n_samples"] == len(expected)


def test_fit_on_the_ingested_store_equals_fit_on_the_numpy_rows(
    warehouse: Path, tmp_path: Path, given_inits
) -> None:
    out = tmp_path / "data.zarr"
    ingest(warehouse, out, missing="drop", chunk_rows=CHUNK)
    X = duckdb_rows(warehouse)
    inits = given_inits(X, 3, "full")
    a = GaussianMixture(3, tol=1e-6, max_iter=30, **inits).fit(str(out))
    b = GaussianMixture(3, tol=1e-6, max_iter=30, **inits).fit(X)
    assert a.n_iter_ == b.n_iter_
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        x, y = getattr(a, name), getattr(b, name)
        assert np.max(np.abs(x - y) / np.maximum(np.abs(y), 1.0)) <= 1e-12, name


def test_appended_partition_equals_a_fresh_ingest_and_reingest_is_a_no_op(
    warehouse: Path, tmp_path: Path
) -> None:
    appended, fresh = tmp_path / "appended.zarr", tmp_path / "fresh.zarr"
    ingest(warehouse, appended, missing="drop", chunk_rows=CHUNK)
    write_date(warehouse, 3)
    summary = ingest(warehouse, appended, partition=f"dt={DATES[3]}", missing="drop")
    assert [p["status"] for p in summary["partitions"]] == ["added"]
    ingest(warehouse, fresh, missing="drop", chunk_rows=CHUNK)
    assert snapshot(appended) == snapshot(fresh)
    assert np.array_equal(open_array(appended).compute(), duckdb_rows(warehouse))

    before = snapshot(appended)
    again = ingest(warehouse, appended, missing="drop")
    assert [p["status"] for p in again["partitions"]] == ["unchanged"] * 4
    assert again["rows_added"] == 0 and len(again["messages"]) == 4
    assert "already in the store" in again["messages"][0]
    assert snapshot(appended) == before


def test_changed_partition_is_refused_unless_replaced(warehouse: Path, tmp_path: Path) -> None:
    out, fresh = tmp_path / "data.zarr", tmp_path / "fresh.zarr"
    ingest(warehouse, out, missing="drop", chunk_rows=CHUNK)
    before = snapshot(out)
    write_date(warehouse, 1, seed=99)  # the middle date changes
    with pytest.raises(DataError, match=r"'dt=2026-11-21' changed.*replace_partition=True"):
        ingest(warehouse, out, missing="drop")
    assert snapshot(out) == before
    summary = ingest(warehouse, out, missing="drop", replace_partition=True)
    assert [p["status"] for p in summary["partitions"]] == ["unchanged", "unchanged", "replaced"]
    ingest(warehouse, fresh, missing="drop", chunk_rows=CHUNK)
    assert snapshot(out) == snapshot(fresh)  # later rows moved, chunks realigned
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_non_numeric_or_unknown_columns_are_refused_naming_them(
    warehouse: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data.zarr"
    with pytest.raises(ParameterError, match=r"column 's' \(string\) .* is not numeric") as err:
        ingest(warehouse, out, columns=["f1", "s"], missing="drop")
    assert err.value.parameter == "columns" and "\n" not in str(err.value)
    with pytest.raises(ParameterError, match=r"no column 'dt'.*hive partition columns"):
        ingest(warehouse, out, columns=["f1", "dt"], missing="drop")
    assert not out.exists()


def test_missing_values_are_refused_counted_dropped_or_kept(
    warehouse: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data.zarr"
    nulls = sum(1 for i in range(ROWS[0]) if i % 13 == 5)
    with pytest.raises(DataError, match=rf"column 'f2' has {nulls} missing .*and 1 more"):
        ingest(warehouse, out)
    assert not out.exists()  # nothing committed: no store left behind

    kept = ingest(warehouse, out, missing="keep", columns=["f1", "f2"], chunk_rows=CHUNK)
    X = open_array(out).compute()
    assert kept["rows_dropped"] == 0 and X.shape[0] == sum(ROWS[:3])
    assert np.isnan(X[:, 1]).sum() == sum(sum(1 for i in range(n) if i % 13 == 5) for n in ROWS[:3])

    con = duckdb.connect()
    path = tmp_path / "inf.parquet"
    con.execute(f"COPY (SELECT 1.0::DOUBLE AS a UNION ALL SELECT 'inf'::DOUBLE) TO '{path}'")
    with pytest.raises(DataError, match=r"'a' has 1 infinite value.*never infinity"):
        ingest(path, tmp_path / "inf.zarr", missing="keep")
    assert ingest(path, tmp_path / "inf.zarr", missing="drop")["rows_dropped"] == 1


def test_query_runs_per_partition_over_the_view_source(warehouse: Path, tmp_path: Path) -> None:
    out = tmp_path / "data.zarr"
    ingest(
        warehouse,
        out,
        query="SELECT f1, i1, f2, i2 FROM source WHERE i1 > 0",
        missing="drop",
        chunk_rows=CHUNK,
    )
    assert np.array_equal(open_array(out).compute(), duckdb_rows(warehouse, "i1 > 0"))


def test_float32_store_keeps_its_layout_on_append(warehouse: Path, tmp_path: Path) -> None:
    out = tmp_path / "data.zarr"
    first = f"dt={DATES[0]}"
    ingest(warehouse, out, partition=first, missing="drop", dtype="float32", chunk_rows=CHUNK)
    X = open_array(out).compute()
    assert X.dtype == np.float32
    assert np.array_equal(X, duckdb_rows(warehouse, f"dt = '{DATES[0]}'").astype(np.float32))
    before = snapshot(out)
    for wrong, fragment in [
        ({"dtype": "float64"}, "holds float32"),
        ({"columns": ["f1", "f2"]}, "holds the columns"),
        ({"chunk_rows": CHUNK + 1}, f"chunks of {CHUNK} rows"),
    ]:
        with pytest.raises(ParameterError, match=fragment):
            ingest(warehouse, out, missing="drop", **wrong)
    assert snapshot(out) == before
    ingest(warehouse, out, missing="drop")  # the store's dtype and columns by default
    assert open_array(out).shape[0] == len(duckdb_rows(warehouse))


def test_a_query_without_source_is_one_named_partition_and_decimals_are_numeric(
    tmp_path: Path,
) -> None:
    out = tmp_path / "data.zarr"
    query = "SELECT (i / 4)::DECIMAL(10, 2) AS d, i AS n, 'x' AS s FROM range(10) t(i)"
    summary = ingest(None, out, query=query, partition="batch-1")
    assert summary["columns"] == ["d", "n"]
    assert [p["name"] for p in summary["partitions"]] == ["batch-1"]
    expected = np.column_stack([np.round(np.arange(10) / 4, 2), np.arange(10)])
    assert np.array_equal(open_array(out).compute(), expected)
    with pytest.raises(ParameterError, match="query failed on partition 'query'"):
        ingest(None, tmp_path / "other.zarr", query="SELECT * FROM no_such_table")


def test_a_store_another_ingest_is_writing_is_refused(warehouse: Path, tmp_path: Path) -> None:
    out = tmp_path / "data.zarr"
    ingest(warehouse, out, missing="drop", chunk_rows=CHUNK, partition=f"dt={DATES[0]}")
    before = snapshot(out)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running ingest holds it
        with pytest.raises(OutputError, match="another ingest is writing"):
            ingest(warehouse, out, missing="drop")
    finally:
        os.close(fd)
    assert snapshot(out) == before


def test_unreadable_parquet_and_foreign_outputs_are_refused_in_one_line(
    warehouse: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="bad.parquet") as err:
        ingest(bad, tmp_path / "bad.zarr")
    assert "\n" not in str(err.value) and not (tmp_path / "bad.zarr").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a store written by dask-em ingest"):
        ingest(warehouse, foreign, missing="drop")
    assert snapshot(foreign) == {"notes.txt": b"mine"}


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from dask_em.ingest import ingest

    source, out, partition, where, kill_at = sys.argv[1:6]
    calls, real = [0], os.replace

    def replace(src, dst):  # zarr writes each file as a temporary renamed into place
        if where == "any" or os.fspath(dst).startswith(out + os.sep):
            calls[0] += 1
            if calls[0] == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)

    os.replace = replace
    ingest(source, out, partition=partition, missing="drop")
    """
)
"""Runs `ingest` and SIGKILLs itself before its KILL_AT-th rename: of any file
(``any``: staging writes included) or of a file into the store (``store``)."""


def test_append_killed_before_each_rename_leaves_the_store_and_rerun_completes_it(
    warehouse: Path, tmp_path: Path
) -> None:
    out, fresh = tmp_path / "data.zarr", tmp_path / "fresh.zarr"
    ingest(warehouse, out, missing="drop", chunk_rows=CHUNK)
    before_rows, before_attrs = stored(out)
    write_date(warehouse, 3)
    # the append renames its chunk files (from the partial last one on), then the metadata
    renames = -(-len(duckdb_rows(warehouse)) // CHUNK) - len(before_rows) // CHUNK + 1
    command = [sys.executable, "-c", KILLER, str(warehouse), str(out), f"dt={DATES[3]}"]
    instants = [("any", 1), ("any", 4)] + [("store", k) for k in range(1, renames + 1)]
    for where, kill_at in instants:
        killed = subprocess.run([*command, where, str(kill_at)], capture_output=True, timeout=120)
        assert killed.returncode == -9, killed.stderr.decode()[-2000:]
        rows, attrs = stored(out)
        assert np.array_equal(rows, before_rows) and attrs == before_attrs, (where, kill_at)
        assert np.array_equal(open_array(out).compute(), before_rows)
    rerun = subprocess.run([*command, "any", "0"], capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    ingest(warehouse, fresh, missing="drop", chunk_rows=CHUNK)
    assert snapshot(out) == snapshot(fresh)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
