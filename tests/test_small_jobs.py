"""Small jobs are quick: lazy imports and the in-process threaded scheduler.

- ``import dask_em.cli`` (what ``dask-em --help`` and a usage error need) imports neither
  distributed nor scikit-learn, Zarr, matplotlib or pyarrow (checked in a fresh
  interpreter; no timing is asserted);
- the names the parser offers (`dask_em.choices`) are exactly the library's registries;
- ``--cluster auto`` (the default) runs small data in threads and says so in one line
  and in ``--json``; local-cluster options choose the local cluster; ``--cluster
  threads`` refuses local-cluster and scheduler options as a usage error;
- a fit on threads equals the same fit on a local cluster of worker processes (max abs
  difference <= 1e-12, same history).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_same_fit,
    assert_usage_error,
    mixture,
    run_cli,
    write_array,
)

from dask_em import choices, load_model
from dask_em.cluster import AUTO_THREADS_FRACTION, choose_cluster, machine_memory
from dask_em.init import INITIALIZERS
from dask_em.params import COVARIANCE

HEAVY = ("distributed", "sklearn", "zarr", "matplotlib", "pyarrow", "duckdb", "dask.array")
"""Packages that ``import dask_em.cli`` must not import (each costs a good fraction of a
second, distributed and scikit-learn whole seconds on a busy machine)."""


def test_importing_the_command_loads_no_heavy_package() -> None:
    """A fresh interpreter importing ``dask_em.cli`` and building its parser has none of
    `HEAVY` in ``sys.modules``; ``import dask_em`` neither, until ``GaussianMixture`` is used."""
    probe = (
        "import sys, json, dask_em.cli; dask_em.cli.build_parser(); import dask_em; "
        "before = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{[h.split('.')[0] for h in HEAVY]!r} or m in {list(HEAVY)!r}); "
        "dask_em.GaussianMixture; "
        "print(json.dumps([before, 'sklearn' in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    loaded, sklearn_after = json.loads(result.stdout)
    assert [m for m in loaded if m in HEAVY or m.split(".")[0] in HEAVY] == []
    assert sklearn_after  # the estimator is there when asked for


def test_parser_choices_are_the_library_registries() -> None:
    """`dask_em.choices` names exactly the covariance types and initializers the library
    implements (the parser offers them without importing it)."""
    assert tuple(COVARIANCE) == choices.COVARIANCE_TYPES
    assert tuple(INITIALIZERS) == choices.INIT_PARAMS


def test_auto_chooses_threads_for_small_data_and_a_local_cluster_otherwise() -> None:
    """``'auto'``: threads under `AUTO_THREADS_FRACTION` of the memory, a local cluster
    above it or for data of unknown size; a given scheduler or local-cluster shape decides."""
    memory = machine_memory()
    assert choose_cluster("auto", 1e6).kind == "threads"
    assert choose_cluster("auto", 1e6).chosen
    assert choose_cluster("auto", AUTO_THREADS_FRACTION * memory * 1.01).kind == "local"
    assert choose_cluster("auto", None).kind == "local"
    assert choose_cluster("auto", 1e6, local_options=True).kind == "local"
    assert choose_cluster("auto", 1e6, scheduler="tcp://h:1").kind == "scheduler"
    assert choose_cluster("local", 1e6).kind == "local"
    assert choose_cluster("threads", 1e12).kind == "threads"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """20k rows of a 3-component mixture in 4 dimensions, chunks of 2000 rows."""
    root = tmp_path_factory.mktemp("small")
    return write_array(root / "data.zarr", mixture(20_000, 4, 3, seed=21), (2000, 4))


FIT = ("--n-components", "3", "--tol", "1e-6", "--max-iter", "50", "--n-init", "2")


def test_auto_fit_of_small_data_runs_in_threads_and_says_so(data: str, tmp_path: Path) -> None:
    """The default ``--cluster auto`` fit of small data runs in threads: one line on
    stderr, ``"cluster": "threads"`` in ``--json``, no local cluster started."""
    threads = run_cli("fit", data, *FIT, "--output", tmp_path / "t.zarr", "--json")
    assert_ok(threads)
    assert json.loads(threads.stdout)["cluster"] == "threads"
    said = [line for line in threads.stderr.splitlines() if line.startswith("running on")]
    assert len(said) == 1 and "in-process threads" in said[0], threads.stderr
    assert "local Dask cluster" not in threads.stderr


@pytest.mark.slow
def test_fit_on_threads_equals_the_fit_on_a_local_cluster(data: str, tmp_path: Path) -> None:
    """``--cluster threads`` and a local cluster of worker processes give the same fit
    (max abs difference <= 1e-12, identical history); local-cluster options choose the
    local cluster without a line about the choice."""
    threads = run_cli("fit", data, *FIT, "--output", tmp_path / "t.zarr", "--cluster", "threads")
    assert_ok(threads)
    local = run_cli("fit", data, *FIT, "--output", tmp_path / "l.zarr", "--json", *LOCAL)
    assert_ok(local)
    assert json.loads(local.stdout)["cluster"] == "local"
    assert "running on" not in local.stderr  # the options chose, not the data's size
    assert_same_fit(load_model(tmp_path / "t.zarr"), load_model(tmp_path / "l.zarr"))


def test_threads_refuses_local_cluster_and_scheduler_options(data: str, tmp_path: Path) -> None:
    """``--cluster threads`` with ``--n-workers`` or ``--scheduler`` is a usage error."""
    fit = ["fit", data, *FIT, "--output", tmp_path / "m.zarr", "--cluster", "threads"]
    assert_usage_error(run_cli(*fit, "--n-workers", "2"), "--n-workers", "--cluster threads")
    assert_usage_error(run_cli(*fit, "--scheduler", "tcp://127.0.0.1:1"), "--scheduler")
