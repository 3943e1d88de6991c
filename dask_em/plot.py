"""Pictures of a fitted model: convergence, components over the data, criterion against K.

`render` draws, on one PNG, up to three panels:

- the convergence curve: the lower bound per iteration (of the kept initialization, or
  one line per candidate for a model written by ``dask-em select``);
- a scatter of a sample of rows on two chosen features or on the sample's top two
  principal axes, with each component's 1-sigma and 2-sigma ellipses (the projection of
  its covariance) in its own colour, its mean marked, and contours of the projected
  mixture density;
- for a model written by `dask_em.select`, the criterion (BIC or AIC) against K, one
  line per covariance type.

matplotlib is imported here only (the ``plot`` extra), with the Agg backend. `render`
returns a `Picture` saying where data coordinates land in the PNG's pixels, so a test
can check pixels. The sample rows are read with `dask_em.reduce.RowData.read_rows`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dask_em.errors import DataError, OutputError, ParameterError  # noqa: E402
from dask_em.params import GMMParams  # noqa: E402

COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#17becf",
    "#e377c2",
    "#8c564b",
    "#bcbd22",
    "#7f7f7f",
)
"""Colour of component ``k`` (cycled): matplotlib's tab10, most contrasting first."""

CONTOUR_COLOR = "#000000"
"""Colour of the mixture-density contours."""

POINT_COLOR = "#b0b0b0"
"""Colour of the sample rows."""

DPI = 100

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png_output(path: str | os.PathLike[str]) -> None:
    """Raise OutputError if ``path`` exists and is not a PNG file (never replace an input)."""
    if os.path.lexists(path):
        try:
            with open(path, "rb") as f:
                is_png = f.read(len(PNG_MAGIC)) == PNG_MAGIC
        except OSError:
            is_png = False
        if not is_png:
            raise OutputError(
                f"{os.fspath(path)!r} exists and is not a PNG picture; refusing to overwrite "
                "it: choose another output path."
            )


def full_covariances(params: GMMParams) -> np.ndarray:
    """Every component's covariance as a full matrix.

    Returns
    -------
    ndarray of shape (K, D, D)
    """
    k, d = params.means.shape
    cov = np.asarray(params.covariances, dtype=np.float64)
    if params.covariance_type == "full":
        return cov
    if params.covariance_type == "tied":
        return np.broadcast_to(cov, (k, d, d)).copy()
    if params.covariance_type == "diag":
        return np.einsum("kd,de->kde", cov, np.eye(d))
    return cov[:, None, None] * np.eye(d)[None]


@dataclass(frozen=True)
class Projection:
    """A linear map of rows to the two plotted coordinates: ``(x - center) @ basis``.

    Attributes
    ----------
    center : ndarray of shape (D,)
    basis : ndarray of shape (D, 2)
    labels : (str, str)
        Axis labels.
    """

    center: np.ndarray
    basis: np.ndarray
    labels: tuple[str, str]

    def __call__(self, X: np.ndarray) -> np.ndarray:
        """Rows (n, D) as plotted points (n, 2)."""
        return (np.asarray(X, dtype=np.float64) - self.center) @ self.basis

    def covariances(self, params: GMMParams) -> np.ndarray:
        """The components' covariances in the plotted plane: shape (K, 2, 2)."""
        return np.einsum("da,kde,eb->kab", self.basis, full_covariances(params), self.basis)


def check_features(n_features: int, features: tuple[int, int] | None) -> None:
    """Raise ParameterError unless ``features`` is None or two different indices < ``n_features``."""
    if features is None:
        if n_features == 1:
            raise ParameterError("features are needed for a picture of 1-feature data.")
        return
    i, j = features
    if not (0 <= i < n_features and 0 <= j < n_features) or i == j:
        raise ParameterError(
            f"features={tuple(features)!r} is invalid: give two different feature indices "
            f"in 0..{n_features - 1}."
        )


def projection(
    n_features: int, features: tuple[int, int] | None, sample: np.ndarray | None
) -> Projection:
    """Features ``(i, j)`` as they are, or else the sample's top two principal axes.

    Raises
    ------
    ParameterError
        If a feature index is out of range or both are the same.
    """
    check_features(n_features, features)
    if features is not None:
        i, j = features
        basis = np.zeros((n_features, 2))
        basis[i, 0] = basis[j, 1] = 1.0
        return Projection(np.zeros(n_features), basis, (f"feature {i}", f"feature {j}"))
    assert sample is not None
    center = sample.mean(axis=0)
    _, _, vt = np.linalg.svd(sample - center, full_matrices=False)
    basis = vt[:2].T.copy()
    # each axis points where its largest loading is positive (a sign-stable picture)
    basis *= np.sign(basis[np.abs(basis).argmax(axis=0), [0, 1]])
    return Projection(center, basis, ("principal axis 1", "principal axis 2"))


