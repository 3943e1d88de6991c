"""Model selection (`dask_em.select`): every candidate in shared passes.

Each candidate's parameters, history and criteria equal those of the same
``GaussianMixture`` fitted alone; the selection's pass count is the slowest candidate's
(plus one scoring pass), not the sum; a selection interrupted after a checkpoint (an
exception right after a save, and a real SIGKILL of ``dask-em select``) resumes to the
uninterrupted result; and the CLI round trip writes the best model and the table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_usage_error,
    kill_group,
    mixture,
    peek_checkpoint,
    run_cli,
    start_cli,
    wait_for,
    write_array,
)
from conftest import ParityLog, ZarrData

from dask_em import GaussianMixture, load_model
from dask_em.checkpoint import Checkpoint
from dask_em.em import FitState
from dask_em.io import read_model
from dask_em.params import PARAM_ARRAYS
from dask_em.select import SelectionResult, select

KS = (1, 2, 3, 4)


@pytest.fixture
def store(write_zarr: Callable[..., ZarrData], make_mixture: Callable[..., np.ndarray]) -> ZarrData:
    """2,000 x 3 rows of a 3-component mixture in a Zarr store of 16 row chunks."""
    return write_zarr(make_mixture(2000, 3, 3, seed=5), chunk_rows=130)


def assert_same_result(a: SelectionResult, b: SelectionResult) -> None:
    """Identical candidates (parameters, histories, criteria) and the same best."""
    assert a.best_index == b.best_index
    for x, y in zip(a.candidates, b.candidates, strict=True):
        assert (x.n_components, x.covariance_type) == (y.n_components, y.covariance_type)
        assert x.lower_bounds == y.lower_bounds and x.n_iter == y.n_iter
        assert x.bic == y.bic and x.aic == y.aic
        for name in PARAM_ARRAYS:
            np.testing.assert_array_equal(getattr(x.params, name), getattr(y.params, name))


@pytest.mark.parametrize("n_init", [1, 2])
def test_each_candidate_equals_its_fit_alone_and_passes_are_the_slowest_ones(
    store: ZarrData, n_init: int, parity_log: ParityLog
) -> None:
    """Shared passes change nothing a candidate computes (<= 1e-12), and the selection
    reads the data as often as its slowest candidate alone, plus one scoring pass."""
    result = select(store.path, KS, ("full", "diag"), random_state=3, n_init=n_init, chunk_rows=130)
    assert len(result.candidates) == 2 * len(KS)
    alone_passes, worst = [], 0.0
    for c in result.candidates:
        gm = GaussianMixture(
            c.n_components,
            covariance_type=c.covariance_type,
            random_state=3,
            n_init=n_init,
            chunk_rows=130,
        ).fit(store.path)
        alone_passes.append(gm.n_passes_)
        for name in PARAM_ARRAYS:
            expected = getattr(gm, f"{name}_")
            err = float(np.max(np.abs(getattr(c.params, name) - expected)))
            worst = max(worst, err / max(1.0, float(np.max(np.abs(expected)))))
        assert c.lower_bounds == gm.lower_bounds_ and c.n_iter == gm.n_iter_
        assert c.bic == pytest.approx(gm.bic(store.X), rel=1e-12)
        assert c.aic == pytest.approx(gm.aic(store.X), rel=1e-12)
    assert worst <= 1e-12
    assert result.n_passes == max(alone_passes) + 1 < sum(alone_passes)
    parity_log.record(
        f"select n_init={n_init} vs alone",
        "full,diag",
        params=worst,
        passes=result.n_passes,
        alone_max=max(alone_passes),
        alone_sum=sum(alone_passes),
    )
    best = result.candidates[result.best_index]
    assert best.bic == min(c.bic for c in result.candidates)
    assert (result.best.n_components, result.best.covariance_type) == (
        best.n_components,
        best.covariance_type,
    )
    np.testing.assert_array_equal(result.best.means_, best.params.means)
    assert result.best.n_passes_ == result.n_passes


def test_aic_picks_the_lowest_aic(store: ZarrData) -> None:
    """``criterion='aic'`` chooses the candidate of least AIC."""
    result = select(store.X, KS, "full", criterion="aic", random_state=0)
    assert result.best_index == int(np.argmin([c.aic for c in result.candidates]))
    assert result.summary()["criterion"] == "aic"


class Interrupted(Exception):
    """Raised right after a real checkpoint save (a simulated crash)."""


def test_selection_interrupted_after_a_save_resumes_to_the_uninterrupted_result(
    store: ZarrData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A selection stopped right after its 4th saved state resumes from it and ends with
    the numbers and the pass count of an uninterrupted selection."""
    settings = {"random_state": 1, "chunk_rows": 130, "tol": 1e-4}
    reference = select(store.path, KS, ("full", "diag"), **settings)
    real_save, saves = Checkpoint.save, [0]

    def save(self: Checkpoint, state: FitState, n_passes: int) -> None:
        real_save(self, state, n_passes)
        saves[0] += 1
        if saves[0] == 4:
            raise Interrupted

    monkeypatch.setattr(Checkpoint, "save", save)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):
        select(store.path, KS, ("full", "diag"), checkpoint_dir=ckpt, **settings)
    monkeypatch.undo()
    loaded = Checkpoint(ckpt, {}).load(check_fingerprint=False)
    assert loaded is not None and not loaded.state.done
    resumed = select(store.path, KS, ("full", "diag"), checkpoint_dir=ckpt, **settings)
    assert_same_result(resumed, reference)
    assert resumed.n_passes == reference.n_passes


