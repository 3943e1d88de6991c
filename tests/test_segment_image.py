"""Image segmentation at scale (examples/segment_image.py) on scikit-learn's china.jpg.

The bundled sample image is stored as uneven tiles in Zarr; the example fits its pixels
tile by tile and writes a tiled label image and a preview. From the same initial
parameters, its parameters equal an in-memory scikit-learn fit on the pixels (rel.
error <= 1e-7), its labels equal scikit-learn's pixel for pixel, the label image keeps
the image's tiling, and the preview draws each pixel in its segment's mean colour.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image as mimage
import numpy as np
import pytest
import zarr
from conftest import ParityLog
from oracle import fit_sklearn, rel_err, same_inits
from sklearn.datasets import load_sample_image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import segment_image  # noqa: E402

K = 4


@pytest.fixture(scope="module")
def china() -> np.ndarray:
    """scikit-learn's bundled china.jpg, (427, 640, 3) uint8 (no download)."""
    return load_sample_image("china.jpg")


def test_tiled_segmentation_equals_sklearn_from_the_same_start(
    china: np.ndarray, tmp_path: Path, parity_log: ParityLog
) -> None:
    path = segment_image.store_image(china, tmp_path / "china.zarr", tile=100)
    X = china.reshape(-1, 3).astype(np.float64) / 255.0
    rng = np.random.default_rng(0)
    inits = same_inits(X, "full", X[rng.choice(len(X), K, replace=False)])
    settings = {"covariance_type": "full", "tol": 1e-4, "max_iter": 200, **inits}
    gm = segment_image.segment(path, tmp_path / "out", K, **settings)
    sk = fit_sklearn(X, n_components=K, **settings)

    errors = {
        "weights": rel_err(gm.weights_, sk.weights_),
        "means": rel_err(gm.means_, sk.means_),
        "covariances": rel_err(gm.covariances_, sk.covariances_),
    }
    assert gm.n_iter_ == sk.n_iter_
    assert max(errors.values()) <= 1e-7, errors
    labels = zarr.open_array(str(tmp_path / "out" / "labels.zarr"), mode="r")
    assert labels.shape == china.shape[:2] and labels.chunks == (100, 100)
    got = labels[...]
    expected = sk.predict(X).reshape(china.shape[:2])
    mismatched = int(np.count_nonzero(got != expected))
    parity_log.record("china.jpg segmentation", "full", **errors, label_mismatches=mismatched)
    assert mismatched == 0

    preview = mimage.imread(str(tmp_path / "out" / "preview.png"))[..., :3]
    assert preview.shape[:2] == china.shape[:2]
    np.testing.assert_allclose(preview, np.clip(gm.means_, 0, 1)[got], atol=1 / 255 + 1e-9)


def test_example_runs_on_the_bundled_image(tmp_path: Path) -> None:
    """``python examples/segment_image.py --workdir DIR`` tiles china.jpg, segments it and
    reports every segment; its outputs exist with the image's shape."""
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "segment_image.py"),
            "--workdir",
            str(tmp_path),
            "--n-components",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("segment ") >= 3 and "427 x 640 pixels" in done.stdout
    labels = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")
    assert labels.shape == (427, 640) and labels.chunks == (128, 128)
    assert set(np.unique(labels[...])) <= {0, 1, 2}
