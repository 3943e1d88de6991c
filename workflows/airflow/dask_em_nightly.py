"""A nightly Airflow DAG: tonight's partition of a warehouse export -> a published model.

For the run's logical date ``ds`` (Airflow 3, one run per day, one run at a time):

1. ``ingest``: ``dask-em ingest SOURCE ROOT/data/DS.zarr --partition dt=DS``, that night's
   partition of a hive-partitioned Parquet dataset (a rerun finds it ingested, unchanged,
   and skips it);
2. ``fit``: ``dask-em fit`` with ``--checkpoint-dir ROOT/checkpoints/DS`` (a retried task
   resumes from the last committed iteration), warm-started with ``--init-model`` from
   the newest model published before DS (the previous night's, or the last night that
   succeeded; a cold start when there is none), writing ``ROOT/models/DS.zarr``;
3. ``score`` (``dask-em score``) and ``predict`` (``dask-em predict``, labels in
   ``ROOT/labels/DS.zarr``), in parallel;
4. ``publish``: ``ROOT/models/DS.json`` (what was fitted, from what, with which score),
   then the pointer ``ROOT/models/latest.json`` (the same record), each written to a
   temporary file and renamed into place, so a reader sees the previous pointer or the
   new one. A night counts as published once its ``DS.json`` exists.

A ``dask-em`` exit status 2 (bad input: a partition with a non-numeric or missing value,
a model that does not fit the data...) fails the task at once, without retries, with
dask-em's one-line message as the error in the task log; any other failure (exit 1, or
143 when the fit was stopped) is retried and the fit resumes from its checkpoint.

Settings are Airflow Variables, read when a task runs (``AIRFLOW_VAR_DASK_EM_ROOT=...`` in
the environment works as well):

==========================  ===========================================================
``dask_em_source``          the Parquet dataset (directory or URL), partitioned ``dt=``
``dask_em_root``            where data, checkpoints, models and labels go (a file system)
``dask_em_n_components``    components of the mixture (default 8)
``dask_em_partition_key``   the partition column (default ``dt``)
``dask_em_ingest_options``  more ``dask-em ingest`` options, e.g. ``--missing drop``
``dask_em_fit_options``     more ``dask-em fit`` options, e.g. ``--scheduler-file F``
``dask_em_command``         the ``dask-em`` command (default ``dask-em`` on the PATH)
==========================  ===========================================================

Run one night in-process, without a scheduler (Airflow's ``dag.test()``):
``python workflows/airflow/dask_em_nightly.py 2026-11-21`` (exit status 0 if the run
succeeded; ``tests/test_airflow.py`` does this for two nights, and for a bad partition).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Variable, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger(__name__)

DEFAULTS = {
    "source": "/data/warehouse/events",
    "root": "/data/dask-em",
    "n_components": "8",
    "partition_key": "dt",
    "ingest_options": "",
    "fit_options": "",
    "command": "dask-em",
}
"""Each setting's default; the Airflow Variable ``dask_em_NAME`` overrides it."""

USAGE_ERROR = 2
"""dask-em's exit status for bad usage or bad input (one line on stderr)."""


def setting(name: str) -> str:
    """The Airflow Variable ``dask_em_NAME``, else the default of ``name``."""
    return str(Variable.get(f"dask_em_{name}", default=DEFAULTS[name]))


def dask_em(*args: str) -> str:
    """Run ``dask-em ARGS`` with its progress (stderr) in the task log; return its stdout.

    Raises
    ------
    AirflowFailException
        Exit status 2 (bad usage or input: retrying cannot help), with dask-em's one-line
        message.
    RuntimeError
        Any other failure (retried).
    """
    argv = [*shlex.split(setting("command")), *args]
    log.info("$ %s", shlex.join(argv))
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        stdout: list[str] = []
        reader = threading.Thread(target=lambda: stdout.append(process.stdout.read()))
        reader.start()
        last = ""
        try:
            for line in process.stderr:
                last = line.rstrip("\n") or last
                log.info("%s", line.rstrip("\n"))
            status = process.wait()
        except BaseException:  # the task is being stopped: let dask-em stop cleanly first
            process.terminate()
            process.wait()
            raise
        finally:
            reader.join()
    if status == USAGE_ERROR:
        raise AirflowFailException(last)
    if status != 0:
        raise RuntimeError(f"dask-em {args[0]} exited with status {status}: {last}")
    return stdout[0]


