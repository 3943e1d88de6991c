"""Pictures (`dask_em.plot`, ``dask-em plot``): real PNGs checked by their pixels.

The pixel of each component's projected mean has its marker colour, points of its
1-sigma and 2-sigma ellipses (computed here from the fitted covariances) have its colour,
density contours are drawn near the means, the convergence curve passes through the
last lower bound and the criterion panel marks the best K, while far-away background is
white. The projections are computed here independently (sub-blocks for chosen features,
an SVD of the sample for principal axes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib.colors as mcolors
import matplotlib.image as mimage
import numpy as np
import pytest
from cli_helpers import LOCAL, assert_ok, assert_usage_error, run_cli, write_array
from conftest import ZarrData

from dask_em import GaussianMixture
from dask_em.io import read_model
from dask_em.plot import COLORS, CONTOUR_COLOR, Picture, render
from dask_em.reduce import RowData
from dask_em.select import select


def separated_rows(n: int, seed: int = 0) -> np.ndarray:
    """3-D rows of three well-separated, elongated components."""
    rng = np.random.default_rng(seed)
    means = np.array([[-8.0, 0.0, -6.0], [0.0, 6.0, 6.0], [8.0, -4.0, -4.0]])
    chol = np.array([[[1.5, 0, 0], [0.8, 0.6, 0], [0, 0.3, 0.7]]] * 3)
    labels = rng.integers(0, 3, n)
    return means[labels] + np.einsum("nij,nj->ni", chol[labels], rng.standard_normal((n, 3)))


def rgb(color: str) -> np.ndarray:
    return np.array(mcolors.to_rgb(color))


def image(path: str | Path) -> np.ndarray:
    """The PNG's (H, W, 3) RGB values in [0, 1]."""
    return mimage.imread(str(path))[..., :3]


def near(
    img: np.ndarray, pixel: np.ndarray, color: str, radius: int = 2, tol: float = 0.16
) -> bool:
    """Whether a pixel within ``radius`` of ``pixel`` (column, row) has ``color``."""
    col, row = np.round(pixel).astype(int)
    patch = img[row - radius : row + radius + 1, col - radius : col + radius + 1]
    return bool(np.any(np.max(np.abs(patch - rgb(color)), axis=-1) <= tol))


def ellipse(mean: np.ndarray, cov: np.ndarray, n_sigma: float, n: int = 12) -> np.ndarray:
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return mean + n_sigma * (np.c_[np.cos(t), np.sin(t)] * np.sqrt(vals)) @ vecs.T


def assert_components_drawn(
    img: np.ndarray, picture: Picture, means: np.ndarray, covs: np.ndarray
) -> None:
    """Marker colour at each mean, its colour on its ellipses, contours near the means."""
    for k, (mean, cov) in enumerate(zip(means, covs, strict=True)):
        color = COLORS[k]
        assert near(img, picture.to_pixels(mean)[0], color, radius=1), f"mean {k}"
        for n_sigma in (1.0, 2.0):
            # dashed 2-sigma lines have gaps: most, not all, of the points are on a dash
            hits = [near(img, p, color) for p in picture.to_pixels(ellipse(mean, cov, n_sigma))]
            assert sum(hits) >= (12 if n_sigma == 1.0 else 8), (k, n_sigma, hits)
        col, row = np.round(picture.to_pixels(mean)[0]).astype(int)
        ring = img[row - 40 : row + 41, col - 40 : col + 41]
        assert np.any(np.max(np.abs(ring - rgb(CONTOUR_COLOR)), axis=-1) <= 0.3), f"contour {k}"


def test_chosen_features_ellipses_and_contours_are_where_the_components_project(
    tmp_path: Path, write_zarr: Callable[..., ZarrData]
) -> None:
    """``features=(0, 2)``: means and ellipses from the covariances' (0, 2) sub-blocks."""
    store = write_zarr(separated_rows(3000), chunk_rows=280)
    gm = GaussianMixture(3, random_state=0).fit(store.path)
    gm.save(tmp_path / "m.zarr")
    params, attrs = read_model(tmp_path / "m.zarr")
    sample = RowData(store.dask()).read_rows(np.arange(0, 3000, 2))
    picture = render(tmp_path / "fig.png", params, attrs, sample, features=(0, 2))
    img = image(tmp_path / "fig.png")
    assert img.shape[:2] == picture.size[::-1]
    assert picture.panels == ("convergence", "scatter")
    pick = np.ix_([0, 2], [0, 2])
    covs = np.array([c[pick] for c in gm.covariances_])
    assert_components_drawn(img, picture, gm.means_[:, [0, 2]], covs)
    # the convergence curve ends at the last lower bound
    last = picture.to_pixels([gm.n_iter_, gm.lower_bounds_[-1]], "convergence")[0]
    assert near(img, last, COLORS[0])
    # the scatter's top-left corner, away from data, ellipses and contours, is white
    x0, y0 = sample[:, 0].min(), sample[:, 2].max()
    assert near(img, picture.to_pixels([x0, y0])[0] + [3, 3], "#ffffff", radius=0, tol=0.02)