def ellipse_points(mean: np.ndarray, cov: np.ndarray, n_sigma: float, n: int) -> np.ndarray:
    """``n`` points of the ``n_sigma`` ellipse of a 2-D Gaussian: shape (n, 2)."""
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)
    return mean + n_sigma * (circle * np.sqrt(np.maximum(vals, 0.0))) @ vecs.T


def mixture_density(
    points: np.ndarray, weights: np.ndarray, means: np.ndarray, covs: np.ndarray
) -> np.ndarray:
    """Density of a 2-D Gaussian mixture at ``points`` (..., 2)."""
    out = np.zeros(points.shape[:-1])
    for w, m, c in zip(weights, means, covs, strict=True):
        diff = points - m
        inv = np.linalg.inv(c)
        q = np.einsum("...a,ab,...b->...", diff, inv, diff)
        out += w * np.exp(-0.5 * q) / (2.0 * np.pi * np.sqrt(np.linalg.det(c)))
    return out


@dataclass(frozen=True)
class Picture:
    """Where things were drawn in the written PNG (pixel rows from the top).

    Attributes
    ----------
    path : str
    size : (int, int)
        Width and height in pixels.
    projection : Projection or None
        The scatter panel's map of rows to plotted points (None without data).
    maps : dict of str to ndarray of shape (3, 2)
        For each panel drawn (``convergence``, ``scatter``, ``criterion``, left to
        right), the affine map of its data coordinates to pixels:
        ``[x, y, 1] @ maps[panel] -> (column, row)``.
    """

    path: str
    size: tuple[int, int]
    projection: Projection | None
    maps: dict[str, np.ndarray]

    @property
    def panels(self) -> tuple[str, ...]:
        """The panels drawn, left to right."""
        return tuple(self.maps)

    def to_pixels(self, points: np.ndarray, panel: str = "scatter") -> np.ndarray:
        """Points (n, 2) of ``panel``'s data coordinates as (column, row) pixels (n, 2)."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return np.c_[points, np.ones(len(points))] @ self.maps[panel]


def _pixel_map(fig: Any, ax: Any) -> np.ndarray:
    """The affine map data -> (column, row from the top) of ``ax`` as laid out."""
    height = fig.get_size_inches()[1] * fig.dpi
    corners = ax.transData.transform(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    corners[:, 1] = height - corners[:, 1]
    origin = corners[0]
    return np.array([corners[1] - origin, corners[2] - origin, origin])


def render(
    path: str | os.PathLike[str],
    params: GMMParams,
    attrs: dict[str, Any],
    sample: np.ndarray | None = None,
    features: tuple[int, int] | None = None,
) -> Picture:
    """Draw the model's panels into the PNG ``path``.

    Parameters
    ----------
    path : str or path
        The PNG to write.
    params : GMMParams
    attrs : dict
        The model's attributes (`dask_em.io.read_model`): ``lower_bounds`` and, for a
        selection, ``selection``.
    sample : ndarray of shape (m, D), optional
        Rows to scatter; without them there is no scatter panel.
    features : (int, int), optional
        Features to plot; default the sample's top two principal axes.

    Returns
    -------
    Picture
    """
    selection = attrs.get("selection")
    panels = ["convergence"]
    if sample is not None:
        panels.append("scatter")
    if selection is not None:
        panels.append("criterion")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), dpi=DPI)
    axes = np.atleast_1d(axes)
    by_name = dict(zip(panels, axes, strict=True))

    ax = by_name["convergence"]
    if selection is not None:
        for c in selection["candidates"]:
            bounds = [np.nan if b is None else b for b in c["lower_bounds"]]
            best = (c["n_components"], c["covariance_type"]) == (
                selection["best"]["n_components"],
                selection["best"]["covariance_type"],
            )
            ax.plot(
                range(1, len(bounds) + 1),
                bounds,
                color="black" if best else "#999999",
                linewidth=2.0 if best else 0.7,
                label="best candidate" if best else None,
            )
        ax.legend(loc="lower right")
        ax.set_title("lower bound per iteration, every candidate")
    else:
        bounds = [np.nan if b is None else b for b in attrs.get("lower_bounds", [])]
        ax.plot(range(1, len(bounds) + 1), bounds, marker="o", color=COLORS[0])
        ax.set_title("lower bound per iteration")
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean log-likelihood per row")

    proj = None
    if sample is not None:
        ax = by_name["scatter"]
        proj = projection(params.n_features, features, sample)
        points = proj(sample)
        means = proj(params.means)
        covs = proj.covariances(params)
        ax.scatter(points[:, 0], points[:, 1], s=3, color=POINT_COLOR, linewidths=0, zorder=1)
        low, high = points.min(axis=0), points.max(axis=0)
        pad = 0.05 * (high - low)
        gx, gy = np.meshgrid(
            np.linspace(low[0] - pad[0], high[0] + pad[0], 200),
            np.linspace(low[1] - pad[1], high[1] + pad[1], 200),
        )
        density = mixture_density(np.stack([gx, gy], axis=-1), params.weights, means, covs)
        levels = np.quantile(density, [0.6, 0.75, 0.85, 0.93, 0.98])
        ax.contour(
            gx,
            gy,
            density,
            levels=np.unique(levels),
            colors=CONTOUR_COLOR,
            linewidths=0.6,
            zorder=2,
        )
        for k in range(params.n_components):
            color = COLORS[k % len(COLORS)]
            vals, vecs = np.linalg.eigh(covs[k])
            angle = float(np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1])))
            for n_sigma, style in ((1.0, "-"), (2.0, "--")):
                width, height = 2 * n_sigma * np.sqrt(np.maximum(vals[::-1], 0.0))
                ax.add_patch(
                    Ellipse(
                        tuple(means[k]),
                        width,
                        height,
                        angle=angle,
                        fill=False,
                        edgecolor=color,
                        linestyle=style,
                        linewidth=2.0,
                        zorder=3,
                    )
                )
            ax.plot(
                *means[k],
                marker="o",
                markersize=9,
                color=color,
                zorder=4,
                label=f"component {k} (w={params.weights[k]:.2f})",
            )
        ax.set_xlim(low[0] - pad[0], high[0] + pad[0])
        ax.set_ylim(low[1] - pad[1], high[1] + pad[1])
        ax.set_xlabel(proj.labels[0])
        ax.set_ylabel(proj.labels[1])
        ax.set_title(f"{len(sample)} rows, 1\u03c3/2\u03c3 ellipses, density contours")
        if params.n_components <= 10:
            ax.legend(loc="best", fontsize="small")

    if selection is not None:
        ax = by_name["criterion"]
        name = selection["criterion"]
        for t in dict.fromkeys(c["covariance_type"] for c in selection["candidates"]):
            rows = [c for c in selection["candidates"] if c["covariance_type"] == t]
            ax.plot([c["n_components"] for c in rows], [c[name] for c in rows], marker="o", label=t)
        best = selection["best"]
        value = next(
            c[name]
            for c in selection["candidates"]
            if (c["n_components"], c["covariance_type"])
            == (best["n_components"], best["covariance_type"])
        )
        ax.plot(
            [best["n_components"]],
            [value],
            marker="*",
            markersize=18,
            color="black",
            linestyle="none",
            label=f"best: {best['covariance_type']}, K={best['n_components']}",
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("number of components K")
        ax.set_ylabel(name.upper())
        ax.set_title(f"{name.upper()} against K (lower is better)")
        ax.legend()

    fig.tight_layout()
    check_png_output(path)
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    maps = {name: _pixel_map(fig, ax) for name, ax in by_name.items()}
    width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
    plt.close(fig)
    return Picture(os.fspath(path), (int(width), int(height)), proj, maps)


def sample_rows(data: Any, n_rows: int, seed: int) -> np.ndarray:
    """Up to ``n_rows`` rows of ``data`` (a `dask_em.reduce.RowData`) drawn without
    replacement with ``seed``: shape (m, D) float64.

    Raises
    ------
    DataError
        If a sampled row holds NaN or infinity.
    """
    n = data.shape[0]
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(n, size=min(n_rows, n), replace=False))
    rows = data.read_rows(indices)
    if not np.all(np.isfinite(rows)):
        raise DataError("the sampled rows hold NaN or infinite values; plot finite data.")
    return rows