def night() -> str:
    """The running DAG run's logical date, ``YYYY-MM-DD``."""
    return str(get_current_context()["ds"])


def root() -> Path:
    """The ``dask_em_root`` directory."""
    return Path(setting("root"))


def published_before(ds: str) -> Path | None:
    """The newest model published for a night before ``ds`` (None if there is none)."""
    nights = sorted(
        p.stem for p in (root() / "models").glob("*.json") if p.stem != "latest" and p.stem < ds
    )
    return root() / "models" / f"{nights[-1]}.zarr" if nights else None


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


@dag(
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,  # a night warm-starts from the model the night before published
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2)},
    tags=["dask-em"],
)
def dask_em_nightly() -> None:
    """Ingest tonight's partition, fit (warm, checkpointed), score, predict, publish."""

    @task
    def ingest() -> str:
        ds = night()
        out = root() / "data" / f"{ds}.zarr"
        out.parent.mkdir(parents=True, exist_ok=True)
        partition = f"{setting('partition_key')}={ds}"
        options = shlex.split(setting("ingest_options"))
        dask_em("ingest", setting("source"), str(out), "--partition", partition, *options)
        return str(out)

    @task
    def fit(data: str) -> dict[str, Any]:
        ds = night()
        model = root() / "models" / f"{ds}.zarr"
        model.parent.mkdir(parents=True, exist_ok=True)
        previous = published_before(ds)
        warm = ["--init-model", str(previous)] if previous else []
        if previous:
            log.info("warm start from %s", previous)
        else:
            log.info("cold start: no model was published before %s", ds)
        summary = json.loads(
            dask_em(
                "fit", data, "--n-components", setting("n_components"), "--output", str(model),
                "--checkpoint-dir", str(root() / "checkpoints" / ds), "--json", *warm,
                *shlex.split(setting("fit_options")),
            )
        )  # fmt: skip
        return {**summary, "init_model": str(previous) if previous else None}

    @task
    def score(fitted: dict[str, Any], data: str) -> dict[str, Any]:
        return json.loads(dask_em("score", fitted["model"], data))

    @task
    def predict(fitted: dict[str, Any], data: str) -> str:
        labels = root() / "labels" / f"{night()}.zarr"
        labels.parent.mkdir(parents=True, exist_ok=True)
        dask_em("predict", fitted["model"], data, "--output", str(labels))
        return str(labels)

    @task
    def publish(
        fitted: dict[str, Any], scores: dict[str, Any], labels: str, data: str
    ) -> dict[str, Any]:
        ds = night()
        record = {
            "ds": ds,
            "model": fitted["model"],
            "data": data,
            "labels": labels,
            "init_model": fitted["init_model"],
            "fit": {k: fitted[k] for k in ("n_iter", "n_passes", "converged", "lower_bound")},
            "score": scores,
        }
        models = root() / "models"
        write_json(models / f"{ds}.json", record)
        write_json(models / "latest.json", record)
        return record

    data = ingest()
    fitted = fit(data)
    publish(fitted, score(fitted, data), predict(fitted, data), data)


nightly = dask_em_nightly()

if __name__ == "__main__":
    # python dask_em_nightly.py YYYY-MM-DD: run that night once, in this process; the exit
    # status is 0 if the run succeeded, 1 if it failed
    run = nightly.test(logical_date=datetime.fromisoformat(sys.argv[1]).replace(tzinfo=UTC))
    sys.exit(0 if run.state == "success" else 1)
