"""Shared fixtures: mixture data written to real Zarr stores, initial parameters, clusters.

Everything here is generic and meant to be reused by any test module:

- `make_mixture` (factory fixture): a reproducible, overlapping Gaussian mixture in memory.
- `write_zarr` (factory fixture): writes rows to a Zarr array on disk under ``tmp_path``,
  with many row chunks and (by default) an uneven last chunk.
- `mixture_zarr`: a ready-made 2,000 x 3 four-component dataset in a 16-chunk Zarr store.
- `given_inits` (factory fixture): deterministic ``weights_init``/``means_init``/
  ``precisions_init`` for a covariance type, for fits that bypass the initializers.
- `dask_cluster` (session) and `dask_client`: a real multi-process
  ``distributed.LocalCluster`` (2 worker processes, 1 thread each) and a Client on it that
  is the default scheduler only for the duration of one test.
- `parity_log`: records measured errors; they are printed in pytest's terminal summary.

No mocks: the stores are real Zarr v3 directories and the schedulers real Dask schedulers.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr


# --------------------------------------------------------------------------- data
def mixture_rows(
    n_samples: int,
    n_features: int,
    n_components: int,
    seed: int,
    separation: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn from a random, overlapping Gaussian mixture (independent of dask_em).

    Parameters
    ----------
    n_samples, n_features, n_components : int
    seed : int
    separation : float
        Standard deviation of the component means; components have covariances of
        scale about 1, so 2.0 gives clearly overlapping but identifiable components.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float64
    labels : ndarray of shape (n_samples,)
    """
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(n_components, 4.0))
    means = rng.normal(scale=separation, size=(n_components, n_features))
    a = rng.normal(size=(n_components, n_features, n_features))
    covariances = a @ np.swapaxes(a, 1, 2) / n_features + 0.3 * np.eye(n_features)
    labels = rng.choice(n_components, size=n_samples, p=weights)
    chol = np.linalg.cholesky(covariances)
    z = rng.standard_normal((n_samples, n_features))
    X = means[labels] + np.einsum("nij,nj->ni", chol[labels], z)
    return X, labels


@pytest.fixture
def make_mixture() -> Callable[..., np.ndarray]:
    """Factory ``make_mixture(n_samples=2000, n_features=3, n_components=4, seed=0,
    separation=2.0) -> X``: rows of a reproducible overlapping mixture (see `mixture_rows`)."""

    def make(
        n_samples: int = 2000,
        n_features: int = 3,
        n_components: int = 4,
        seed: int = 0,
        separation: float = 2.0,
    ) -> np.ndarray:
        return mixture_rows(n_samples, n_features, n_components, seed, separation)[0]

    return make


