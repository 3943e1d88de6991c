"""Rows per task: `dask_em.io.choose_chunk_rows` and the ``chunk_rows`` option.

- The automatic choice merges whole store chunks up to ``TASK_TARGET_BYTES`` per task,
  keeps store chunks that are already big enough, never cuts a store chunk in two and
  never makes a task above 128 MiB; it depends on the data alone.
- ``chunk_rows`` sets the rows per task: rounded up to whole store chunks for Zarr
  input, used as given for NumPy and Dask input; bad values raise ValueError.
- A fit on a store of tiny chunks runs far fewer tasks than there are store chunks and
  equals the fit with one task per store chunk to ~1e-10 (only the order of the sums
  differs), and the fit of the same rows stored in big chunks exactly.
- The row chunks are part of a checkpoint's fingerprint: resuming with other rows per
  task is refused, resuming with the same automatic choice is accepted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import ZarrData
from dask.callbacks import Callback

import dask_em
from dask_em.checkpoint import CheckpointMismatch
from dask_em.io import TASK_TARGET_BYTES, choose_chunk_rows, open_array, read_model

MiB = 2**20
PARAMS = ("weights_", "means_", "covariances_", "precisions_cholesky_")


class TaskCounter(Callback):
    """Counts the tasks run by Dask's local schedulers whose key names ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.count = name, 0

    def _pretask(self, key: object, dsk: object, state: object) -> None:
        self.count += self.name in str(key)


# ------------------------------------------------------------------ choose_chunk_rows rules
@pytest.mark.parametrize(
    ("n_rows", "n_features", "itemsize", "store_rows"),
    list(
        itertools.product(
            [1, 999, 10**5, 2 * 10**6, 10**8],
            [1, 8, 100, 5000],
            [4, 8],
            [1, 7, 500, 2000, 65_536, 10**6],
        )
    ),
)
def test_automatic_rows_are_whole_store_chunks_at_most_the_target(
    n_rows, n_features, itemsize, store_rows
):
    rows = choose_chunk_rows(n_rows, n_features, itemsize, store_rows)
    assert 1 <= rows <= n_rows
    assert rows % store_rows == 0 or rows == n_rows  # no store chunk read by two tasks
    row_bytes = n_features * itemsize
    store_bytes = store_rows * row_bytes
    if store_bytes >= TASK_TARGET_BYTES:
        assert rows == min(store_rows, n_rows)  # big enough already: kept as stored
    else:
        assert rows * row_bytes <= TASK_TARGET_BYTES <= 128 * MiB  # the memory cap
        # merged as far as the target allows (or all rows in one task)
        assert rows == n_rows or rows * row_bytes > TASK_TARGET_BYTES - store_bytes


def test_tiny_store_chunks_are_merged_and_big_ones_kept():
    # 2M x 8 float64 in 2,000-row (125 KiB) chunks: 262 chunks (32 MiB) per task
    assert choose_chunk_rows(2_000_000, 8, 8, 2000) == 524_000
    assert choose_chunk_rows(2_000_000, 8, 4, 2000) == 1_048_000  # float32: twice the rows
    assert choose_chunk_rows(2_000_000, 8, 8, 500_000) == 500_000  # 30.5 MiB: kept
    assert choose_chunk_rows(2_000_000, 8, 8, 1_000_000) == 1_000_000  # 61 MiB: kept, not cut
    assert choose_chunk_rows(2_000_000, 8, 8, 2_000_000) == 2_000_000
    assert choose_chunk_rows(20_000, 3, 8, 130) == 20_000  # small data: one task
    assert choose_chunk_rows(2_000_000, 8, 8, 1) == TASK_TARGET_BYTES // 64  # in-memory rows


def test_explicit_chunk_rows_are_rounded_up_to_whole_store_chunks():
    assert choose_chunk_rows(10_000, 8, 8, 500, chunk_rows=1200) == 1500
    assert choose_chunk_rows(10_000, 8, 8, 500, chunk_rows=1500) == 1500
    assert choose_chunk_rows(10_000, 8, 8, 500, chunk_rows=1) == 500  # never cut a store chunk
    assert choose_chunk_rows(10_000, 8, 8, 1, chunk_rows=1234) == 1234  # in-memory: as given
    assert choose_chunk_rows(10_000, 8, 8, 500, chunk_rows=10**9) == 10_000  # one task at most
    # the user's choice is not capped: a task of 10 GiB if asked
    assert choose_chunk_rows(10**9, 8, 8, 1000, chunk_rows=10**8 + 1) == 10**8 + 1000


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100", np.float64(10.0)])
def test_bad_chunk_rows_are_refused(bad, mixture_zarr):
    with pytest.raises(ValueError, match="chunk_rows.*integer >= 1"):
        choose_chunk_rows(1000, 3, 8, 100, chunk_rows=bad)
    with pytest.raises(ValueError, match="Invalid value for 'chunk_rows'.*integer >= 1"):
        dask_em.GaussianMixture(2, chunk_rows=bad).fit(mixture_zarr.X)


