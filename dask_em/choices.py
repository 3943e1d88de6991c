"""The names of the choices dask-em accepts, and the defaults its command shows.

A module that imports nothing, so that the ``dask-em`` argument parser (choices and
defaults in its help) builds without importing NumPy, Dask or scikit-learn: the help
and usage errors answer at once. The modules that implement the choices import their
names from here (`dask_em.params`, `dask_em.init`, `dask_em.select`,
`dask_em.datasets`); a test checks that each registry holds exactly these names.
"""

from __future__ import annotations

COVARIANCE_TYPES: tuple[str, ...] = ("full", "tied", "diag", "spherical")
"""The covariance types (`dask_em.params.COVARIANCE` holds their facts)."""

INIT_PARAMS: tuple[str, ...] = ("kmeans", "k-means++", "random", "random_from_data")
"""The initialization methods (`dask_em.init.INITIALIZERS` holds their functions)."""

CRITERIA: tuple[str, ...] = ("bic", "aic")
"""The information criteria `dask_em.select.select` can minimize."""

COMPUTE_DTYPES: tuple[str, ...] = ("float32", "float64")
"""The dtypes the per-chunk products of EM and inference may run in (``compute_dtype``;
`dask_em.kernels`)."""

CLUSTERS: tuple[str, ...] = ("auto", "local", "threads", "slurm")
"""Where the work runs (`dask_em.cluster.choose_cluster`)."""

CLI_N_INIT = 3
"""Initializations the ``dask-em`` command and its demo use by default (sharing passes).

Measured with ``benchmarks/fit_quality.py`` (24 mixtures x 3 seeds): one and three
initializations are never clearly worse than scikit-learn's best of 10, at the same
median passes (6), and three halve the worst gap (4.1e-3 against 9.5e-3 nats/sample)
for three times the in-memory compute of the start."""

STORE_CHUNK_ROWS = 250_000
"""Default rows per chunk of a generated store (2 MB per chunk and feature in float64)."""
