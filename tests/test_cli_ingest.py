"""``dask-em ingest``: the real command on Parquet datasets written by DuckDB.

The rows are checked against DuckDB's own reading of the same files (`duckdb_rows`),
the summary against the store, and bad input against the one-line exit-2 contract
with the output left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from cli_helpers import assert_ok, assert_usage_error, run_cli, snapshot
from warehouse_helpers import DATES, FEATURES, duckdb_rows, write_date

from dask_em.io import open_array


def test_ingest_drop_then_append_prints_progress_messages_and_a_json_summary(
    warehouse: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data.zarr"
    result = run_cli("ingest", warehouse, out, "--missing", "drop", "--store-chunk-rows", 128)
    assert_ok(result)
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"{len(duckdb_rows(warehouse)):,} rows added")
    assert "3/3 partitions" in lines[-2] and lines[-2].endswith(f"rows/s (dt={DATES[2]})")
    assert np.array_equal(open_array(out).compute(), duckdb_rows(warehouse))

    write_date(warehouse, 3)
    result = run_cli("ingest", warehouse, out, "--missing", "drop", "--json")
    assert_ok(result)
    summary = json.loads(result.stdout)
    assert [p["status"] for p in summary["partitions"]] == ["unchanged"] * 3 + ["added"]
    assert summary["n_samples"] == zarr.open_array(str(out)).shape[0]
    assert summary["columns"] == FEATURES and summary["chunk_rows"] == 128
    assert (
        sum(
            "already in the store, unchanged; skipped" in line
            for line in result.stderr.splitlines()
        )
        == 3
    )
    assert np.array_equal(open_array(out).compute(), duckdb_rows(warehouse))


def test_quiet_ingest_of_a_query_prints_nothing_but_the_json(
    warehouse: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q.zarr"
    query = "SELECT f1, i1 FROM source WHERE f1 > 0"
    result = run_cli(
        "ingest", warehouse, out, "--query", query, "--quiet", "--json", "--dtype", "float32"
    )
    assert_ok(result)
    assert result.stderr == ""
    summary = json.loads(result.stdout)
    assert summary["dtype"] == "float32" and summary["columns"] == ["f1", "i1"]
    stored = zarr.open_array(str(out))
    assert stored.dtype == np.float32 and stored.shape == (summary["n_samples"], 2)
    assert (stored[:, 0] > 0).all()


@pytest.mark.slow
def test_ingest_user_errors_exit_2_in_one_line_with_option_names_and_write_nothing(
    warehouse: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data.zarr"
    line = assert_usage_error(run_cli("ingest", warehouse, out), "'f2'", "--missing drop")
    assert "missing='drop'" not in line
    assert not out.exists()
    assert_usage_error(run_cli("ingest", warehouse, out, "--columns", "f1,s"), "'s'")
    assert_usage_error(run_cli("ingest", tmp_path / "nowhere", out), "nowhere")
    assert_usage_error(run_cli("ingest", warehouse, out, "--partition", "dt=1999"), "dt=1999")
    assert_usage_error(run_cli("ingest", out, "--query", "SELEC 1"), "query failed")
    assert not out.exists()

    assert_ok(run_cli("ingest", warehouse, out, "--missing", "drop", "--quiet"))
    before = snapshot(out)
    write_date(warehouse, 1, seed=99)  # a changed partition
    assert_usage_error(
        run_cli("ingest", warehouse, out, "--missing", "drop", "--quiet"),  # progress silenced
        "dt=2026-11-21",
        "--replace-partition",
    )
    assert snapshot(out) == before
    result = run_cli("ingest", warehouse, out, "--missing", "drop", "--replace-partition")
    assert_ok(result)
    assert np.array_equal(open_array(out).compute(), duckdb_rows(warehouse))
