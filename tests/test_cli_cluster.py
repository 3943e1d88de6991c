"""``dask-em`` on a real, separately started Dask cluster.

A ``dask scheduler`` and two ``dask worker`` processes are started as real processes
(each in its own session, killed with their process groups at teardown). ``dask-em fit``
given ``--scheduler ADDRESS`` or ``--scheduler-file FILE`` runs its work on those workers
and gets the parameters of the embedded local-cluster run; an unreachable scheduler is a
one-line error with exit status 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_same_fit,
    assert_usage_error,
    mixture,
    run_cli,
    start_external_cluster,
    write_array,
)

from dask_em import load_model

pytestmark = pytest.mark.slow


def executed_counts(client: object) -> dict[str, int]:
    """Tasks executed so far by each worker of ``client``'s cluster."""
    return client.run(lambda dask_worker: dask_worker.state.executed_count)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A scheduler and two single-threaded workers (`cli_helpers.start_external_cluster`), up and
    connected; yields the scheduler file, its address and a Client on it. Everything is
    killed at teardown."""
    from distributed import Client

    with start_external_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        with Client(scheduler_file=str(cluster.scheduler_file), timeout="30s") as client:
            yield {
                "scheduler_file": cluster.scheduler_file,
                "address": cluster.address,
                "client": client,
            }


def test_fit_on_an_external_cluster_equals_the_local_cluster_fit(
    external_cluster: dict[str, object], tmp_path: Path
) -> None:
    """``--scheduler tcp://127.0.0.1:PORT`` and ``--scheduler-file F`` both run on the two
    external workers (each executes tasks) and give the local-cluster parameters (max
    abs difference <= 1e-12) with the same history."""
    client = external_cluster["client"]
    data = write_array(tmp_path / "data.zarr", mixture(20_000, 4, 3, seed=12), (1000, 4))
    common = ["fit", data, "--n-components", "3", "--tol", "1e-6", "--max-iter", "60"]
    common += ["--chunk-rows", "1000"]  # 20 tasks per pass, so that both workers get some
    local = run_cli(*common, "--output", tmp_path / "local.zarr", "--quiet", *LOCAL)
    assert_ok(local)
    for option, value, name in (
        ("--scheduler", external_cluster["address"], "address.zarr"),
        ("--scheduler-file", external_cluster["scheduler_file"], "file.zarr"),
    ):
        before = executed_counts(client)
        result = run_cli(*common, "--output", tmp_path / name, option, value)
        assert_ok(result)
        assert "local Dask cluster" not in result.stderr
        after = executed_counts(client)
        assert len(after) == 2
        assert all(after[w] > before.get(w, 0) for w in after), (before, after)
        assert_same_fit(load_model(tmp_path / name), load_model(tmp_path / "local.zarr"))


def test_predict_and_score_on_an_external_cluster(
    external_cluster: dict[str, object], tmp_path: Path
) -> None:
    """``predict`` and ``score`` with ``--scheduler-file`` give the local-cluster outputs."""
    import zarr

    data = write_array(tmp_path / "data.zarr", mixture(5000, 3, 2, seed=13), (500, 3))
    fit = ["fit", data, "--n-components", "2", "--output", tmp_path / "m.zarr", "--quiet"]
    assert_ok(run_cli(*fit, "--scheduler-file", external_cluster["scheduler_file"]))
    where = {
        "external": ["--scheduler-file", str(external_cluster["scheduler_file"])],
        "local": list(LOCAL),
    }
    scores = {}
    for name, options in where.items():
        assert_ok(
            run_cli(
                "predict",
                tmp_path / "m.zarr",
                data,
                "--output",
                tmp_path / f"{name}.zarr",
                "--proba",
                "--quiet",
                *options,
            )
        )
        result = run_cli("score", tmp_path / "m.zarr", data, "--quiet", *options)
        assert_ok(result)
        scores[name] = json.loads(result.stdout)
    assert scores["external"] == scores["local"]
    external = zarr.open_array(str(tmp_path / "external.zarr"), mode="r")[...]
    local = zarr.open_array(str(tmp_path / "local.zarr"), mode="r")[...]
    assert external.shape == (5000, 2) and (external == local).all()


def test_unreachable_scheduler_exits_2_with_one_line(tmp_path: Path) -> None:
    """Nothing listens on tcp://127.0.0.1:1: after the connect timeout, status 2 and one
    line naming the address; no model written."""
    data = write_array(tmp_path / "data.zarr", mixture(500, 2, 2, seed=0))
    fit = ["fit", data, "--n-components", "2", "--output", tmp_path / "m.zarr"]
    result = run_cli(*fit, "--scheduler", "tcp://127.0.0.1:1")
    assert_usage_error(result, "cannot connect to the Dask scheduler at tcp://127.0.0.1:1")
    assert not (tmp_path / "m.zarr").exists()