# ----------------------------------------------------------------- opening inputs
def test_zarr_input_is_opened_in_whole_store_chunks(write_zarr, make_mixture):
    data = write_zarr(make_mixture(20_000, 3, 2), 500, uneven=False)
    assert open_array(data.path).chunks[0] == (20_000,)
    assert open_array(data.path, chunk_rows=1200).chunks[0] == (1500,) * 13 + (500,)
    gm = dask_em.GaussianMixture(chunk_rows=4000)
    for source in (data.path, data.open()):
        assert gm._as_dask(source, reset=True).chunks[0] == (4000,) * 5


def test_numpy_and_dask_inputs_follow_chunk_rows(make_mixture):
    X = make_mixture(5000, 3, 2)
    auto, given = dask_em.GaussianMixture(), dask_em.GaussianMixture(chunk_rows=1200)
    assert auto._as_dask(X, reset=True).chunks == ((5000,), (3,))
    assert given._as_dask(X, reset=True).chunks[0] == (1200,) * 4 + (200,)
    Xd = da.from_array(X, chunks=(700, 1))
    assert auto._as_dask(Xd, reset=True).chunks[0] == Xd.chunks[0]  # the user's chunks
    assert given._as_dask(Xd, reset=True).chunks == ((1200,) * 4 + (200,), (3,))


def test_chunk_rows_is_a_run_setting_recorded_with_the_model_not_restored(
    tmp_path: Path, make_mixture
):
    """``chunk_rows`` is a parameter, recorded in the saved model; a loaded model chooses
    the rows per task of the data it is given (the saved value was tuned to other data)."""
    gm = dask_em.GaussianMixture(2, chunk_rows=321, random_state=0, max_iter=3, tol=0.0)
    assert gm.get_params()["chunk_rows"] == 321
    with pytest.warns(Warning):
        gm.fit(make_mixture(1000, 2, 2))
    gm.save(tmp_path / "m.zarr")
    assert read_model(tmp_path / "m.zarr")[1]["hyper_parameters"]["chunk_rows"] == 321
    assert dask_em.load_model(tmp_path / "m.zarr").chunk_rows is None


# ------------------------------------------------------------------- fits
@pytest.fixture
def tiny_and_big(
    write_zarr: Callable[..., ZarrData], make_mixture: Callable[..., np.ndarray]
) -> tuple[ZarrData, ZarrData]:
    """The same 30,000 x 4 rows stored in 500-row chunks (60 of them) and in one chunk."""
    X = make_mixture(30_000, 4, 3, seed=5)
    return write_zarr(X, 500, uneven=False), write_zarr(X, 30_000, uneven=False)


def test_fit_on_tiny_store_chunks_uses_few_tasks_and_matches(tiny_and_big, given_inits):
    tiny, big = tiny_and_big
    params = dict(n_components=3, tol=1e-8, max_iter=30, cache=False)
    params.update(given_inits(tiny.X, 3, "full"))

    def fit(path: str, **extra: object) -> tuple[dask_em.GaussianMixture, int]:
        with dask.config.set(scheduler="threads"), TaskCounter("em_chunk") as counter:
            gm = dask_em.GaussianMixture(**params, **extra).fit(path)
        return gm, counter.count

    auto, auto_tasks = fit(tiny.path)
    per_store_chunk, many_tasks = fit(tiny.path, chunk_rows=tiny.chunk_rows)
    big_chunks, _ = fit(big.path)
    assert auto.n_iter_ == per_store_chunk.n_iter_ >= 5
    assert auto_tasks == auto.n_iter_  # one task per iteration
    assert many_tasks == per_store_chunk.n_iter_ * tiny.n_chunks  # 60 per iteration
    for name in PARAMS:
        np.testing.assert_allclose(
            getattr(auto, name), getattr(per_store_chunk, name), rtol=1e-10, err_msg=name
        )
        np.testing.assert_array_equal(getattr(auto, name), getattr(big_chunks, name), name)


def test_checkpoint_binds_the_rows_per_task(tiny_and_big, tmp_path: Path):
    tiny, _ = tiny_and_big
    params = dict(n_components=3, random_state=0, tol=0.0, max_iter=3)
    params["checkpoint_dir"] = tmp_path / "ckpt"
    with pytest.warns(Warning, match="did not converge"):
        first = dask_em.GaussianMixture(**params).fit(tiny.path)
    with pytest.raises(CheckpointMismatch, match="row_chunks"):
        dask_em.GaussianMixture(chunk_rows=1000, **params).fit(tiny.path)
    with pytest.warns(Warning, match="did not converge"):
        again = dask_em.GaussianMixture(**params).fit(tiny.path)  # the same automatic rows
    assert again.n_passes_ == first.n_passes_  # the finished fit, read from the checkpoint
    for name in PARAMS:
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name), name)