def test_a_checkpoint_of_other_candidates_is_refused(store: ZarrData, tmp_path: Path) -> None:
    """Resuming with other candidates names the difference (hyper-parameters)."""
    ckpt = tmp_path / "ckpt"
    select(store.path, (1, 2), "diag", checkpoint_dir=ckpt, random_state=0)
    with pytest.raises(ValueError, match="select"):
        select(store.path, (1, 3), "diag", checkpoint_dir=ckpt, random_state=0)


def test_bad_choices_are_one_line_errors(store: ZarrData) -> None:
    """Empty or repeated candidates and unknown criteria are refused before any pass."""
    with pytest.raises(ValueError, match="n_components"):
        select(store.X, [], "full")
    with pytest.raises(ValueError, match="once"):
        select(store.X, (2, 2), "full")
    with pytest.raises(ValueError, match="covariance_type"):
        select(store.X, (2,), ("full", "banana"))
    with pytest.raises(ValueError, match="criterion"):
        select(store.X, (2,), "full", criterion="icl")
    with pytest.raises(ValueError, match="n_components"):
        select(store.X[:3], (1, 5), "full")
    with pytest.raises(ValueError, match="int random_state"):
        select(store.X, (1, 2), "full", random_state=None, checkpoint_dir="never-made")
    assert not Path("never-made").exists()


# ---------------------------------------------------------------------------- CLI
def test_cli_select_writes_the_best_model_table_and_summary(tmp_path: Path) -> None:
    """``dask-em select`` prints the table, writes the best model with the selection in
    its attributes, and its JSON summary names the same best as the library."""
    X = mixture(3000, 2, 3, seed=4)
    data = write_array(tmp_path / "d.zarr", X, (500, 2))
    out = tmp_path / "best.zarr"
    args = ["--n-components", "1-4", "--covariance-type", "full,diag", "--seed", "2", *LOCAL]
    shown = run_cli("select", data, *args, "--output", out, "--quiet")
    assert_ok(shown)
    assert "covariance" in shown.stdout and "best by BIC" in shown.stdout
    assert len([line for line in shown.stdout.splitlines() if line.startswith("*")]) == 1
    as_json = run_cli(
        "select", data, *args, "--output", tmp_path / "again.zarr", "--json", "--quiet"
    )
    assert_ok(as_json)
    summary = json.loads(as_json.stdout)
    expected = select(data, range(1, 5), ("full", "diag"), random_state=2)
    assert summary["best"] == {
        "n_components": expected.best.n_components,
        "covariance_type": expected.best.covariance_type,
    }
    assert summary["n_passes"] == expected.n_passes
    assert [c["bic"] for c in summary["candidates"]] == pytest.approx(
        [c.bic for c in expected.candidates], rel=1e-12
    )
    gm = load_model(out)
    np.testing.assert_allclose(gm.means_, expected.best.means_, rtol=0, atol=1e-12)
    _, attrs = read_model(out)
    assert attrs["selection"]["best"] == summary["best"]


def test_cli_select_bad_ranges_are_usage_errors(tmp_path: Path) -> None:
    """A malformed ``--n-components`` or ``--covariance-type`` exits 2 in one line."""
    data = write_array(tmp_path / "d.zarr", mixture(200, 2, 2, seed=0))
    bad = run_cli("select", data, "--n-components", "5-2", "--output", tmp_path / "m.zarr")
    assert_usage_error(bad, "--n-components", "5-2")
    bad = run_cli("select", data, "--covariance-type", "full,box", "--output", tmp_path / "m")
    assert_usage_error(bad, "--covariance-type", "full,box")
    assert not (tmp_path / "m.zarr").exists()


@pytest.mark.slow
def test_cli_select_killed_with_sigkill_resumes_to_the_uninterrupted_result(
    tmp_path: Path,
) -> None:
    """SIGKILL ``dask-em select`` once its checkpoint holds a few passes; the same
    command then resumes and writes the model and summary of an uninterrupted run."""
    data = write_array(tmp_path / "d.zarr", mixture(60_000, 4, 4, seed=1), (5_000, 4))
    common = [data, "--n-components", "1-5", "--tol", "1e-6", "--max-iter", "60", *LOCAL]
    reference = run_cli("select", *common, "--output", tmp_path / "ref.zarr", "--json", "--quiet")
    assert_ok(reference)
    ckpt, out = tmp_path / "ckpt", tmp_path / "best.zarr"
    command = ["select", *common, "--output", out, "--checkpoint-dir", ckpt, "--json", "--quiet"]
    process = start_cli(*command)

    def passes() -> int:
        loaded = peek_checkpoint(ckpt)
        return -1 if loaded is None else loaded.n_passes

    try:
        wait_for(lambda: process.poll() is not None or passes() >= 8, 180, "8 saved passes")
        assert process.poll() is None, "the selection ended before it could be killed"
    finally:
        kill_group(process)
    killed = Checkpoint(ckpt, {}).load(check_fingerprint=False)
    assert killed is not None and not killed.state.done
    resumed = run_cli(*command)
    assert_ok(resumed)
    got, want = json.loads(resumed.stdout), json.loads(reference.stdout)
    for key in ("best", "n_passes", "candidates"):
        assert got[key] == want[key], key
    a, b = load_model(out), load_model(tmp_path / "ref.zarr")
    np.testing.assert_array_equal(a.means_, b.means_)
    np.testing.assert_array_equal(a.covariances_, b.covariances_)
