"""``dask-em`` on a real SLURM: workers as SLURM jobs, and the requeueable batch fit.

The slow tests start a single-node SLURM on this machine (`slurm_helpers.start_slurm`:
munged, slurmctld, slurmd; skipped with the install command if SLURM is not installed):

- ``dask-em fit --cluster slurm`` submits its Dask workers as SLURM jobs through
  dask-jobqueue, with the job options given on the command line and the rest from a
  dask-jobqueue configuration file, and gets the parameters of a local fit;
- ``workflows/slurm/fit.sbatch`` submitted with ``sbatch``, requeued by ``scontrol requeue``
  and then by itself (the path its ``--signal`` takes before the time limit), resumes from
  its checkpoint each time and ends with the model of an uninterrupted fit.

The usage errors need no SLURM and run in the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_same_fit,
    assert_usage_error,
    current_iteration,
    dask_em_command,
    mixture,
    peek_checkpoint,
    run_cli,
    wait_for,
    write_array,
)
from slurm_helpers import PARTITION, Slurm, slurm_missing, start_slurm

from dask_em import load_model
from dask_em.cluster import slurm_cluster
from dask_em.errors import ParameterError

FIT_SBATCH = Path(__file__).resolve().parents[1] / "workflows" / "slurm" / "fit.sbatch"
FIT = ("--n-components", "3", "--seed", "3", "--chunk-rows", "1000")
"""Options of every fit here (10 tasks per pass on the 10,000-row data)."""


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    """A real single-node SLURM (munged, slurmctld, slurmd) for the session, stopped by pid
    at teardown; skips with the install command where SLURM is not installed."""
    reason = slurm_missing()
    if reason is not None:
        pytest.skip(reason)
    with start_slurm(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture
def data(tmp_path: Path) -> str:
    """10,000 rows x 4 features of a 3-component mixture in a store of 1,000-row chunks."""
    return write_array(tmp_path / "data.zarr", mixture(10_000, 4, 3, seed=21), (1000, 4))


def dask_config(root: Path, **slurm_options: object) -> dict[str, str]:
    """``DASK_CONFIG`` for a new directory whose ``jobqueue.yaml`` sets ``jobqueue.slurm``
    options (dask-jobqueue's configuration file)."""
    root.mkdir()
    lines = ["jobqueue:", "  slurm:"] + [f"    {k}: {v}" for k, v in slurm_options.items()]
    (root / "jobqueue.yaml").write_text("\n".join(lines) + "\n")
    return {"DASK_CONFIG": str(root)}


# ------------------------------------------------------------ workers as SLURM jobs
@pytest.mark.slow
def test_fit_with_workers_as_slurm_jobs_equals_a_local_fit(
    slurm: Slurm, data: str, tmp_path: Path
) -> None:
    """The job options given on the command line reach the SLURM job (and win over the
    configuration file), the configuration file gives the rest (the job name), the job
    is gone when the command ends, and the parameters equal a local fit's (<= 1e-12)."""
    environ = dask_config(tmp_path / "dask", name="dask-em-test-worker", cores=2, memory="2GiB")
    common = ["fit", data, *FIT, "--tol", "1e-6", "--max-iter", "40"]
    local = run_cli(*common, "--output", tmp_path / "local.zarr", "--quiet", *LOCAL)
    assert_ok(local)
    before = {job["JobId"] for job in slurm.jobs()}
    result = slurm.dask_em(
        *common,
        "--output",
        tmp_path / "slurm.zarr",
        "--cluster",
        "slurm",
        "--jobs",
        "1",
        "--cores",
        "1",
        "--memory",
        "1GiB",
        "--walltime",
        "00:05:00",
        "--queue",
        PARTITION,
        "--job-extra=--comment=dask-em-slurm-test",
        cwd=tmp_path,
        extra_environ=environ,
    )
    assert_ok(result)
    jobs = [job for job in slurm.jobs() if job["JobId"] not in before]
    assert len(jobs) == 1, jobs
    job = jobs[0]
    assert f"SLURM cluster: job(s) {job['JobId']}," in result.stderr
    assert job["JobName"] == "dask-em-test-worker"  # from the configuration file
    assert job["Comment"] == "dask-em-slurm-test"  # --job-extra
    assert (job["NumCPUs"], job["MinMemoryNode"]) == ("1", "1G")  # --cores, --memory
    assert (job["TimeLimit"], job["Partition"]) == ("00:05:00", PARTITION)
    assert job["JobState"] in ("CANCELLED", "COMPLETED"), job  # scancel'ed on exit
    assert (tmp_path / f"slurm-{job['JobId']}.out").exists()  # the worker's output
    assert_same_fit(load_model(tmp_path / "slurm.zarr"), load_model(tmp_path / "local.zarr"))


@pytest.mark.slow
def test_slurm_problems_are_one_line_errors(slurm: Slurm, data: str, tmp_path: Path) -> None:
    """A partition SLURM does not have (sbatch's own words), job options neither given nor
    configured, and worker jobs that end before a worker connects (a configured Python
    that does not exist) are one-line errors with exit status 2, and write no model."""
    model = tmp_path / "model.zarr"
    fit = ["fit", data, *FIT, "--output", model, "--cluster", "slurm", "--quiet"]
    empty = dask_config(tmp_path / "empty")
    result = slurm.dask_em(
        *fit, "--cores", "1", "--memory", "1GiB", "--queue", "nosuch", cwd=tmp_path
    )
    assert_usage_error(result, "SLURM refused", "invalid partition specified: nosuch", "--queue")
    result = slurm.dask_em(*fit, "--cores", "1", cwd=tmp_path, extra_environ=empty)
    assert_usage_error(result, "--cores and --memory", "jobqueue.slurm.memory")
    broken = dask_config(tmp_path / "broken", python="/nonexistent/python", cores=1, memory="1GiB")
    result = slurm.dask_em(*fit, cwd=tmp_path, extra_environ=broken)
    assert_usage_error(result, "ended before their Dask worker connected", "slurm-JOBID.out")
    assert not model.exists()


# ---------------------------------------------------------- the requeueable batch fit
def job_state(slurm: Slurm, job_id: str) -> str:
    """The state SLURM reports for ``job_id`` (empty if it has none)."""
    return slurm.job(job_id).get("JobState", "")


def requeued_and_restarted(slurm: Slurm, job_id: str, checkpoint: Path) -> int:
    """Wait until SLURM has requeued ``job_id`` (pending again), start it again as soon as
    SLURM allows, and wait until it runs; return the iterations its checkpoint held while
    the job was pending.

    A requeued job is held until the credentials of its previous run have expired
    (``AuthInfo=cred_expire=10`` here; SLURM's default is 120 s): a job started earlier is
    killed at once ("Job credential revoked"). Once that time (its ``EligibleTime``) has
    passed, ``scontrol update jobid=J StartTime=now`` starts it without waiting for the
    next periodic scheduling pass (up to a minute); if that pass came first, the job is
    already running and the update is refused ("no longer pending"), which is as good.
    """
    wait_for(lambda: job_state(slurm, job_id) == "PENDING", 120, f"job {job_id} requeued")
    committed = current_iteration(peek_checkpoint(checkpoint))
    eligible = datetime.fromisoformat(slurm.job(job_id)["EligibleTime"]) + timedelta(seconds=1)
    wait_for(lambda: datetime.now() >= eligible, 300, f"job {job_id}'s credentials to expire")
    update = slurm.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
    if update.returncode != 0 and "no longer pending" not in update.stderr:
        raise AssertionError(f"scontrol update of job {job_id} failed: {update.stderr}")
    wait_for(lambda: job_state(slurm, job_id) == "RUNNING", 120, f"job {job_id} restarted")
    return committed


@pytest.mark.slow
def test_the_batch_fit_resumes_when_slurm_requeues_it(
    slurm: Slurm, data: str, tmp_path: Path
) -> None:
    """``sbatch workflows/slurm/fit.sbatch``: requeued by ``scontrol requeue`` after >= 3
    committed iterations, then by itself on USR1 (what ``--signal`` sends before the time
    limit), it resumes from its checkpoint each time (the fit was stopped mid-way both
    times) and ends with the model and history of an uninterrupted fit (<= 1e-12)."""
    max_iter = 60
    fit = [*FIT, "--tol", "0", "--max-iter", str(max_iter)]
    out, log = tmp_path / "job", tmp_path / "job.log"
    checkpoint = out / "checkpoint"
    # the job finds dask-em on the PATH it inherits from sbatch
    bin_dir = Path(dask_em_command()[0]).parent
    environ = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    submitted = slurm.run(
        "sbatch",
        "--parsable",
        "--cpus-per-task=1",
        "--mem=1G",
        "--time=00:10:00",
        f"--output={log}",
        str(FIT_SBATCH),
        data,
        "3",
        str(out),
        *fit[2:],
        environ=environ,
    )
    job_id = submitted.stdout.strip().split(";")[0]

    def iterations() -> int:
        return current_iteration(peek_checkpoint(checkpoint))

    def running_past(n: int) -> int:
        if job_state(slurm, job_id) in ("FAILED", "CANCELLED", "COMPLETED"):
            raise AssertionError(f"job {job_id} ended early:\n{log.read_text()}")
        return iterations() >= n

    stops = []
    wait_for(lambda: running_past(3), 240, "3 committed iterations")
    slurm.run("scontrol", "requeue", job_id)
    stops.append(requeued_and_restarted(slurm, job_id, checkpoint))
    wait_for(lambda: running_past(stops[0] + 3), 240, "3 more committed iterations")
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    stops.append(requeued_and_restarted(slurm, job_id, checkpoint))
    wait_for(lambda: job_state(slurm, job_id) in ("COMPLETED", "FAILED"), 300, "the job to end")
    text = log.read_text()
    assert job_state(slurm, job_id) == "COMPLETED", text
    assert slurm.job(job_id)["Restarts"] == "2"
    assert 3 <= stops[0] < stops[1] < max_iter, stops  # stopped mid-fit both times
    for run in (1, 2, 3):
        assert f"dask-em-fit: job {job_id} run {run} " in text
    assert "DUE TO JOB REQUEUE" in text
    assert "time limit near: requeueing job" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_iter"] == max_iter

    local = run_cli("fit", data, *fit, "--output", tmp_path / "local.zarr", "--quiet", *LOCAL)
    assert_ok(local)
    assert_same_fit(load_model(out / "model.zarr"), load_model(tmp_path / "local.zarr"))


# ------------------------------------------------------------- usage (no SLURM needed)
def test_slurm_options_need_cluster_slurm_and_exclude_the_local_ones(
    data: str, tmp_path: Path
) -> None:
    """SLURM job options without ``--cluster slurm``, and local-cluster or scheduler
    options with it, are usage errors (exit 2, one line); nothing is written."""
    fit = ["fit", data, "--n-components", "3", "--output", tmp_path / "m.zarr"]
    assert_usage_error(run_cli(*fit, "--jobs", "2"), "--jobs", "--cluster slurm")
    assert_usage_error(run_cli(*fit, "--job-extra=--exclusive"), "--cluster slurm")
    assert_usage_error(
        run_cli(*fit, "--cluster", "slurm", "--n-workers", "2"), "--n-workers", "drop"
    )
    assert_usage_error(
        run_cli(*fit, "--cluster", "slurm", "--scheduler", "tcp://127.0.0.1:1"), "--scheduler"
    )
    assert not (tmp_path / "m.zarr").exists()


def test_cluster_slurm_without_sbatch_says_where_to_run(data: str, tmp_path: Path) -> None:
    """With no ``sbatch`` on the PATH, ``--cluster slurm`` fails in one line (exit 2)
    saying to run on a machine that submits SLURM jobs."""
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run(
        [
            *dask_em_command(),
            *map(str, ["fit", data, "--n-components", "3", "--output", tmp_path / "m.zarr"]),
            "--cluster",
            "slurm",
            "--cores",
            "1",
            "--memory",
            "1GiB",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PATH": str(empty)},
    )
    assert_usage_error(result, "no sbatch command", "login node")


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_slurm_cluster_refuses_a_bad_number_of_jobs(jobs: object) -> None:
    with pytest.raises(ParameterError, match="'jobs'"):
        slurm_cluster(jobs, cores=1, memory="1GiB")  # type: ignore[arg-type]
