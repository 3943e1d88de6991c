"""``workflows/airflow/dask_em_nightly.py`` run for real by Airflow 3.

Airflow is installed with this project (``-e .[ingest]``) into a venv of its own beside
the test interpreter's (`airflow_venv`: ``PREFIX/airflow``, about 3 to 5 minutes, reused
while its Airflow requirement and this project's ``pyproject.toml`` are unchanged). Each
night runs in a subprocess as ``python dask_em_nightly.py DS`` (Airflow's ``dag.test()``:
every task in that process, against a SQLite metadata database under a temporary
``AIRFLOW_HOME``), with its settings as ``AIRFLOW_VAR_DASK_EM_*`` variables; the task
logs are that process's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import assert_ok, run_cli

ROOT = Path(__file__).resolve().parents[1]
DAG = ROOT / "workflows" / "airflow" / "dask_em_nightly.py"
AIRFLOW = "apache-airflow>=3,<4"
NIGHTS = ("2026-11-21", "2026-11-22")


@dataclass
class Airflow:
    """An Airflow venv (with this project) and a migrated metadata database.

    Attributes
    ----------
    venv : Path
    home : Path
        ``AIRFLOW_HOME``.
    """

    venv: Path
    home: Path

    def environ(self, **variables: str) -> dict[str, str]:
        """The environment of Airflow commands: the venv first on the PATH (its
        ``dask-em``), this ``AIRFLOW_HOME``, the DAG's folder, and ``variables`` as the
        Airflow Variables ``dask_em_NAME``."""
        return {
            **os.environ,
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAG.parent),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            **{f"AIRFLOW_VAR_DASK_EM_{k.upper()}": v for k, v in variables.items()},
        }

    def night(self, ds: str, **variables: str) -> subprocess.CompletedProcess[str]:
        """Run the DAG once for the logical date ``ds`` (``dag.test()``); stdout and
        stderr together (the task logs) in ``stdout``."""
        return subprocess.run(
            [str(self.venv / "bin" / "python"), str(DAG), ds],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=600,
            env=self.environ(**variables),
        )


def venv_key() -> str:
    """What the cached Airflow venv was built for: the Airflow requirement and a hash of
    this project's ``pyproject.toml`` (its dependencies)."""
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return json.dumps({"requirement": AIRFLOW, "pyproject": digest})


@pytest.fixture(scope="session")
def airflow_venv() -> Path:
    """``PREFIX/airflow``: a venv with Airflow 3 and this project (editable, ``ingest``
    extra), built once and reused while `venv_key` is unchanged."""
    venv = Path(sys.prefix) / "airflow"
    stamp = venv / "dask-em-key.json"
    if stamp.exists() and stamp.read_text() == venv_key():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", AIRFLOW, "-e", f"{ROOT}[ingest]"],
        check=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    stamp.write_text(venv_key())
    return venv


