"""Small jobs: end-to-end wall time of ``dask-em fit`` against a plain scikit-learn script.

Both run as fresh subprocesses on the same Zarr store (written first by
`dask_em.datasets.generate`: ``--features`` float64 features drawn from a
``--components``-component mixture), so imports, cluster start-up and reading the data
count, as they do for a batch job:

- ``dask-em fit DATA --n-components K --n-init 1 --output M --json --quiet``: the
  command with its default options (``--cluster auto``), one initialization as
  scikit-learn's default;
- the script: ``zarr.open_array`` → ``np.asarray`` → ``GaussianMixture(K, tol, max_iter)
  .fit``.

The same K, ``tol`` and ``max_iter``; each engine starts from its own k-means, so the
iteration counts are printed beside the times. Also timed: ``dask-em --help`` and a
usage error (answered without importing the library). ``--local`` adds a row with
``--cluster local`` (the embedded cluster of worker processes, the default before).

    OPENBLAS_NUM_THREADS=1 python benchmarks/small_jobs.py            # 200k and 2M rows
    OPENBLAS_NUM_THREADS=1 python benchmarks/small_jobs.py --big      # and 20M (1.3 GB)
    python benchmarks/small_jobs.py --small                           # a few thousand rows
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SKLEARN_SCRIPT = """
import json, sys, zarr, numpy as np
from sklearn.mixture import GaussianMixture
path, k, tol, max_iter = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
X = np.asarray(zarr.open_array(path, mode="r"))
gm = GaussianMixture(k, tol=tol, max_iter=max_iter, random_state=0).fit(X)
print(json.dumps({"n_iter": int(gm.n_iter_), "converged": bool(gm.converged_)}))
"""


def dask_em() -> list[str]:
    """The ``dask-em`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("dask-em")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dask_em.cli"]


def timed(argv: list[str], ok: int = 0) -> tuple[float, str]:
    """Run ``argv``; return its wall seconds and stdout (fail unless it exits with ``ok``)."""
    began = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    if result.returncode != ok:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
    return seconds, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--big", action="store_true", help="also 20M rows (1.3 GB of float64)")
    parser.add_argument("--small", action="store_true", help="a few thousand rows (smoke test)")
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--components", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--local", action="store_true", help="also time --cluster local")
    args = parser.parse_args()
    rows = [4000] if args.small else args.rows + ([20_000_000] if args.big else [])

    from dask_em.datasets import generate

    help_s, _ = timed([*dask_em(), "--help"])
    usage_s, _ = timed([*dask_em(), "fit", "x.zarr", "--n-components", "0"], ok=2)
    print(f"dask-em --help {help_s:.2f} s   usage error {usage_s:.2f} s")
    print(
        f"{'rows':>11}  {'engine':<27} {'wall s':>7} {'iters':>5} {'passes':>6}  {'vs sklearn':>10}"
    )
    root = Path(tempfile.mkdtemp(prefix="small-jobs-"))
    try:
        for n in rows:
            data = root / f"data-{n}.zarr"
            generate(data, n, args.features, args.components, 0, min(n, 250_000))
            common = [str(args.components), str(args.tol), str(args.max_iter)]
            sk_s, out = timed([sys.executable, "-c", SKLEARN_SCRIPT, str(data), *common])
            sk = json.loads(out)
            for extra in [[]] + ([["--cluster", "local"]] if args.local else []):
                model = root / "model.zarr"
                shutil.rmtree(model, ignore_errors=True)
                fit_s, out = timed(
                    [*dask_em(), "fit", str(data), "--n-components", str(args.components),
                     "--n-init", "1", "--tol", str(args.tol), "--max-iter", str(args.max_iter),
                     "--output", str(model), "--json", "--quiet", *extra]
                )  # fmt: skip
                summary = json.loads(out)
                label = f"dask-em fit ({summary['cluster']})"
                print(
                    f"{n:>11,}  {label:<27} {fit_s:7.2f} {summary['n_iter']:5d} "
                    f"{summary['n_passes']:6d}  {fit_s / sk_s:9.2f}x"
                )
            print(f"{n:>11,}  {'scikit-learn script':<27} {sk_s:7.2f} {sk['n_iter']:5d} {'':>6}")
            shutil.rmtree(data)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
