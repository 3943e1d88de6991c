"""The benchmark scripts run end to end on tiny data (``--small``) and print their tables.

Only that they run and report consistent numbers is checked here: timings are never
asserted (the numbers that matter are in the README, with the commands that made them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--small", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # 8-19 s; the contract it touches has default-tier tests
def test_peers_times_every_engine_from_the_same_start_and_agrees_with_sklearn() -> None:
    out = run("peers.py", "--peers", "sklearn")
    rows = {
        m.group(1).strip(): m.groups()[1:]
        for m in re.finditer(
            r"^(dask-em \([^)]*\)|scikit-learn)\s+([\d.]+)\s+([\d.]+)x\s.*?(-?\d+\.\d+)\s+([\d.e+-]+|nan)\s",
            out,
            re.MULTILINE,
        )
    }
    assert {"dask-em (cached)", "dask-em (streamed from Zarr)", "scikit-learn"} <= set(rows), out
    assert "matmul" in out and "GFLOP" in out
    for engine, (_, _, _, rel) in rows.items():  # same start, same iterations: same result
        assert float(rel) <= 1e-7, (engine, out)
    # float32 products: the mean log-likelihood within tests/test_compute_dtype.py's bound
    f32 = re.search(
        r"^dask-em float32 compute \(cached\)\s.*?\s([\d.e+-]+)\s+\d+ worker", out, re.M
    )
    assert f32 is not None and float(f32.group(1)) <= 1e-5, out
    assert re.search(
        r"^float32 compute: [\d.]+x dask-em float64 \(cached\), [\d.]+x scikit-learn", out, re.M
    ), out


def test_acceleration_counts_passes_of_plain_em_and_squarem() -> None:
    out = run("acceleration.py")
    passes = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^\s+\d+\s+(plain|squarem)\s+(\d+)\s", out, re.MULTILINE)
    }
    assert set(passes) == {"plain", "squarem"}, out
    assert passes["squarem"] < passes["plain"]


def test_restarts_share_passes() -> None:
    out = run("restarts.py")
    passes = {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"^\s+(\d+)\s+(\d+)\s+\d+\s", out, re.MULTILINE)
    }
    assert set(passes) == {1, 5}, out
    assert passes[5] <= passes[1] + 5  # not 5x: every pass serves all candidates


@pytest.mark.slow
def test_out_of_core_reports_memory_and_spill() -> None:
    out = run("out_of_core.py")
    assert re.search(r"peak worker RSS\s+\d+ MiB of \d+ MiB\s+spilled keys 0", out), out


@pytest.mark.slow
def test_out_of_core_cold_compares_every_read_with_the_disk() -> None:
    out = run("out_of_core.py", "--cold")  # without root the drops are skipped, and said so
    assert re.search(r"peak worker RSS\s+\d+ MiB of \d+ MiB\s+spilled keys 0", out), out
    reads = re.findall(
        r"^(disk|read\+decode|EM|page cache)\b.*\s[\d.]+\s+\d+\s+(?:\d+|-)\s+\d+%$", out, re.M
    )
    assert reads == ["disk", "disk", "read+decode", "EM", "page cache", "read+decode", "EM"], out
    if os.geteuid() != 0:
        assert "page cache NOT dropped" in out, out


@pytest.mark.slow
def test_chunking_compares_task_sizes() -> None:
    out = run("chunking.py")
    assert re.search(r"^\s+auto\s", out, re.MULTILINE), out


@pytest.mark.slow  # 8-19 s; the contract it touches has default-tier tests
def test_ingest_compares_routes_on_the_same_rows() -> None:
    out = run("ingest.py")
    routes = re.findall(r"^(\S.*?)\s+[\d.]+\s+[\d,]+\s+\d+ MiB\s+\d+ MiB$", out, re.MULTILINE)
    assert routes[:2] == ["dask-em ingest", "dask-em ingest --query"], out
    assert "dask.dataframe -> to_zarr" in routes, out
    assert "DIFFER" not in out and out.count("column sums agree") == len(routes), out


def test_fit_quality_compares_every_fit_with_sklearn_best_of_10() -> None:
    out = run("fit_quality.py")
    rows = {
        m.group(1).strip(): tuple(float(m.group(i)) for i in (2, 3, 4, 5))
        for m in re.finditer(
            r"^(dask-em default \(n_init=1\)|scikit-learn default|dask-em CLI \(n_init=\d+\))"
            r"\s+([\d.]+)%\s+(-?[\d.e+-]+)\s+(-?[\d.e+-]+)\s+([\d.]+)\s+([\d.]+)$",
            out,
            re.MULTILINE,
        )
    }
    assert len(rows) == 3, out
    for rate, median_gap, worst_gap, ari in rows.values():
        assert 0 <= rate <= 100 and median_gap <= worst_gap and -1 <= ari <= 1
    assert "clearly-worse rate by K and by overlap" in out


def test_model_selection_shares_passes_and_matches_separate_fits() -> None:
    out = run("model_selection.py")
    shared = int(re.search(r"^dask_em\.select \(shared passes\)\s+(\d+)", out, re.M).group(1))
    separate = int(re.search(r"^dask-em, one fit per candidate\s+(\d+)", out, re.M).group(1))
    assert shared < separate, out
    diff = float(re.search(r"select vs separate fits: (\S+)", out).group(1))
    assert diff <= 1e-12, out


@pytest.mark.slow  # 8-19 s; the contract it touches has default-tier tests
def test_small_jobs_times_the_command_against_a_sklearn_script() -> None:
    out = run("small_jobs.py")
    assert re.search(r"^dask-em --help [\d.]+ s\s+usage error [\d.]+ s$", out, re.M), out
    fits = re.findall(
        r"^\s+4,000\s+dask-em fit \((\w+)\)\s+[\d.]+\s+\d+\s+\d+\s+[\d.]+x$", out, re.M
    )
    assert fits == ["threads"], out  # auto chose threads for 4000 rows
    assert re.search(r"^\s+4,000\s+scikit-learn script\s+[\d.]+\s+\d+", out, re.M), out


@pytest.mark.slow
def test_scaling_fits_the_pass_model_and_extrapolates_to_100_nodes() -> None:
    out = run("scaling.py")
    sweeps = re.findall(r"^\s*(chunks|fan-in|workers)\s+[\d,]+\s+\d+\s+\d+\s+[\d,]+\s", out, re.M)
    assert set(sweeps) == {"chunks", "fan-in", "workers"}, out
    assert re.search(r"^fitted: pass = [\d.]+ ms \+ \d+ us x tasks .*relative residuals", out, re.M)
    assert re.search(r"E-step kernel: \d+ ns per row at D=32, K=16 full, one thread", out), out
    assert re.search(r"^recommended chunk: \d+ MiB \([\d,]+ rows\)", out, re.M), out


def test_kernel_chunk_times_both_kernels_and_they_agree() -> None:
    out = run("kernel_chunk.py")
    assert re.search(r"^numpy\s+[\d.]+\s+[\d.]+%", out, re.MULTILINE), out
    if "compiled   skipped" in out:  # numba not installed
        return
    assert re.search(r"^compiled\s+[\d.]+\s+[\d.]+%", out, re.MULTILINE), out
    diff = re.search(r"statistics max rel diff ([\d.e+-]+)", out)
    assert diff is not None and float(diff.group(1)) <= 1e-12, out
