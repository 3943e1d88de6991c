"""`GaussianMixture`: a scikit-learn compatible estimator over the functional core.

Thin orchestration: input conversion and validation, `dask_em.em.fit_restarts` over
`dask_em.init.initialize` with every pass served by `dask_em.reduce.RowData` (the
``n_init`` initializations share each pass), checkpoints, and the fitted attributes. The Dask work runs on the active
``distributed.Client`` if there is one, else on Dask's default scheduler.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import nullcontext
from functools import partial
from typing import Any

import dask.array as da
import numpy as np
import sklearn
import zarr
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from dask_em import __version__, kernels, kernels_missing
from dask_em.checkpoint import Checkpoint, content_hash, data_fingerprint
from dask_em.choices import COMPUTE_DTYPES
from dask_em.em import ACCELERATIONS, EMResult, FitState, Iteration, fit_restarts
from dask_em.errors import (
    CheckpointWarning,
    DataError,
    EmptyComponentWarning,
    ParameterError,
    invalid_parameter,
)
from dask_em.init import INITIALIZERS, initialize
from dask_em.io import (
    check_chunk_rows,
    check_data_shape_dtype,
    open_array,
    read_model,
    row_chunked,
    write_model,
)
from dask_em.params import (
    COVARIANCE_TYPES,
    GMMParams,
    check_init_arrays,
    n_parameters,
)
from dask_em.passes import Steps
from dask_em.reduce import DEFAULT_SPLIT_EVERY, RowData, check_chunk_memory, map_rows
from dask_em.reseed import empty_weights
from dask_em.stats import ZERO_WEIGHT_SUM

RUN_SETTINGS = (
    "checkpoint_dir",
    "verbose",
    "verbose_interval",
    "chunk_rows",
    "storage_options",
    "checkpoint_lock",
    "init_model",
)
"""Parameters that say how a fit runs, not what model it makes: `GaussianMixture.save`
records them, `load_model` leaves them at their defaults (a loaded model refitted on new
data must not resume another fit's checkpoint, start from another model nor inherit
another data's chunking)."""


def information_criteria(
    mean_log_likelihood: float, n_samples: int, n_parameters: int
) -> tuple[float, float]:
    """BIC and AIC of a model whose mean log-likelihood per row on ``n_samples`` rows is given.

    Returns
    -------
    bic, aic : float
        ``-2 n L + p log n`` and ``-2 n L + 2 p`` (lower is better).
    """
    total = -2.0 * mean_log_likelihood * n_samples
    return total + n_parameters * float(np.log(n_samples)), total + 2.0 * n_parameters


def fitted_params(model: Any) -> GMMParams:
    """The parameters of a fitted ``GaussianMixture`` (dask-em's or scikit-learn's) as a
    `GMMParams` in float64 (NotFittedError if it is not fitted)."""
    check_is_fitted(model)
    return GMMParams(
        np.asarray(model.weights_, dtype=np.float64),
        np.asarray(model.means_, dtype=np.float64),
        np.asarray(model.covariances_, dtype=np.float64),
        np.asarray(model.precisions_cholesky_, dtype=np.float64),
        model.covariance_type,
    )


def warm_start_run(
    init_model: Any,
    n_components: int,
    covariance_type: str,
    n_features: int,
    storage_options: dict[str, Any] | None = None,
) -> EMResult:
    """The run a warm start from ``init_model`` continues: its parameters and lower bound.

    Parameters
    ----------
    init_model : str, path or fitted GaussianMixture
        A model written by `GaussianMixture.save` (path or URL, read with
        ``storage_options``), or a fitted ``GaussianMixture`` (dask-em's or scikit-learn's).
    n_components, covariance_type, n_features
        The shape of the fit, which the model must have.

    Returns
    -------
    EMResult
        No iteration done yet; ``lower_bound`` is the model's (``-inf`` if unknown).

    Raises
    ------
    ParameterError
        If the model has another number of components, covariance type or features.
    DataError
        If the path is not a readable model.
    """
    if isinstance(init_model, str | os.PathLike):
        params, attrs = read_model(init_model, storage_options)
        bound = attrs.get("lower_bound")
        lower_bound = float("-inf") if bound is None else float(bound)
        name = f"{os.fspath(init_model)}"
    else:
        params = fitted_params(init_model)
        lower_bound = float(getattr(init_model, "lower_bound_", float("-inf")))
        name = f"(a fitted {type(init_model).__name__})"
    shape = (params.n_components, params.covariance_type, params.n_features)
    if shape != (n_components, covariance_type, n_features):
        raise ParameterError(
            f"{{init_model}} {name} has {shape[0]} {shape[1]!r} components on {shape[2]} "
            f"features, but this fit has {{n_components}} {n_components}, covariance type "
            f"{covariance_type!r} and {n_features} features; start from a model of the "
            "same shape.",
            parameter="init_model",
        )
    return EMResult(params, lower_bound=lower_bound)


def _block_as(
    block_fn: Any, dtype: np.dtype, X: np.ndarray, params: GMMParams, *where: int
) -> np.ndarray:
    """``block_fn(X, params, *where)`` as ``dtype`` (the dtype the estimator promises);
    ``where`` is the block's ``(chunk_index, row_start)`` under `dask_em.reduce.map_rows`."""
    return np.asarray(block_fn(X, params, *where), dtype=dtype)


def check_compute_dtype(compute_dtype: Any) -> np.dtype | None:
    """``compute_dtype`` as a NumPy dtype (None stays None), or ParameterError.

    Accepts the names of `dask_em.choices.COMPUTE_DTYPES` and anything ``numpy.dtype``
    reads as one of them (``numpy.float32``, ``'f4'``).
    """
    if compute_dtype is None:
        return None
    try:
        dtype = np.dtype(compute_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in COMPUTE_DTYPES:
        raise invalid_parameter(
            "compute_dtype", compute_dtype, f"use None, {' or '.join(map(repr, COMPUTE_DTYPES))}"
        )
    return dtype


def _is_out_of_core(X: Any) -> bool:
    return isinstance(X, da.Array | zarr.Array | str | os.PathLike)


class GaussianMixture(DensityMixin, BaseEstimator):
    """Gaussian mixture fitted by map-reduce EM over chunked (Dask / Zarr) data.

    Parameters are scikit-learn's ``GaussianMixture`` ones, plus ``checkpoint_dir``,
    ``cache``, ``split_every`` and ``chunk_rows``.

    Parameters
    ----------
    n_components : int, default 1
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default 'full'
    tol : float, default 1e-3
        Convergence threshold on the change of the mean log-likelihood.
    reg_covar : float, default 1e-6
        Added to the diagonal of every covariance.
    max_iter : int, default 100
    n_init : int, default 1
        Number of initializations; the one with the best lower bound is kept.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}, default 'kmeans'
    weights_init : array of shape (K,), optional
    means_init : array of shape (K, D), optional
    precisions_init : array, optional
        Shape (K, D, D) full, (D, D) tied, (K, D) diag, (K,) spherical.
    random_state : int, RandomState or None
        Seeds every random draw; results do not depend on the number of workers.
    warm_start : bool, default False
        Continue from the fitted parameters on the next ``fit`` (``n_init`` is then 1),
        as scikit-learn: no initialization pass, and the first change is measured from
        the fitted ``lower_bound_``.
    init_model : str, path or fitted GaussianMixture, optional
        Start EM from this model's parameters (warm start from a saved model): the path
        or URL of a model written by `save`, or a fitted ``GaussianMixture`` (dask-em's or
        scikit-learn's). One run, no initialization pass; ``n_init`` must be 1. The
        model must have this ``n_components`` and ``covariance_type`` and the data's
        number of features. Its parameters are part of a checkpoint's fingerprint, so a
        checkpoint started from another model is refused. Once this estimator is fitted,
        ``warm_start=True`` continues from its own parameters instead.
    verbose : int, default 0
        1 prints each initialization; 2 also prints a line every ``verbose_interval``
        iterations (iteration, lower bound, change, seconds), all on stderr.
    verbose_interval : int, default 10
    checkpoint_dir : str or path, optional
        Directory where the state is saved atomically after the initialization and
        every iteration. A later ``fit`` with the same data and hyper-parameters resumes
        from it and ends with the same result as an uninterrupted fit; a checkpoint of
        other data or hyper-parameters is refused (`dask_em.checkpoint.CheckpointMismatch`).
        Delete the directory to start over. ``max_iter`` may differ on resume. The fit
        holds the directory's lock (`dask_em.checkpoint.checkpoint_lock`): a second fit
        on it meanwhile is refused (`dask_em.checkpoint.CheckpointLocked`).
    acceleration : {None, 'squarem'}, default None
        ``'squarem'`` extrapolates every two EM iterations (Varadhan & Roland 2008) with
        a monotonicity safeguard: fewer passes to a tight ``tol`` on overlapping
        mixtures. ``n_iter_`` and ``lower_bounds_`` count accepted iterations;
        ``n_passes_`` also counts rejected extrapolations.
    cache : {'auto', True, False}, default 'auto'
        Persist the data in the cluster's memory during ``fit``: ``'auto'`` when it takes
        less than half of the workers' total memory limit, ``True`` always, ``False``
        never (every pass reads the source).
    split_every : int, default 8
        Maximum fan-in of the tree reduction of the per-chunk statistics.
    chunk_rows : int or None, default None
        Rows per Dask task. None chooses from the data alone (`dask_em.io.choose_chunk_rows`):
        Zarr input is read in whole store chunks merged up to about 32 MiB per task,
        in-memory NumPy input is cut into about 32 MiB chunks, and a Dask array keeps
        its chunks. An integer is used as given for NumPy and Dask input and rounded up
        to a whole number of store chunks for Zarr input. The row chunks fix the
        reduction order, so they are part of a checkpoint's data fingerprint.
    storage_options : dict, optional
        fsspec options (credentials, ``endpoint_url``) of URLs (``s3://bucket/...``)
        given as ``X``, ``checkpoint_dir`` or to `save`; credentials may come from the
        environment instead.
    checkpoint_lock : bool, default True
        Hold the checkpoint's one-fit-at-a-time lock. On an object store the lock needs
        conditional writes (S3 ``If-None-Match``); a store without them is refused
        unless ``checkpoint_lock=False`` (then run one fit at a time on it yourself).
    missing : {None, 'em'}, default None
        ``'em'``: NaN marks a missing value (missing at random). Rows contribute through
        their observed values (`dask_em.kernels_missing`: exact EM on the observed-data
        likelihood); the start is drawn from the complete rows (`dask_em.init`);
        ``score_samples``, ``predict*``, ``score``, ``bic`` and ``aic`` use each row's
        observed values (marginal likelihood) and `impute` fills NaN with conditional
        means. On data without NaN the fit equals ``missing=None``'s exactly. ``None``:
        NaN is refused. A row with every value missing is refused in ``fit`` unless its
        sample weight is 0.
    compute_dtype : {None, 'float32', 'float64'}, default None
        Dtype of the per-chunk products of EM and of ``score_samples``, ``predict*``,
        ``score``, ``bic`` and ``aic``; None uses the data's own dtype. ``'float32'`` on
        float64 data runs those products in float32 (a pass 1.7x faster at 8 features
        and K=5, 1.5x at 32 features and K=16; README, Performance) while the sufficient
        statistics and the log-likelihood are still accumulated in float64, and rows
        are centered in float64 before the cast, so data far from the origin lose
        nothing more. The fitted parameters then differ from the float64 fit's by
        rounding: measured on the parity mixtures (all four covariance types, also
        shifted by 1e6) at most 7.1e-7 normwise (``max|error| / max|value|`` per array,
        the means relative to the data's spread) and 4.9e-6 elementwise (a small
        off-diagonal covariance); ``tests/test_compute_dtype.py`` holds them to 10x that.
        ``'float64'`` on float32 data computes as on the same values in float64. The
        initialization passes (``init_params``) run in the data's dtype either way.
        Not available with ``missing='em'``. Part of a checkpoint's fingerprint when
        set: a fit resumed with another ``compute_dtype`` is refused.

    Attributes
    ----------
    weights_ : ndarray of shape (K,)
    means_ : ndarray of shape (K, D)
    covariances_, precisions_, precisions_cholesky_ : ndarray
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood of the best initialization's last iteration.
    lower_bounds_ : list of float
        Lower bound of every iteration of the best initialization.
    n_passes_ : int
        Full passes over the data made by the last ``fit`` (initialization included). A
        resumed fit counts the passes committed before the stop plus those since; with
        several initializations, one cut short by the stop is redone, so its passes
        count twice.
    n_features_in_ : int

    Warns
    -----
    EmptyComponentWarning
        When a component loses all its mass during ``fit`` and is re-seeded at the
        worst-fitted row (`dask_em.reseed`; scikit-learn leaves such a component empty).
        ``lower_bounds_`` may decrease into an iteration that follows a re-seed. Also,
        once at the end of ``fit``, when components are left empty because no re-seed
        could help (e.g. more components than distinct rows).

    Notes
    -----
    Input may be a NumPy array, a Dask array, a Zarr array or the path/URL of one, or an
    array of another array-API library on the CPU (converted with ``numpy.from_dlpack``,
    also under ``sklearn.config_context(array_api_dispatch=True)``); outputs are NumPy
    (Dask for Dask and Zarr input). ``predict_proba`` returns the input's dtype (float32
    for float32 input, as scikit-learn); ``score_samples`` always float64 (the
    log-likelihood is accumulated in float64); the parameters are float64.
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        init_model: Any = None,
        verbose: int = 0,
        verbose_interval: int = 10,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        acceleration: str | None = None,
        cache: bool | str = "auto",
        split_every: int = DEFAULT_SPLIT_EVERY,
        chunk_rows: int | None = None,
        storage_options: dict[str, Any] | None = None,
        checkpoint_lock: bool = True,
        missing: str | None = None,
        compute_dtype: str | None = None,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.init_model = init_model
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.checkpoint_dir = checkpoint_dir
        self.acceleration = acceleration
        self.cache = cache
        self.split_every = split_every
        self.chunk_rows = chunk_rows
        self.storage_options = storage_options
        self.checkpoint_lock = checkpoint_lock
        self.missing = missing
        self.compute_dtype = compute_dtype

    # ------------------------------------------------------------------ checks
    def _check_hyper_parameters(self) -> None:
        def bad(name: str, rule: str) -> ParameterError:
            return invalid_parameter(name, getattr(self, name), rule)

        def is_int(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        def is_real(v: Any) -> bool:
            return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)

        if not is_int(self.n_components) or self.n_components < 1:
            raise bad("n_components", "use an integer >= 1")
        if self.covariance_type not in COVARIANCE_TYPES:
            raise bad("covariance_type", f"use one of {', '.join(COVARIANCE_TYPES)}")
        if not is_real(self.tol) or not self.tol >= 0:
            raise bad("tol", "use a number >= 0")
        if not is_real(self.reg_covar) or not self.reg_covar >= 0:
            raise bad("reg_covar", "use a number >= 0")
        if not is_int(self.max_iter) or self.max_iter < 0:
            raise bad("max_iter", "use an integer >= 0")
        if not is_int(self.n_init) or self.n_init < 1:
            raise bad("n_init", "use an integer >= 1")
        if self.init_model is not None and self.n_init != 1:
            raise ParameterError(
                f"{{init_model}} starts one run from the model's parameters, so n_init "
                f"must be 1 (got {self.n_init}); drop n_init or set it to 1.",
                parameter="init_model",
            )
        if self.init_params not in INITIALIZERS:
            raise bad("init_params", f"use one of {', '.join(INITIALIZERS)}")
        if self.acceleration not in ACCELERATIONS:
            raise bad("acceleration", "use None or 'squarem'")
        if self.cache not in ("auto", True, False):
            raise bad("cache", "use 'auto', True or False")
        if not is_int(self.split_every) or self.split_every < 2:
            raise bad("split_every", "use an integer >= 2")
        if not is_int(self.verbose_interval) or self.verbose_interval < 1:
            raise bad("verbose_interval", "use an integer >= 1")
        check_chunk_rows(self.chunk_rows)
        if self.missing not in (None, "em"):
            raise bad("missing", "use None or 'em'")
        self._compute_dtype()

    def _compute_dtype(self) -> np.dtype | None:
        """``compute_dtype`` checked (`check_compute_dtype`, and refused with ``missing``)."""
        dtype = check_compute_dtype(self.compute_dtype)
        if dtype is not None and self.missing is not None:
            raise ParameterError(
                "{compute_dtype} applies to complete rows only: drop it to use {missing}.",
                parameter="compute_dtype",
            )
        return dtype

    def _as_dask(self, X: Any, *, reset: bool) -> da.Array:
        """Validate any accepted input and return it as a row-chunked float Dask array.

        Row chunks follow ``chunk_rows`` (see the class docstring), chosen by
        `dask_em.io.open_array` for Zarr input and `dask_em.io.row_chunked` otherwise.
        """
        if isinstance(X, str | os.PathLike | zarr.Array | zarr.Group):
            X = open_array(X, chunk_rows=self.chunk_rows, storage_options=self.storage_options)
        if isinstance(X, da.Array):
            if any(np.isnan(c) for c in X.shape):
                raise DataError("X has unknown chunk sizes; call X.compute_chunk_sizes() first.")
            check_data_shape_dtype(X.shape, X.dtype, "X")
            if X.dtype not in (np.float32, np.float64):
                X = X.astype(np.float64)
            self._check_n_features(X.shape[1], reset=reset)
            return row_chunked(X, self.chunk_rows)
        finite: bool | str = True if self.missing is None else "allow-nan"
        return row_chunked(self._validate_in_memory(X, reset=reset, finite=finite), self.chunk_rows)

    def _validate_in_memory(self, X: Any, *, reset: bool, finite: bool | str = True) -> np.ndarray:
        """In-memory input as a float NumPy array (scikit-learn's checks and messages).

        ``finite=False`` lets NaN/inf through, for the kernels to refuse naming the row;
        ``'allow-nan'`` lets NaN through (``missing='em'``).

        An array of another array-API library is converted with ``numpy.from_dlpack``
        (CPU arrays); the checks then run without array-API dispatch, whose namespace
        the Dask engine does not use.
        """
        if hasattr(X, "__array_namespace__") and not isinstance(X, np.ndarray):
            try:
                X = np.from_dlpack(X)
            except (TypeError, ValueError, RuntimeError, BufferError) as err:
                raise DataError(
                    f"X is a {type(X).__module__}.{type(X).__name__} that NumPy cannot read "
                    f"({type(err).__name__}); dask-em computes with NumPy and Dask: move X to "
                    "the CPU or convert it with numpy.asarray first."
                ) from None
        with sklearn.config_context(array_api_dispatch=False):
            return validate_data(
                self,
                X,
                dtype=[np.float64, np.float32],
                reset=reset,
                ensure_min_samples=1,
                ensure_all_finite=finite,
            )

    def _check_n_features(self, n_features: int, *, reset: bool) -> None:
        if reset:
            self.n_features_in_ = int(n_features)
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif n_features != self.n_features_in_:
            raise DataError(
                f"X has {n_features} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )

    def _as_sample_weight(self, sample_weight: Any, X: da.Array) -> da.Array | None:
        if sample_weight is None:
            return None
        if isinstance(sample_weight, da.Array):
            w = sample_weight.astype(np.float64)
        else:
            w = np.asarray(sample_weight, dtype=np.float64)
            if w.ndim == 0:
                w = np.full(X.shape[0], float(w))
            if w.ndim == 1 and not np.all(np.isfinite(w)):
                raise DataError(
                    "sample_weight contains NaN or infinite values; pass finite weights.",
                    parameter="sample_weight",
                )
            if w.ndim == 1 and np.any(w < 0):
                raise DataError(
                    "sample_weight has negative values; weights must be >= 0.",
                    parameter="sample_weight",
                )
            if w.ndim == 1 and w.sum() <= 0:
                raise DataError(ZERO_WEIGHT_SUM, parameter="sample_weight")
        if w.ndim != 1 or w.shape[0] != X.shape[0]:
            raise DataError(
                f"sample_weight.shape == {tuple(w.shape)}, expected ({X.shape[0]},): "
                "one weight per row.",
                parameter="sample_weight",
            )
        if isinstance(w, np.ndarray):
            w = da.from_array(w, chunks=(X.chunks[0],))
        return w

    # ----------------------------------------------------------------- fitting
    def fit(
        self, X: Any, y: Any = None, sample_weight: Any = None, *, restart: bool = False
    ) -> GaussianMixture:
        """Estimate the parameters with EM, keeping the best of ``n_init`` initializations.

        Parameters
        ----------
        X : array-like, dask.array.Array, zarr.Array or str of shape (n_samples, n_features)
            Data; a str is the path or URL of a Zarr array.
        y : ignored
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weight of each row (multiplies its responsibilities).
        restart : bool, default False
            Discard the checkpoint in ``checkpoint_dir`` and start over. The discard and
            the fit happen under one holding of the directory's lock, so no other fit
            uses the directory in between. A directory holding anything but a
            checkpoint is refused, never deleted.

        Returns
        -------
        self
        """
        self._check_hyper_parameters()
        if restart and self.checkpoint_dir is None:
            raise ParameterError(
                "{restart} discards a checkpoint: give {checkpoint_dir} too.",
                parameter="checkpoint_dir",
            )
        Xd = self._as_dask(X, reset=True)
        n_samples, n_features = Xd.shape
        if n_samples < 2:
            raise DataError(
                f"Found array with {n_samples} sample(s) (shape={Xd.shape}) while a minimum "
                "of 2 is required by GaussianMixture."
            )
        if n_samples < self.n_components:
            raise DataError(
                f"Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {n_samples}",
                parameter="n_components",
            )
        inits = check_init_arrays(
            self.weights_init,
            self.means_init,
            self.precisions_init,
            self.n_components,
            n_features,
            self.covariance_type,
        )
        start = self._start(n_features)
        data = RowData(Xd, self._as_sample_weight(sample_weight, Xd), self.split_every)
        check_chunk_memory(data.X)
        checkpoint = self._checkpoint(data, inits, start)
        # a fit refused for its checkpoint's lock has not persisted anything
        with checkpoint.lock(restart=restart) if checkpoint is not None else nullcontext():
            best, passes = self._run(data.persisted(self.cache), inits, checkpoint, start)
        self._set_result(best, passes)
        if not self.converged_ and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. Try different init "
                "parameters, or increase max_iter, tol, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=2,
            )
        empty = empty_weights(self.weights_, n_samples)
        if empty.size:
            warnings.warn(
                f"{empty.size} of {self.n_components} components ended empty (component(s) "
                f"{', '.join(map(str, empty))} hold no data and no re-seed could help, e.g. "
                "more components than distinct rows); use fewer components.",
                EmptyComponentWarning,
                stacklevel=2,
            )
        return self

    def _start(self, n_features: int) -> EMResult | None:
        """The run a warm start continues (no initialization), or None to initialize.

        ``warm_start`` on a fitted estimator continues from its parameters; else
        ``init_model`` starts from the model's (checked to match this fit's shape).
        """
        if self.warm_start and hasattr(self, "converged_"):
            return EMResult(self._params(), lower_bound=self.lower_bound_)
        if self.init_model is None:
            return None
        return warm_start_run(
            self.init_model,
            self.n_components,
            self.covariance_type,
            n_features,
            self.storage_options,
        )

    def _run(
        self,
        data: RowData,
        inits: tuple[Any, Any, Any],
        checkpoint: Checkpoint | None,
        start: EMResult | None,
    ) -> tuple[EMResult, int]:
        """Run (or resume) the initializations to the end, or the one run that continues
        ``start`` (a warm start); return the best and the passes made."""
        loaded = checkpoint.load() if checkpoint is not None else None
        if loaded is not None:
            state, passes_before = loaded.state, loaded.n_passes
            for reason in loaded.skipped:
                warnings.warn(
                    f"checkpoint state {reason}; resuming from an older state",
                    CheckpointWarning,
                    stacklevel=3,
                )
            if self.verbose >= 1:
                print(f"Resuming {state.describe()} from {self.checkpoint_dir}", file=sys.stderr)
        else:
            random_state = check_random_state(self.random_state)
            n_init = self.n_init if start is None else 1
            seeds = tuple(int(random_state.randint(np.iinfo(np.int32).max)) for _ in range(n_init))
            state = FitState(seeds) if start is None else FitState(seeds, (start,))
            passes_before = 0

        def start(seed: int) -> Steps[GMMParams]:
            if self.verbose >= 1:
                which = state.seeds.index(seed) + 1
                print(
                    f"Initialization {which} of {len(state.seeds)} (its seed is drawn from "
                    f"random_state={self.random_state!r})",
                    file=sys.stderr,
                )
            return initialize(
                data.shape,
                self.n_components,
                self.covariance_type,
                self.reg_covar,
                self.init_params,
                seed,
                *inits,
                complete_rows=self.missing is not None,
            )

        def save(fit_state: FitState) -> None:
            if checkpoint is not None:
                checkpoint.save(fit_state, passes_before + data.n_passes)

        best = fit_restarts(
            data.map_reduce_many,
            data.read_rows,
            start,
            state,
            tol=self.tol,
            max_iter=self.max_iter,
            reg_covar=self.reg_covar,
            on_iteration=self._on_iteration,
            on_state=save,
            acceleration=self.acceleration,
            e_step=self._e_step,
        )
        return best, int(passes_before + data.n_passes)

    def _checkpoint(
        self, data: RowData, inits: tuple[Any, Any, Any], start: EMResult | None
    ) -> Checkpoint | None:
        """The checkpoint of this fit, bound to the data and the hyper-parameters that shape
        it, the parameters a warm start begins with included."""
        if self.checkpoint_dir is None:
            return None
        hyper = {
            "n_components": self.n_components,
            "covariance_type": self.covariance_type,
            "tol": float(self.tol),
            "reg_covar": float(self.reg_covar),
            "n_init": self.n_init,
            "init_params": self.init_params,
            "random_state": self.random_state if isinstance(self.random_state, int) else None,
            "split_every": self.split_every,
            "acceleration": self.acceleration,
            "weights_init": None if inits[0] is None else content_hash(inits[0])[:16],
            "means_init": None if inits[1] is None else content_hash(inits[1])[:16],
            "precisions_init": None if inits[2] is None else content_hash(inits[2])[:16],
        }
        if self.missing is not None:  # absent for None: checkpoints of earlier versions resume
            hyper["missing"] = self.missing
        compute_dtype = self._compute_dtype()
        if compute_dtype is not None:  # absent for None, as for ``missing``
            hyper["compute_dtype"] = compute_dtype.name
        if start is not None:  # absent for a cold start, as for ``missing``
            p = start.params
            hyper["init_model"] = content_hash(
                p.weights, p.means, p.covariances, p.precisions_cholesky
            )[:16]
        fingerprint = {
            "data": data_fingerprint(data.X, data.sample_weight, data.row_starts),
            "hyper_parameters": hyper,
        }
        return Checkpoint(
            self.checkpoint_dir, fingerprint, self.storage_options, self.checkpoint_lock
        )

    def _on_iteration(self, index: int, it: Iteration) -> None:
        """Progress output (``verbose >= 2``) and a warning for every re-seeded component."""
        if it.reseed is not None:
            which = f" (initialization {index + 1})" if self.n_init > 1 else ""
            warnings.warn(
                f"iteration {it.n_iter}{which}: {it.reseed.describe()}",
                EmptyComponentWarning,
                stacklevel=2,
            )
        if self.verbose >= 2:
            self._report(index, it)

    def _report(self, index: int, it: Iteration) -> None:
        if (
            it.n_iter % self.verbose_interval == 0
            or it.converged
            or it.n_iter == self.max_iter
            or it.reseed is not None
        ):
            which = f"  [init {index + 1}/{self.n_init}]" if self.n_init > 1 else ""
            print(
                f"iteration {it.n_iter:4d}  lower bound {it.lower_bound: .10g}  "
                f"change {it.change: .3e}  {it.seconds:.2f} s{which}"
                + (f"  ({it.remarks})" if it.remarks else ""),
                file=sys.stderr,
                flush=True,
            )

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> Any:
        """Fit, then return the most probable component of each row (a final E-step)."""
        return self.fit(X, sample_weight=sample_weight).predict(X)

    def _set_result(self, run: EMResult, n_passes: int) -> None:
        """Take the parameters and the history of the EM ``run`` as this fit's."""
        self._set_fitted(run.params)
        self.converged_ = bool(run.converged)
        self.n_iter_ = int(run.n_iter)
        self.lower_bound_ = float(run.lower_bound)
        self.lower_bounds_ = list(run.lower_bounds)
        self.n_passes_ = int(n_passes)

    def _set_fitted(self, params: GMMParams) -> None:
        self.weights_ = np.array(params.weights)
        self.means_ = np.array(params.means)
        self.covariances_ = np.array(params.covariances)
        self.precisions_cholesky_ = np.array(params.precisions_cholesky)
        self.precisions_ = np.array(params.precisions)

    def _params(self) -> GMMParams:
        """The fitted parameters as a `GMMParams`."""
        return fitted_params(self)

    # -------------------------------------------------------------- inference
    @property
    def _kernels(self) -> Any:
        """The inference block functions for ``missing`` and ``compute_dtype``."""
        compute_dtype = self._compute_dtype()
        return kernels_missing.MISSING_VALUES if self.missing else kernels.inference(compute_dtype)

    @property
    def _e_step(self) -> Any:
        """The E-step chunk function for ``missing`` and ``compute_dtype``."""
        compute_dtype = self._compute_dtype()
        return kernels_missing.em_chunk_missing if self.missing else kernels.e_step(compute_dtype)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = self.missing is not None
        return tags

    def _evaluate(self, X: Any, block_fn: Any, dtype: Any, n_cols: int | None = None) -> Any:
        """``block_fn`` over the rows of ``X``, its output as ``dtype`` (None: the dtype of
        the validated input, float32 or float64), for NumPy and Dask alike."""
        params = self._params()
        if _is_out_of_core(X):
            Xd = self._as_dask(X, reset=False)
            out = np.dtype(Xd.dtype if dtype is None else dtype)
            return map_rows(Xd, partial(_block_as, block_fn, out), params, out, n_cols)
        # NaN/inf rows are refused by the kernel, naming the first (as for Dask input)
        Xn = self._validate_in_memory(X, reset=False, finite=False)
        return _block_as(block_fn, np.dtype(Xn.dtype if dtype is None else dtype), Xn, params)

    def score_samples(self, X: Any) -> Any:
        """Log-likelihood ``log p(x)`` of each row: shape (n_samples,), lazy for Dask/Zarr input.

        With ``missing='em'``, ``log p(x_o)`` of each row's observed values (0 for a row
        with every value missing).

        Always float64, as the log-likelihood is accumulated (scikit-learn returns
        float32 for float32 input).
        """
        return self._evaluate(X, self._kernels.score_samples_block, np.float64)

    def predict(self, X: Any) -> Any:
        """Most probable component of each row: shape (n_samples,) (lazy for Dask/Zarr input)."""
        return self._evaluate(X, self._kernels.predict_block, np.int64)

    def predict_proba(self, X: Any) -> Any:
        """Responsibilities: shape (n_samples, K), lazy for Dask/Zarr input.

        In the input's dtype: float32 for float32 input (computed in float32, as
        scikit-learn does), float64 otherwise.
        """
        return self._evaluate(X, self._kernels.predict_proba_block, None, self.n_components)

    def impute(self, X: Any) -> Any:
        """Conditional-mean imputation: each NaN replaced by ``E[x_m | x_o]`` under the
        fitted mixture (`dask_em.kernels_missing.impute_block`).

        Parameters
        ----------
        X : array-like of shape (n_samples, D)
            NaN marks a missing value; observed values are returned unchanged.

        Returns
        -------
        ndarray or dask.array.Array of shape (n_samples, D)
            In the input's dtype, without NaN; lazy for Dask/Zarr input. A row with
            every value missing gets the mixture's mean.
        """
        return self._evaluate(X, kernels_missing.impute_block, None, self.n_features_in_)

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood per row (computed, also for Dask/Zarr input)."""
        return float(np.asarray(self.score_samples(X).mean()))

    def _n_parameters(self) -> int:
        return n_parameters(self.n_components, self.means_.shape[1], self.covariance_type)

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on ``X`` (lower is better)."""
        return information_criteria(self.score(X), self._n_rows(X), self._n_parameters())[0]

    def aic(self, X: Any) -> float:
        """Akaike information criterion on ``X`` (lower is better)."""
        return information_criteria(self.score(X), self._n_rows(X), self._n_parameters())[1]

    def _n_rows(self, X: Any) -> int:
        if _is_out_of_core(X):
            return int(self._as_dask(X, reset=False).shape[0])
        return int(np.shape(X)[0])

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n_samples`` rows from the fitted mixture (scikit-learn's algorithm and stream).

        Returns
        -------
        X : ndarray of shape (n_samples, D)
        y : ndarray of shape (n_samples,)
            Component of each row.
        """
        check_is_fitted(self)
        if n_samples < 1:
            raise ParameterError(
                f"Invalid value for 'n_samples': {n_samples}. The sampling requires at "
                "least one sample.",
                parameter="n_samples",
            )
        _, n_features = self.means_.shape
        rng = check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, self.weights_)
        if self.covariance_type == "full":
            parts = [
                rng.multivariate_normal(mean, cov, int(c))
                for mean, cov, c in zip(self.means_, self.covariances_, counts, strict=True)
            ]
        elif self.covariance_type == "tied":
            parts = [
                rng.multivariate_normal(mean, self.covariances_, int(c))
                for mean, c in zip(self.means_, counts, strict=True)
            ]
        else:
            parts = [
                mean + rng.standard_normal(size=(c, n_features)) * np.sqrt(cov)
                for mean, cov, c in zip(self.means_, self.covariances_, counts, strict=True)
            ]
        labels = np.concatenate([np.full(c, j, dtype=int) for j, c in enumerate(counts)])
        return np.vstack(parts), labels

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        """Write the fitted model as a Zarr group (no pickle); see `load_model`.

        ``path`` may be an fsspec URL, written with ``storage_options``. ``extra``: more
        JSON-ready attributes to store with the model (e.g. the ``selection`` table of
        `dask_em.select`), read back by `dask_em.io.read_model`.
        """
        params = self._params()
        hyper = {
            k: v
            for k, v in self.get_params(deep=False).items()
            if isinstance(v, bool | int | float | str) or v is None
        }
        if not isinstance(self.random_state, int | type(None)):
            hyper["random_state"] = None
        compute_dtype = self._compute_dtype()
        if compute_dtype is not None:  # numpy.float32 is saved by its name
            hyper["compute_dtype"] = compute_dtype.name
        write_model(
            path,
            params,
            {
                "hyper_parameters": hyper,
                "n_iter": self.n_iter_,
                "converged": self.converged_,
                "lower_bound": self.lower_bound_,
                "lower_bounds": [float(b) for b in self.lower_bounds_],
                "n_passes": self.n_passes_,
                "dask_em_version": __version__,
                **(extra or {}),
            },
            storage_options=self.storage_options,
        )


def load_model(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> GaussianMixture:
    """Read a model written by `GaussianMixture.save` into a fitted `GaussianMixture`.

    The hyper-parameters that shape the model are restored; the `RUN_SETTINGS`
    (``checkpoint_dir``, ``verbose``, ``verbose_interval``, ``chunk_rows``) keep their
    defaults, so a loaded model refitted on new data starts no other fit's checkpoint.
    ``path`` may be an fsspec URL, read with ``storage_options`` (kept by the model).
    """
    params, attrs = read_model(path, storage_options)
    known = set(GaussianMixture().get_params()) - set(RUN_SETTINGS)
    hyper = {k: v for k, v in attrs.get("hyper_parameters", {}).items() if k in known}
    hyper["covariance_type"] = params.covariance_type
    hyper["n_components"] = params.n_components
    gm = GaussianMixture(**hyper, storage_options=storage_options)
    gm._set_fitted(params)
    gm.n_features_in_ = params.n_features
    gm.converged_ = bool(attrs.get("converged", False))
    gm.n_iter_ = int(attrs.get("n_iter", 0))
    bound = attrs.get("lower_bound")
    gm.lower_bound_ = float("-inf") if bound is None else float(bound)
    gm.lower_bounds_ = [float(b) for b in attrs.get("lower_bounds", [])]
    gm.n_passes_ = int(attrs.get("n_passes", 0))
    return gm