@dataclass(frozen=True)
class ZarrData:
    """Rows stored in a Zarr array on disk, with the same rows in memory.

    Attributes
    ----------
    path : str
        Directory of the Zarr array.
    X : ndarray of shape (n, D)
        The stored rows (what an in-memory oracle such as scikit-learn is given).
    chunk_rows : int
        Rows per chunk of the store (the last chunk holds the remainder).
    """

    path: str
    X: np.ndarray
    chunk_rows: int

    @property
    def n_chunks(self) -> int:
        """Number of row chunks of the store."""
        return -(-self.X.shape[0] // self.chunk_rows)

    def open(self) -> zarr.Array:
        """The store as a read-only ``zarr.Array``."""
        return zarr.open_array(self.path, mode="r")

    def dask(self) -> da.Array:
        """The store as a lazy Dask array (one Dask chunk per Zarr chunk)."""
        return da.from_zarr(self.path)


@pytest.fixture
def write_zarr(tmp_path: Path) -> Callable[..., ZarrData]:
    """Factory ``write_zarr(X, chunk_rows=130, *, uneven=True, dtype=None) -> ZarrData``.

    Writes ``X`` (cast to ``dtype`` if given) to a new Zarr v3 array under ``tmp_path``,
    chunked by ``chunk_rows`` rows with all features in one chunk. With ``uneven=True``
    (the default) it checks that the last chunk is shorter than the others, since
    partial last chunks are where off-by-one errors in chunked code live.
    """
    counter = itertools.count()

    def write(
        X: np.ndarray, chunk_rows: int = 130, *, uneven: bool = True, dtype: object = None
    ) -> ZarrData:
        X = np.asarray(X if dtype is None else np.asarray(X).astype(dtype))
        if uneven:
            assert X.shape[0] % chunk_rows, "the last chunk should be uneven"
        path = str(tmp_path / f"data-{next(counter)}.zarr")
        z = zarr.create_array(
            store=path, shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype=X.dtype
        )
        z[...] = X
        return ZarrData(path, X.copy(), chunk_rows)

    return write


@pytest.fixture
def mixture_zarr(
    make_mixture: Callable[..., np.ndarray], write_zarr: Callable[..., ZarrData]
) -> ZarrData:
    """2,000 rows x 3 features of a 4-component overlapping mixture in a Zarr store of
    16 row chunks (15 of 130 rows, the last of 50)."""
    return write_zarr(make_mixture(2000, 3, 4, seed=0), 130)


@pytest.fixture
def given_inits() -> Callable[..., dict[str, np.ndarray]]:
    """Factory ``given_inits(X, n_components, covariance_type, seed=0) -> dict``.

    Deterministic ``weights_init`` (uniform), ``means_init`` (distinct random rows of
    ``X``) and ``precisions_init`` (inverse of the data's covariance, in the layout of
    the covariance type), as keyword arguments for both scikit-learn's and dask-em's
    ``GaussianMixture``. With all three given, neither runs an initializer, so the two
    start from exactly the same parameters.
    """

    def inits(
        X: np.ndarray, n_components: int, covariance_type: str, seed: int = 0
    ) -> dict[str, np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        rng = np.random.default_rng(seed)
        n_features = X.shape[1]
        means = X[rng.choice(X.shape[0], n_components, replace=False)]
        cov = np.cov(X, rowvar=False).reshape(n_features, n_features)
        prec = np.linalg.inv(cov)
        prec = 0.5 * (prec + prec.T)
        diag = 1.0 / np.diag(cov)
        precisions = {
            "full": np.repeat(prec[None], n_components, axis=0),
            "tied": prec,
            "diag": np.repeat(diag[None], n_components, axis=0),
            "spherical": np.full(n_components, float(diag.mean())),
        }[covariance_type]
        return {
            "weights_init": np.full(n_components, 1.0 / n_components),
            "means_init": means,
            "precisions_init": precisions,
        }

    return inits


# ------------------------------------------------------------------- clusters
@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    """A hive-partitioned Parquet dataset of the first three dates
    (`warehouse_helpers.write_date`), written by DuckDB."""
    from warehouse_helpers import write_date

    root = tmp_path / "warehouse"
    for day in range(3):
        write_date(root, day)
    return root


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[object]:
    """A real multi-process ``distributed.LocalCluster``: 2 worker processes, 1 thread each.

    Session-scoped (starting worker processes takes seconds). The workers import
    dask_em before the first test, so that import time is not charged to a test. Tests
    should not use it directly as the default scheduler: use `dask_client`.
    """
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    try:
        with Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(2)
            client.run(importlib.import_module, "dask_em")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def dask_client(dask_cluster: object) -> Iterator[object]:
    """A ``distributed.Client`` on `dask_cluster`, the active client for one test only."""
    from distributed import Client

    with Client(dask_cluster) as client:
        yield client


# -------------------------------------------------------------- measurements
_PARITY_ROWS: list[tuple[str, str, dict[str, float]]] = []


class ParityLog:
    """Collects measured errors; `pytest_terminal_summary` prints them after the run."""

    def record(self, scenario: str, covariance_type: str, **errors: float) -> None:
        """Record the errors of one comparison (``name=value`` pairs)."""
        _PARITY_ROWS.append((scenario, covariance_type, {k: float(v) for k, v in errors.items()}))


@pytest.fixture(scope="session")
def parity_log() -> ParityLog:
    """Recorder of measured parity errors, reported in pytest's terminal summary."""
    return ParityLog()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the parity errors measured during the run (one line per comparison)."""
    if not _PARITY_ROWS:
        return
    terminalreporter.section("measured errors (max relative unless stated)")
    for scenario, cov_type, errors in _PARITY_ROWS:
        values = "  ".join(f"{k}={v:.2e}" for k, v in errors.items())
        terminalreporter.write_line(f"{scenario:<30} {cov_type:<10} {values}")
