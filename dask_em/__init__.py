"""dask-em: distributed, out-of-core EM for Gaussian mixture models on Zarr and Dask.

The public API is `GaussianMixture` (scikit-learn compatible), `load_model` and
`EmptyComponentWarning` (a component was re-seeded, see `dask_em.reseed`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dask-em")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from dask_em.errors import EmptyComponentWarning  # noqa: E402
from dask_em.estimator import GaussianMixture, load_model  # noqa: E402

__all__ = ["EmptyComponentWarning", "GaussianMixture", "load_model", "__version__"]
