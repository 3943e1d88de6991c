"""``docker/Dockerfile`` and ``docker/compose.yaml`` run for real with podman.

The slow test builds the image on a Debian bookworm base made on this machine
(`container_helpers.Podman.base_image`: debootstrap, ``podman import``, cached between
runs), starts the compose cluster with ``podman-compose`` (a scheduler, two workers and
a job that generates data and fits it through ``tcp://scheduler:8786``, all sharing one
volume), and checks that the fit in containers equals a local fit of the same data and
that ``podman-compose down -v`` leaves no container, volume or network behind. It skips,
saying why, only where containers cannot run (`container_helpers.containers_missing`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import LOCAL, assert_ok, assert_same_fit, run_cli
from container_helpers import Podman, ca_bundle, containers_missing

from dask_em import load_model

DOCKER = Path(__file__).resolve().parents[1] / "docker"
IMAGE = "localhost/dask-em:test"


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    """Podman with the test configuration; skips where containers cannot run."""
    reason = containers_missing()
    if reason is not None:
        pytest.skip(reason)
    return Podman.create(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The project's image, built from ``docker/Dockerfile`` on the Debian base image
    (pip inside the build trusts this machine's CA bundle, given as a build secret)."""
    base = podman.base_image(tmp_path_factory.mktemp("base"))
    secret = ca_bundle()
    podman.run(
        "build",
        "--build-arg",
        f"BASE={base}",
        *(["--secret", f"id=pip_cert,src={secret}"] if secret else []),
        "-f",
        str(DOCKER / "Dockerfile"),
        "-t",
        IMAGE,
        str(DOCKER.parent),
        timeout=1800,
    )
    return IMAGE


@pytest.fixture
def compose_project(podman: Podman) -> Iterator[str]:
    """A podman-compose project name of its own; whatever the test leaves of it is
    removed at teardown."""
    project = f"dask-em-test-{os.getpid()}"
    yield project
    podman.compose(
        "-f",
        str(DOCKER / "compose.yaml"),
        "-p",
        project,
        "down",
        "-v",
        "-t",
        "5",
        check=False,
        environ={"DASK_EM_IMAGE": IMAGE},
    )


@pytest.mark.slow
def test_compose_cluster_fit_equals_a_local_fit(
    podman: Podman, image: str, compose_project: str, tmp_path: Path
) -> None:
    """The compose job generates data on the shared volume and fits it through the
    containers' scheduler and two workers; the model equals a local fit of the same data
    (<= 1e-12), and ``down -v`` removes every container, the volume and the network."""
    compose = ["-f", str(DOCKER / "compose.yaml"), "-p", compose_project]
    environ = {"DASK_EM_IMAGE": image}
    podman.compose(*compose, "up", "-d", environ=environ)
    job = f"{compose_project}_job_1"
    status = podman.run("wait", job, timeout=600).stdout.strip()
    logs = podman.run("logs", job)
    assert status == "0", f"the job exited {status}:\n{logs.stdout}\n{logs.stderr}"
    summary = json.loads(logs.stdout)
    assert (summary["model"], summary["converged"]) == ("/work/model.zarr", True)
    assert "local Dask cluster" not in logs.stderr  # it used the containers' cluster
    scheduler_log = podman.run("logs", f"{compose_project}_scheduler_1").stderr
    assert scheduler_log.count("Register worker") == 2, scheduler_log
    assert "Receive client connection" in scheduler_log

    volume = podman.run(
        "volume", "inspect", f"{compose_project}_work", "--format", "{{.Mountpoint}}"
    )
    work = Path(volume.stdout.strip())
    for name in ("data.zarr", "model.zarr"):
        shutil.copytree(work / name, tmp_path / name)

    podman.compose(*compose, "down", "-v", "-t", "5", environ=environ)
    for kind in ("container", "volume", "network"):
        assert podman.project_labels(kind, compose_project) == [], kind

    local = run_cli(
        "fit",
        tmp_path / "data.zarr",
        "--n-components",
        "3",
        "--seed",
        "0",
        "--chunk-rows",
        "2000",
        "--output",
        tmp_path / "local.zarr",
        "--quiet",
        *LOCAL,
    )
    assert_ok(local)
    assert_same_fit(load_model(tmp_path / "model.zarr"), load_model(tmp_path / "local.zarr"))