@pytest.fixture(scope="session")
def airflow(airflow_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Airflow:
    """Airflow with a new SQLite metadata database (``airflow db migrate``)."""
    running = Airflow(airflow_venv, tmp_path_factory.mktemp("airflow-home"))
    migrate = subprocess.run(
        [str(airflow_venv / "bin" / "airflow"), "db", "migrate"],
        capture_output=True,
        text=True,
        timeout=600,
        env=running.environ(),
    )
    assert migrate.returncode == 0, migrate.stderr
    return running


def write_night(source: Path, ds: str, seed: int, n: int = 20_000) -> None:
    """Night ``ds``'s partition ``dt=DS`` of a hive-partitioned Parquet dataset: ``n`` rows
    of one fixed 3-component mixture (``x``, ``y``, ``z``; ``seed`` draws the rows) and a
    string column ``name`` that is not a feature."""
    means = np.random.default_rng(7).normal(scale=3.0, size=(3, 3))
    rng = np.random.default_rng(seed)
    X = means[rng.choice(3, size=n, p=[0.5, 0.3, 0.2])] + rng.standard_normal((n, 3))
    table = pa.table(
        {"x": X[:, 0], "y": X[:, 1], "z": X[:, 2], "name": [f"u{i}" for i in range(n)]}
    )
    pq.write_to_dataset(table, source / f"dt={ds}")


def info(model: Path) -> dict[str, object]:
    """``dask-em info MODEL``."""
    result = run_cli("info", model)
    assert_ok(result)
    return json.loads(result.stdout)


@pytest.mark.slow
def test_two_nights_publish_models_and_the_second_starts_from_the_first(
    airflow: Airflow, tmp_path: Path
) -> None:
    """Both runs succeed; each publishes ``models/DS.zarr`` with its record, labels and
    the ``latest.json`` pointer; the first night's fit resumes from the checkpoint an
    interrupted attempt left (as a retried task does); the second night's fit starts
    from the first night's model (its first lower bound is that model's score on the
    second night's data) and needs fewer passes than a cold fit of the same data."""
    source, out = tmp_path / "events", tmp_path / "out"
    for seed, ds in enumerate(NIGHTS):
        write_night(source, ds, seed)
    settings = {"source": str(source), "root": str(out), "n_components": "3"}
    # an earlier attempt of the first night: ingested, and one iteration committed
    data = out / "data" / f"{NIGHTS[0]}.zarr"
    ingest = ["ingest", source, data, "--partition", f"dt={NIGHTS[0]}", "--quiet"]
    assert_ok(run_cli(*ingest))
    checkpoint = out / "checkpoints" / NIGHTS[0]
    partial = ["fit", data, "--n-components", "3", "--checkpoint-dir", checkpoint]
    assert_ok(run_cli(*partial, "--max-iter", "1", "--output", tmp_path / "m.zarr", "--quiet"))
    for ds in NIGHTS:
        run = airflow.night(ds, **settings)
        assert run.returncode == 0, run.stdout
        assert f"DagRun Finished: dag_id=dask_em_nightly, logical_date={ds}" in run.stdout
        if ds == NIGHTS[0]:
            assert "is already in the store, unchanged; skipped" in run.stdout
            assert "Resuming" in run.stdout and str(checkpoint) in run.stdout

    first, second = (out / "models" / f"{ds}.zarr" for ds in NIGHTS)
    latest = json.loads((out / "models" / "latest.json").read_text())
    assert latest == json.loads((out / "models" / f"{NIGHTS[1]}.json").read_text())
    assert (latest["ds"], latest["model"], latest["init_model"]) == (
        NIGHTS[1],
        str(second),
        str(first),
    )
    assert json.loads((out / "models" / f"{NIGHTS[0]}.json").read_text())["init_model"] is None
    for ds in NIGHTS:
        assert (out / "labels" / f"{ds}.zarr").is_dir()

    warm = info(second)
    assert warm["hyper_parameters"]["init_model"] == str(first)  # type: ignore[index]
    data = out / "data" / f"{NIGHTS[1]}.zarr"
    start = run_cli("score", first, data)
    assert_ok(start)
    start_ll = json.loads(start.stdout)["mean_log_likelihood"]
    assert warm["lower_bounds"][0] == pytest.approx(start_ll, rel=1e-12)  # type: ignore[index]

    cold = run_cli(
        "fit", data, "--n-components", "3", "--output", tmp_path / "cold.zarr", "--quiet"
    )
    assert_ok(cold)
    cold_passes, warm_passes = info(tmp_path / "cold.zarr")["n_passes"], warm["n_passes"]
    assert warm_passes < cold_passes, (warm_passes, cold_passes)  # type: ignore[operator]


@pytest.mark.slow
def test_a_bad_partition_fails_the_run_with_the_one_line_message(
    airflow: Airflow, tmp_path: Path
) -> None:
    """A partition whose selected column ``z`` holds strings: ``dask-em ingest`` exits 2,
    the task fails without retries with dask-em's one-line message in the task log, the
    run fails, and nothing is published."""
    source, out = tmp_path / "events", tmp_path / "out"
    ds = "2026-11-23"
    table = pa.table({"x": [1.0, 2.0], "y": [3.0, 4.0], "z": ["a", "b"]})
    pq.write_to_dataset(table, source / f"dt={ds}")
    run = airflow.night(
        ds, source=str(source), root=str(out), n_components="3", ingest_options="--columns x,y,z"
    )
    message = (
        f"dask-em ingest: error: column 'z' (string) of partition 'dt={ds}' is not numeric; "
        "select integer or floating-point feature columns only."
    )
    assert run.returncode == 1, run.stdout
    assert f"AirflowFailException: {message}\n" in run.stdout
    assert run.stdout.count("$ dask-em ingest") == 1  # not retried
    assert "$ dask-em fit" not in run.stdout
    assert f"logical_date={ds} 00:00:00+00:00" in run.stdout and "state=failed" in run.stdout
    assert not (out / "models").exists()
