"""Segment an RGB image stored as tiles in Zarr by its pixel colours, out of core.

The image is an (H, W, 3) uint8 Zarr array chunked in tiles. Each tile becomes a block
of rows (its pixels as RGB in [0, 1]) without loading the image: the rows are the tiles
flattened one after another (`pixel_rows`), so a Dask chunk of rows is one tile. A
`dask_em.GaussianMixture` is fitted to these rows; the labels are mapped back tile by
tile (`label_image`) into an (H, W) Zarr array with the image's tiling, and a PNG
preview draws each segment in its mean colour (from a strided view of the labels, so
the preview stays small for any image).

    python examples/segment_image.py --workdir seg           # scikit-learn's china.jpg
    python examples/segment_image.py --workdir seg --image IMAGE.zarr --n-components 6
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from sklearn.exceptions import ConvergenceWarning

from dask_em import GaussianMixture

PREVIEW_MAX_SIDE = 1024
"""Largest side of the preview PNG in pixels (the labels are strided down to it)."""


def store_image(image: np.ndarray, path: str | Path, tile: int = 128) -> str:
    """Write an (H, W, 3) uint8 image to a new Zarr array of (tile, tile, 3) chunks."""
    z = zarr.create_array(
        store=str(path), shape=image.shape, chunks=(tile, tile, 3), dtype=np.uint8
    )
    z[...] = image
    return str(path)


def _tile_slices(chunks: tuple[tuple[int, ...], ...]) -> list[tuple[slice, slice]]:
    """The (rows, columns) slices of every tile, tile rows first."""
    starts = [np.cumsum((0, *c)) for c in chunks[:2]]
    return [
        (slice(int(r0), int(r1)), slice(int(c0), int(c1)))
        for r0, r1 in zip(starts[0][:-1], starts[0][1:], strict=True)
        for c0, c1 in zip(starts[1][:-1], starts[1][1:], strict=True)
    ]


def pixel_rows(image: da.Array) -> da.Array:
    """The pixels of a tiled (H, W, 3) image as (H*W, 3) float64 rows in [0, 1], tile by tile.

    Each tile is one chunk of rows (its pixels in row-major order), so no tile is read
    before a pass needs it and none is rechunked.
    """
    return da.concatenate(
        [
            image[r, c].reshape(-1, 3).astype(np.float64) / 255.0
            for r, c in _tile_slices(image.chunks)
        ]
    )


def label_image(labels: da.Array, chunks: tuple[tuple[int, ...], ...]) -> da.Array:
    """Per-row labels in `pixel_rows` order as an (H, W) image with the tiles ``chunks``."""
    rows, cols = chunks[0], chunks[1]
    blocks, start = [], 0
    for h in rows:
        band = []
        for w in cols:
            band.append(labels[start : start + h * w].reshape(h, w))
            start += h * w
        blocks.append(band)
    return da.block(blocks).rechunk((rows, cols)).astype(np.uint8)


def preview(labels: da.Array, colors: np.ndarray, path: str | Path) -> tuple[int, int]:
    """A PNG of the labels, each drawn in its colour, strided to at most `PREVIEW_MAX_SIDE`.

    Returns the (height, width) of the preview.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1, -(-max(labels.shape) // PREVIEW_MAX_SIDE))
    small = np.asarray(labels[::step, ::step].compute())
    rgb = np.clip(colors, 0.0, 1.0)[small]
    plt.imsave(str(path), rgb)
    return small.shape


def segment(
    image_path: str | Path,
    workdir: str | Path,
    n_components: int,
    *,
    random_state: int = 0,
    **fit_params: Any,
) -> GaussianMixture:
    """Fit the pixels of the tiled image at ``image_path``; write ``labels.zarr`` (H, W)
    uint8 with the image's tiling and ``preview.png`` under ``workdir``.

    ``fit_params`` go to `dask_em.GaussianMixture` (e.g. ``means_init``).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    image = da.from_zarr(str(image_path))
    if image.ndim != 3 or image.shape[2] != 3:
        raise SystemExit(f"{image_path}: expected an (H, W, 3) RGB array, got {image.shape}")
    rows = pixel_rows(image)
    gm = GaussianMixture(n_components, random_state=random_state, **fit_params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(rows)
    labels = label_image(gm.predict(rows), image.chunks)
    labels.to_zarr(str(workdir / "labels.zarr"), overwrite=True)
    preview(da.from_zarr(str(workdir / "labels.zarr")), gm.means_, workdir / "preview.png")
    return gm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="segment-demo", help="where outputs go")
    parser.add_argument(
        "--image", help="a tiled (H, W, 3) uint8 Zarr array (default: china.jpg stored as tiles)"
    )
    parser.add_argument("--tile", type=int, default=128, help="tile side for china.jpg")
    parser.add_argument("--n-components", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.image is None:
        from sklearn.datasets import load_sample_image

        args.image = store_image(load_sample_image("china.jpg"), workdir / "china.zarr", args.tile)
    began = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        gm = segment(args.image, workdir, args.n_components, random_state=args.seed)
    image = zarr.open_array(args.image, mode="r")
    print(
        f"{image.shape[0]} x {image.shape[1]} pixels in tiles of {image.chunks[:2]}: "
        f"{args.n_components} segments, {gm.n_iter_} iterations, {gm.n_passes_} passes, "
        f"{time.perf_counter() - began:.1f} s"
    )
    for k in np.argsort(-gm.weights_):
        r, g, b = np.round(255 * np.clip(gm.means_[k], 0, 1)).astype(int)
        print(
            f"segment {k}: {100 * gm.weights_[k]:5.1f}% of pixels, mean colour #{r:02x}{g:02x}{b:02x}"
        )
    print(f"wrote {workdir / 'labels.zarr'} and {workdir / 'preview.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
