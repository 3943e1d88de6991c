"""Model files: `GaussianMixture.save` / `dask_em.load_model` round trips, and refusals.

A model is a Zarr group of float64 arrays with JSON attributes; nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from sklearn.exceptions import ConvergenceWarning, NotFittedError

import dask_em
from dask_em.errors import DataError, OutputError
from dask_em.io import model_version_path
from dask_em.params import COVARIANCE_TYPES

FITTED = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_saved_model_loads_with_the_same_parameters_and_predictions(
    covariance_type, mixture_zarr, tmp_path
):
    gm = dask_em.GaussianMixture(
        4, covariance_type=covariance_type, random_state=0, tol=1e-4, reg_covar=1e-5
    ).fit(mixture_zarr.path)
    path = tmp_path / "model.zarr"
    gm.save(path)
    loaded = dask_em.load_model(path)

    assert isinstance(loaded, dask_em.GaussianMixture)
    for name in FITTED:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(gm, name), err_msg=name)
    assert loaded.get_params() == gm.get_params()
    assert loaded.n_features_in_ == gm.n_features_in_ == 3
    assert loaded.n_iter_ == gm.n_iter_
    assert loaded.converged_ == gm.converged_
    assert loaded.lower_bound_ == gm.lower_bound_
    assert loaded.lower_bounds_ == gm.lower_bounds_
    assert loaded.n_passes_ == gm.n_passes_
    X = mixture_zarr.X
    np.testing.assert_array_equal(loaded.predict(X), gm.predict(X))
    np.testing.assert_array_equal(loaded.predict_proba(X), gm.predict_proba(X))
    np.testing.assert_allclose(
        loaded.score_samples(mixture_zarr.dask()).compute(), gm.score_samples(X), rtol=1e-12
    )


def test_model_is_a_zarr_group_of_float64_arrays_and_json_attributes(fitted_model_path):
    root = dict(zarr.open_group(fitted_model_path, mode="r").attrs)
    assert root["format"] == "dask-em-model" and root["format_version"] == 2
    assert root["current"] == model_version_path(fitted_model_path).name
    group = zarr.open_group(model_version_path(fitted_model_path), mode="r")
    assert sorted(group.array_keys()) == sorted(
        ["weights", "means", "covariances", "precisions_cholesky"]
    )
    assert all(group[name].dtype == np.float64 for name in group.array_keys())
    attrs = dict(group.attrs)
    assert attrs["format"] == "dask-em-model" and attrs["format_version"] == 2
    for key in ("n_iter", "converged", "lower_bounds", "n_passes", "dask_em_version"):
        assert key in attrs, key
    json.dumps(attrs)  # plain JSON
    for meta in Path(fitted_model_path).rglob("zarr.json"):  # metadata is JSON, no pickle
        json.loads(meta.read_text())
    assert not any(b"pickle" in p.read_bytes() for p in Path(fitted_model_path).rglob("*.json"))


def test_warm_start_from_a_loaded_model_continues_its_fit(fitted_model_path, mixture_zarr):
    loaded = dask_em.load_model(fitted_model_path)
    loaded.set_params(warm_start=True, max_iter=3, tol=0.0)
    with pytest.warns(ConvergenceWarning):
        loaded.fit(mixture_zarr.path)
    assert loaded.n_passes_ == loaded.n_iter_ == 3


def test_saving_replaces_an_earlier_model(fitted_model_path, mixture_zarr):
    other = dask_em.GaussianMixture(2, random_state=1).fit(mixture_zarr.path)
    other.save(fitted_model_path)
    assert dask_em.load_model(fitted_model_path).n_components == 2


def test_saving_over_a_path_dask_em_did_not_write_is_refused(mixture_zarr, tmp_path):
    gm = dask_em.GaussianMixture(2, random_state=1).fit(mixture_zarr.path)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="refusing to overwrite"):
        gm.save(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="refusing to overwrite"):
        gm.save(mixture_zarr.path)  # a data array is not a model either


def test_unfitted_model_cannot_be_saved(tmp_path):
    with pytest.raises(NotFittedError):
        dask_em.GaussianMixture(2).save(tmp_path / "m.zarr")


def test_unknown_format_version_is_refused(fitted_model_path):
    group = zarr.open_group(fitted_model_path, mode="r+")
    group.attrs["format_version"] = 999
    with pytest.raises(DataError, match="format version 999"):
        dask_em.load_model(fitted_model_path)


def test_paths_that_are_not_models_are_refused(mixture_zarr, tmp_path):
    with pytest.raises(DataError, match="no such model"):
        dask_em.load_model(tmp_path / "missing.zarr")
    with pytest.raises(DataError, match="not a dask-em model"):
        dask_em.load_model(mixture_zarr.path)  # a Zarr array
    plain = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    plain.create_array("weights", data=np.ones(2))
    with pytest.raises(DataError, match="not a dask-em model"):
        dask_em.load_model(tmp_path / "group.zarr")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not a dask-em model"):
        dask_em.load_model(empty)


def test_model_with_a_missing_or_inconsistent_array_is_refused(fitted_model_path):
    group = zarr.open_group(model_version_path(fitted_model_path), mode="r+")
    del group["covariances"]
    with pytest.raises(DataError, match="lacks the array 'covariances'"):
        dask_em.load_model(fitted_model_path)
    group.create_array("covariances", data=np.ones((2, 2)))
    with pytest.raises(DataError, match="inconsistent shapes"):
        dask_em.load_model(fitted_model_path)


@pytest.fixture
def fitted_model_path(mixture_zarr, tmp_path) -> Path:
    """Path of a saved 3-component full-covariance model fitted on `mixture_zarr`."""
    path = tmp_path / "fitted.zarr"
    dask_em.GaussianMixture(3, random_state=0).fit(mixture_zarr.path).save(path)
    return path