def test_principal_axes_are_the_samples_and_the_selection_marks_its_best_k(
    tmp_path: Path,
) -> None:
    """Without ``features`` the plane is the sample's top two principal axes (checked
    against an SVD here); a selection's picture marks the best K on the criterion curve."""
    X = separated_rows(2000, seed=1)
    result = select(X, (1, 2, 3, 4), ("full", "diag"), random_state=0)
    result.best.save(tmp_path / "best.zarr", {"selection": result.summary()})
    params, attrs = read_model(tmp_path / "best.zarr")
    picture = render(tmp_path / "fig.png", params, attrs, X)
    img = image(tmp_path / "fig.png")
    assert picture.panels == ("convergence", "scatter", "criterion")
    _, _, vt = np.linalg.svd(X - X.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(picture.projection.basis), np.abs(vt[:2].T), atol=1e-10)
    basis = picture.projection.basis
    means = (params.means - X.mean(axis=0)) @ basis
    covs = np.einsum("da,kde,eb->kab", basis, result.best.covariances_, basis)
    assert result.best.n_components == 3
    assert_components_drawn(img, picture, means, covs)
    best = result.candidates[result.best_index]
    star = picture.to_pixels([best.n_components, best.bic], "criterion")[0]
    assert near(img, star, "#000000", radius=1)
    other = next(
        c for c in result.candidates if c.covariance_type == "diag" and c.n_components == 1
    )
    assert near(img, picture.to_pixels([1, other.bic], "criterion")[0], COLORS[4], radius=1)


# ---------------------------------------------------------------------------- CLI
def test_cli_plot_writes_a_png_with_the_components(tmp_path: Path) -> None:
    """``dask-em plot MODEL DATA --features 0,1`` writes a PNG whose mean pixels have
    the component colours; without DATA only the convergence panel is drawn."""
    X = separated_rows(3000, seed=2)
    data = write_array(tmp_path / "d.zarr", X, (500, 3))
    gm = GaussianMixture(3, random_state=0).fit(X)
    gm.save(tmp_path / "m.zarr")
    out = tmp_path / "fig.png"
    done = run_cli("plot", tmp_path / "m.zarr", data, "--output", out, "--features", "0,1", *LOCAL)
    assert_ok(done)
    img = image(out)
    assert img.shape[1] > img.shape[0] > 300  # two panels side by side
    # recompute the scatter's pixel map as render lays it out, from the same sample
    params, attrs = read_model(tmp_path / "m.zarr")
    rng = np.random.default_rng(0)
    sample = X[np.sort(rng.choice(3000, 3000, replace=False))]
    picture = render(tmp_path / "again.png", params, attrs, sample, features=(0, 1))
    np.testing.assert_array_equal(image(tmp_path / "again.png"), img)
    for k in range(3):
        assert near(img, picture.to_pixels(gm.means_[k, :2])[0], COLORS[k], radius=1)
    alone = run_cli("plot", tmp_path / "m.zarr", "--output", tmp_path / "curve.png")
    assert_ok(alone)
    assert image(tmp_path / "curve.png").shape[1] < img.shape[1]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--features", "0,0"], "features"), (["--features", "0,7"], "features")],
)
def test_cli_plot_bad_features_are_usage_errors(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    """Equal or out-of-range feature indices exit 2 in one line, writing nothing."""
    X = separated_rows(300)
    data = write_array(tmp_path / "d.zarr", X, (100, 3))
    GaussianMixture(2, random_state=0).fit(X).save(tmp_path / "m.zarr")
    bad = run_cli("plot", tmp_path / "m.zarr", data, "--output", tmp_path / "f.png", *args)
    assert_usage_error(bad, fragment)
    assert not (tmp_path / "f.png").exists()


def test_cli_plot_never_overwrites_a_file_that_is_not_a_png(tmp_path: Path) -> None:
    """An existing non-PNG output is refused with exit 2 and left as it was."""
    X = separated_rows(300)
    GaussianMixture(2, random_state=0).fit(X).save(tmp_path / "m.zarr")
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    bad = run_cli("plot", tmp_path / "m.zarr", "--output", precious)
    assert_usage_error(bad, "not a PNG")
    assert precious.read_text() == "keep me"
