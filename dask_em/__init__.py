"""dask-em: distributed, out-of-core EM for Gaussian mixture models on Zarr and Dask.

The public API is `GaussianMixture` (scikit-learn compatible), `load_model` and
`EmptyComponentWarning` (a component was re-seeded, see `dask_em.reseed`).

`GaussianMixture` and `load_model` are imported on first use (module ``__getattr__``),
so that ``import dask_em.cli`` (the ``dask-em`` command's help and usage errors)
does not import scikit-learn, Zarr and distributed.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("dask-em")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from dask_em.errors import EmptyComponentWarning  # noqa: E402

__all__ = ["EmptyComponentWarning", "GaussianMixture", "load_model", "__version__"]

_LAZY = ("GaussianMixture", "load_model")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from dask_em import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module 'dask_em' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
