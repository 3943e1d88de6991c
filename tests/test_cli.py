"""The ``dask-em`` command, run as a real subprocess on real Zarr stores.

- ``generate`` writes the requested shape with the true parameters in its attributes;
- ``fit`` prints one progress line per iteration on stderr (none with ``--quiet``), a
  JSON summary with ``--json``, exits 0 when not converged and says so;
- ``predict`` writes labels / responsibilities equal to the Python API's, published
  atomically (no temporaries left, an earlier dask-em output replaced);
- ``score`` and ``info`` print the documented JSON;
- ``demo`` runs end to end;
- every bad input or bad option exits 2 with exactly one line on stderr, no traceback,
  and writes nothing;
- data chunked along features is accepted and gives the same model.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_same_fit,
    assert_usage_error,
    mixture,
    run_cli,
    run_many,
    snapshot,
    write_array,
)

from dask_em import load_model
from dask_em.choices import CLI_N_INIT

N_SAMPLES, N_FEATURES, N_COMPONENTS = 20_000, 3, 3
SUMMARY_KEYS = {
    "n_components",
    "covariance_type",
    "n_features",
    "n_iter",
    "converged",
    "lower_bound",
    "lower_bounds",
    "n_passes",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``dask-em generate`` of 20,000 x 3 rows (8 chunks), then ``dask-em fit --json
    --checkpoint-dir`` of 3 components on it (progress on): the paths and both runs."""
    root = tmp_path_factory.mktemp("cli")
    data, model, ckpt = root / "data.zarr", root / "model.zarr", root / "ckpt"
    generated = run_cli(
        "generate",
        data,
        "--n-samples",
        N_SAMPLES,
        "--n-features",
        N_FEATURES,
        "--n-components",
        N_COMPONENTS,
        "--seed",
        4,
        "--store-chunk-rows",
        2500,
        "--quiet",
        *LOCAL,
    )
    assert_ok(generated)
    fitted = run_cli(
        "fit",
        data,
        "--n-components",
        N_COMPONENTS,
        "--output",
        model,
        "--checkpoint-dir",
        ckpt,
        "--n-init",  # one initialization: the progress and summary checks follow one run
        1,
        "--json",
        *LOCAL,
    )
    assert_ok(fitted)
    return {
        "root": root,
        "data": data,
        "model": model,
        "ckpt": ckpt,
        "generated": generated,
        "fitted": fitted,
    }


# ------------------------------------------------------------------ generate
def test_generate_writes_the_shape_and_the_true_parameters(workspace: dict) -> None:
    """Shape, row chunks and float64 as asked; the attributes hold true parameters that
    describe the rows (their mixture mean and covariance match the sample's)."""
    assert workspace["generated"].stdout == "" and workspace["generated"].stderr == ""
    z = zarr.open_array(str(workspace["data"]), mode="r")
    assert z.shape == (N_SAMPLES, N_FEATURES) and z.chunks == (2500, N_FEATURES)
    assert z.dtype == np.float64
    attrs = z.attrs
    w = np.array(attrs["true_weights"])
    mu = np.array(attrs["true_means"])
    cov = np.array(attrs["true_covariances"])
    assert w.shape == (N_COMPONENTS,) and np.isclose(w.sum(), 1.0) and np.all(w > 0)
    assert mu.shape == (N_COMPONENTS, N_FEATURES)
    assert cov.shape == (N_COMPONENTS, N_FEATURES, N_FEATURES)
    np.testing.assert_allclose(cov, np.swapaxes(cov, 1, 2))
    assert np.all(np.linalg.eigvalsh(cov) > 0)
    assert attrs["seed"] == 4

    X = z[...]
    assert np.all(np.isfinite(X))
    mixture_mean = w @ mu
    mixture_cov = np.einsum("k,kij->ij", w, cov + np.einsum("ki,kj->kij", mu, mu))
    mixture_cov -= np.outer(mixture_mean, mixture_mean)
    np.testing.assert_allclose(X.mean(axis=0), mixture_mean, atol=0.15)
    np.testing.assert_allclose(np.cov(X, rowvar=False), mixture_cov, atol=0.4)


# ------------------------------------------------------------------ fit
def test_fit_json_summary_matches_the_written_model(workspace: dict) -> None:
    """``--json`` prints valid JSON with the documented keys; the values are the model's."""
    summary = json.loads(workspace["fitted"].stdout)
    assert SUMMARY_KEYS <= set(summary)
    gm = load_model(workspace["model"])
    assert summary["n_iter"] == gm.n_iter_ == len(summary["lower_bounds"])
    assert summary["converged"] is True and gm.converged_
    assert summary["lower_bounds"] == gm.lower_bounds_
    assert summary["lower_bound"] == summary["lower_bounds"][-1] == gm.lower_bound_
    assert summary["n_passes"] == gm.n_passes_ > summary["n_iter"]  # init passes count
    assert summary["n_components"] == N_COMPONENTS and summary["n_features"] == N_FEATURES
    assert summary["covariance_type"] == "full"
    assert summary["model"] == str(workspace["model"])


def test_fit_prints_one_progress_line_per_iteration(workspace: dict) -> None:
    """Progress on stderr: one ``iteration N  lower bound ...  change ...  S s`` line for
    each iteration 1..n_iter, and no warning or traceback."""
    stderr = workspace["fitted"].stderr
    summary = json.loads(workspace["fitted"].stdout)
    lines = [line for line in stderr.splitlines() if line.startswith("iteration")]
    pattern = re.compile(r"^iteration\s+(\d+)\s+lower bound\s+(\S+)\s+change\s+(\S+)\s+[\d.]+ s$")
    numbers = []
    for line, bound in zip(lines, summary["lower_bounds"], strict=True):
        match = pattern.match(line)
        assert match, line
        numbers.append(int(match.group(1)))
        assert float(match.group(2)) == pytest.approx(bound, rel=1e-9)
    assert numbers == list(range(1, summary["n_iter"] + 1))
    assert "Traceback" not in stderr and "warning" not in stderr.lower()


def test_quiet_fit_that_does_not_converge_exits_0(tmp_path: Path, workspace: dict) -> None:
    """``--max-iter 2 --tol 0 --quiet --json``: status 0, nothing at all on stderr, and
    the summary says ``"converged": false`` after 2 iterations."""
    result = run_cli(
        "fit",
        workspace["data"],
        "--n-components",
        N_COMPONENTS,
        "--output",
        tmp_path / "m.zarr",
        "--max-iter",
        2,
        "--tol",
        0,
        "--quiet",
        "--json",
        *LOCAL,
    )
    assert_ok(result)
    assert result.stderr == ""
    summary = json.loads(result.stdout)
    assert summary["converged"] is False and summary["n_iter"] == 2
    assert len(summary["lower_bounds"]) == 2
    assert load_model(tmp_path / "m.zarr").converged_ is False


# ------------------------------------------------------------------ predict / score / info
def test_predict_labels_and_proba_match_the_python_api(workspace: dict) -> None:
    """Labels: int64, one per row, equal to ``load_model(...).predict``. Then ``--proba``
    to the same path replaces that earlier dask-em output with (n, K) rows summing to 1,
    equal to ``predict_proba``; no temporary is left beside it."""
    gm = load_model(workspace["model"])
    X = da.from_zarr(str(workspace["data"]))
    out = workspace["root"] / "predicted.zarr"

    labels = run_cli("predict", workspace["model"], workspace["data"], "--output", out, *LOCAL)
    assert_ok(labels)
    z = zarr.open_array(str(out), mode="r")
    assert z.dtype == np.int64 and z.shape == (N_SAMPLES,)
    np.testing.assert_array_equal(z[...], gm.predict(X).compute())
    assert z.attrs["kind"] == "predict"

    proba = run_cli(
        "predict",
        workspace["model"],
        workspace["data"],
        "--output",
        out,
        "--proba",
        "--quiet",
        *LOCAL,
    )
    assert_ok(proba)
    assert proba.stderr == ""
    z = zarr.open_array(str(out), mode="r")
    assert z.dtype == np.float64 and z.shape == (N_SAMPLES, N_COMPONENTS)
    R = z[...]
    np.testing.assert_allclose(R.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(R, gm.predict_proba(X).compute(), rtol=0, atol=1e-12)
    assert z.attrs["kind"] == "predict_proba"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_score_prints_the_python_api_values(workspace: dict) -> None:
    """``score`` JSON: mean_log_likelihood, bic, aic, n_samples equal to the Python API's."""
    result = run_cli("score", workspace["model"], workspace["data"], "--quiet", *LOCAL)
    assert_ok(result)
    assert result.stderr == ""
    scores = json.loads(result.stdout)
    assert set(scores) == {"mean_log_likelihood", "bic", "aic", "n_samples"}
    gm = load_model(workspace["model"])
    X = da.from_zarr(str(workspace["data"]))
    assert scores["n_samples"] == N_SAMPLES
    assert scores["mean_log_likelihood"] == pytest.approx(gm.score(X), rel=1e-12)
    assert scores["bic"] == pytest.approx(gm.bic(X), rel=1e-12)
    assert scores["aic"] == pytest.approx(gm.aic(X), rel=1e-12)


def test_info_on_a_model_and_on_its_checkpoint(workspace: dict) -> None:
    """``info`` prints JSON with the documented keys for a model and for a checkpoint
    directory, both agreeing with the fit's summary."""
    summary = json.loads(workspace["fitted"].stdout)
    results = run_many(
        {"model": ["info", workspace["model"]], "checkpoint": ["info", workspace["ckpt"]]}
    )
    for kind, result in results.items():
        assert_ok(result)
        assert result.stderr == ""
        info = json.loads(result.stdout)
        assert SUMMARY_KEYS <= set(info), kind
        assert info["kind"] == kind
        for key in SUMMARY_KEYS:
            assert info[key] == summary[key], (kind, key)
    checkpoint_info = json.loads(results["checkpoint"].stdout)
    assert checkpoint_info["done"] is True
    assert checkpoint_info["data"]["shape"] == [N_SAMPLES, N_FEATURES]
    # automatic rows per task: the 8 small store chunks of 2,500 rows merged into one task
    assert checkpoint_info["data"]["row_chunks"] == [N_SAMPLES]


def test_chunk_rows_sets_rows_per_task_in_whole_store_chunks(
    tmp_path: Path, workspace: dict
) -> None:
    """``--chunk-rows 6000`` on a store of 2,500-row chunks: fit and predict run tasks of
    7,500 rows (rounded up to whole store chunks), seen in the checkpoint's row chunks
    and in the chunks of the labels written; the labels equal the Python API's."""
    out, ckpt = tmp_path / "labels.zarr", tmp_path / "ckpt"
    data, model = workspace["data"], workspace["model"]
    chunked = ("--chunk-rows", 6000, "--quiet", *LOCAL)
    results = run_many(
        {
            "fit": [
                "fit",
                data,
                "--n-components",
                2,
                "--output",
                tmp_path / "m.zarr",
                "--checkpoint-dir",
                ckpt,
                "--max-iter",
                2,
                *chunked,
            ],
            "predict": ["predict", model, data, "--output", out, *chunked],
        }
    )
    for result in results.values():
        assert_ok(result)
    info = run_cli("info", ckpt)
    assert_ok(info)
    assert json.loads(info.stdout)["data"]["row_chunks"] == [7500, 7500, 5000]
    labels = zarr.open_array(str(out), mode="r")
    assert labels.chunks == (7500,)
    gm = load_model(model)
    np.testing.assert_array_equal(labels[...], gm.predict(da.from_zarr(str(data))).compute())


# ------------------------------------------------------------------ demo
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """``demo`` on 20,000 rows: status 0, a report with the agreement percentage on
    stdout, and the model, labels and checkpoint it names exist. The default seed: the
    demo keeps the best of `CLI_N_INIT` initializations, as one alone may end in a poor
    optimum; its progress names them "Initialization i of n", not by derived seeds that
    look like noise. ``--chunk-rows``, the older name of ``--store-chunk-rows``, still works."""
    workdir = tmp_path / "demo"
    result = run_cli(
        "demo",
        "--workdir",
        workdir,
        "--n-samples",
        20_000,
        "--chunk-rows",
        5000,
        *LOCAL,
    )
    assert_ok(result)
    assert zarr.open_array(str(workdir / "data.zarr"), mode="r").chunks == (5000, 8)
    for i in range(1, CLI_N_INIT + 1):
        assert (
            f"Initialization {i} of {CLI_N_INIT} (its seed is drawn from random_state=0)"
            in result.stderr
        )
    assert set(re.findall(r"seed (\d+)", result.stderr)) == {"0"}, result.stderr  # --seed
    match = re.search(r"labels agree with the true components on ([\d.]+)% of rows", result.stdout)
    assert match, result.stdout
    assert 90.0 < float(match.group(1)) <= 100.0
    assert (
        "20,000 rows" in result.stdout and f"best of {CLI_N_INIT} initializations" in result.stdout
    )
    gm = load_model(workdir / "model.zarr")
    labels = zarr.open_array(str(workdir / "labels.zarr"), mode="r")
    assert labels.shape == (20_000,) and labels.dtype == np.int64
    assert set(np.unique(labels[...])) <= set(range(gm.n_components))
    assert (workdir / "checkpoint" / "manifest.json").exists()
    info = json.loads(run_cli("info", workdir / "checkpoint").stdout)
    assert info["done"] is True and info["n_iter"] == gm.n_iter_


# ------------------------------------------------------------------ layouts
def test_data_chunked_along_features_gives_the_same_model(tmp_path: Path) -> None:
    """A store chunked (100, 1) is rechunked and fits exactly like the same rows chunked
    (100, D)."""
    X = mixture(3000, 4, 3, seed=8)
    by_rows = write_array(tmp_path / "rows.zarr", X, (100, 4))
    by_features = write_array(tmp_path / "features.zarr", X, (100, 1))
    results = run_many(
        {
            out: ["fit", data, "--n-components", 3, "--output", tmp_path / out, "--quiet", *LOCAL]
            for data, out in ((by_rows, "a.zarr"), (by_features, "b.zarr"))
        }
    )
    for result in results.values():
        assert_ok(result)
    assert zarr.open_array(by_features).chunks == (100, 1)
    assert_same_fit(load_model(tmp_path / "a.zarr"), load_model(tmp_path / "b.zarr"))


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory, workspace: dict) -> dict[str, Path]:
    """Stores and files that are not valid input, and a valid 4-feature store."""
    root = tmp_path_factory.mktemp("bad")
    paths = {
        name: root / name
        for name in (
            "plain.txt",
            "empty",
            "group.zarr",
            "one_d.zarr",
            "three_d.zarr",
            "strings.zarr",
            "bools.zarr",
            "no_rows.zarr",
            "three_rows.zarr",
            "nan.zarr",
            "inf.zarr",
            "four_features.zarr",
            "foreign.zarr",
            "foreign_dir",
            "foreign_ckpt",
        )
    }
    paths["plain.txt"].write_text("not zarr\n")
    paths["empty"].mkdir()
    group = zarr.open_group(str(paths["group.zarr"]), mode="w")
    group.create_array("x", data=mixture(500, 3, 2, seed=0))
    group.create_array("y", data=mixture(500, 3, 2, seed=1))
    write_array(paths["one_d.zarr"], np.arange(500.0))
    write_array(paths["three_d.zarr"], np.zeros((500, 3, 2)))
    strings = zarr.create_array(
        str(paths["strings.zarr"]), shape=(500, 3), chunks=(100, 3), dtype=str
    )
    strings[...] = np.full((500, 3), "1.5")
    write_array(paths["bools.zarr"], np.ones((500, 3), dtype=bool))
    write_array(paths["no_rows.zarr"], np.zeros((0, 3)))
    write_array(paths["three_rows.zarr"], mixture(3, 3, 2, seed=0))
    X = mixture(1000, 3, 2, seed=0)
    X[730, 1] = np.nan  # row 730, in store chunk 7
    write_array(paths["nan.zarr"], X)
    X[730, 1] = 0.0
    X[420, 2] = -np.inf  # row 420, in store chunk 4
    write_array(paths["inf.zarr"], X)
    write_array(paths["four_features.zarr"], mixture(500, 4, 2, seed=0))
    write_array(paths["foreign.zarr"], np.zeros((10, 2)))  # a Zarr store someone else wrote
    paths["foreign_dir"].mkdir()
    (paths["foreign_dir"] / "keep.txt").write_text("precious")
    paths["foreign_ckpt"].mkdir()
    (paths["foreign_ckpt"] / "results.csv").write_text("precious")
    paths["data"] = workspace["data"]
    paths["model"] = workspace["model"]
    paths["missing"] = root / "missing.zarr"
    return paths


FIT_CASES: dict[str, tuple[Callable[[dict[str, Path]], list[object]], tuple[str, ...]]] = {
    "missing path": (lambda p: [p["missing"]], ("no such file or directory", "missing.zarr")),
    "plain file": (lambda p: [p["plain.txt"]], ("not a Zarr array or group",)),
    "empty directory": (lambda p: [p["empty"]], ("not a Zarr array or group",)),
    "group without --array": (lambda p: [p["group.zarr"]], ("--array", "x, y")),
    "group with a wrong --array": (
        lambda p: [p["group.zarr"], "--array", "z"],
        ("no array 'z'", "x, y"),
    ),
    "--array on an array": (lambda p: [p["data"], "--array", "x"], ("drop --array",)),
    "1-D array": (lambda p: [p["one_d.zarr"]], ("1 dimension", "2-D")),
    "3-D array": (lambda p: [p["three_d.zarr"]], ("3 dimension", "2-D")),
    "strings": (lambda p: [p["strings.zarr"]], ("not a real numeric type",)),
    "booleans": (lambda p: [p["bools.zarr"]], ("dtype bool", "not a real numeric type")),
    "zero rows": (lambda p: [p["no_rows.zarr"]], ("(0, 3)", "at least one row")),
    "n-components 0": (
        lambda p: [p["data"], "--n-components", "0"],
        ("--n-components", "positive integer"),
    ),
    "tol -1": (lambda p: [p["data"], "--tol", "-1"], ("--tol", "'-1'")),
    "tol nan": (lambda p: [p["data"], "--tol", "nan"], ("--tol", "'nan'")),
    "covariance-type bogus": (
        lambda p: [p["data"], "--covariance-type", "bogus"],
        ("--covariance-type", "bogus"),
    ),
    "max-iter x": (lambda p: [p["data"], "--max-iter", "x"], ("--max-iter", "'x'")),
    "chunk-rows 0": (lambda p: [p["data"], "--chunk-rows", "0"], ("--chunk-rows", "'0'")),
    "chunk-rows 2.5": (lambda p: [p["data"], "--chunk-rows", "2.5"], ("--chunk-rows", "'2.5'")),
    "unknown option": (lambda p: [p["data"], "--frobnicate"], ("--frobnicate",)),
    "--restart without --checkpoint-dir": (
        lambda p: [p["data"], "--restart"],
        ("--restart", "--checkpoint-dir"),
    ),
    "--restart of a directory that is not a checkpoint": (
        lambda p: [p["data"], "--checkpoint-dir", p["foreign_ckpt"], "--restart"],
        ("results.csv", "not part of a dask-em checkpoint", "refusing to delete"),
    ),
    "--scheduler with --n-workers": (
        lambda p: [p["data"], "--scheduler", "tcp://127.0.0.1:1", "--n-workers", "2"],
        ("--n-workers", "--scheduler"),
    ),
    "--scheduler with --scheduler-file": (
        lambda p: [p["data"], "--scheduler", "tcp://127.0.0.1:1", "--scheduler-file", "f"],
        ("--scheduler-file", "not allowed with"),
    ),
    "missing --scheduler-file": (
        lambda p: [p["data"], "--scheduler-file", p["missing"]],
        ("no such scheduler file", "missing.zarr"),
    ),
}


DURING_FIT_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fewer rows than components": (
        "three_rows.zarr",
        ("has 3 rows, fewer than --n-components 4",),
    ),
    "NaN": ("nan.zarr", ("NaN or infinite", "row 730")),
    "inf": ("inf.zarr", ("NaN or infinite", "row 420")),
}

OTHER_CASES: dict[str, tuple[Callable[[dict[str, Path]], list[object]], tuple[str, ...]]] = {
    "predict with other n_features": (
        lambda p: ["predict", p["model"], p["four_features.zarr"], "--output", p["out"]],
        ("4 features", "fitted on 3"),
    ),
    "score with other n_features": (
        lambda p: ["score", p["model"], p["four_features.zarr"]],
        ("4 features", "fitted on 3"),
    ),
    "predict with a data file as model": (
        lambda p: ["predict", p["data"], p["data"], "--output", p["out"]],
        ("not a dask-em model",),
    ),
    "predict on missing data": (
        lambda p: ["predict", p["model"], p["missing"], "--output", p["out"]],
        ("no such file or directory",),
    ),
    "predict with --chunk-rows -5": (
        lambda p: ["predict", p["model"], p["data"], "--output", p["out"], "--chunk-rows", "-5"],
        ("--chunk-rows", "'-5'"),
    ),
    "score with --chunk-rows x": (
        lambda p: ["score", p["model"], p["data"], "--chunk-rows", "x"],
        ("--chunk-rows", "'x'"),
    ),
    "info on a data array": (lambda p: ["info", p["data"]], ("not a dask-em model",)),
    "info on an empty directory": (lambda p: ["info", p["empty"]], ("not a dask-em model",)),
    "info on a plain file": (lambda p: ["info", p["plain.txt"]], ("not a dask-em model",)),
    "info on a missing path": (lambda p: ["info", p["missing"]], ("no such model",)),
    "no command": (lambda p: [], ("required",)),
}

FOREIGN_OUTPUTS = ("plain.txt", "foreign.zarr", "foreign_dir")


@pytest.fixture(scope="module")
def refused(
    bad: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[subprocess.CompletedProcess[str], Path, dict[str, bytes]]]:
    """Every bad-input command of this module, run a few at a time (each one is a real
    ``dask-em`` process): by case, the result, the case's own directory for outputs (left
    as the command left it) and a snapshot of the foreign output it was given, if any."""
    root = tmp_path_factory.mktemp("refused")
    commands: dict[str, list[object]] = {}
    before: dict[str, dict[str, bytes]] = {}
    for case, (build, _) in FIT_CASES.items():
        args = build(bad)
        if "--n-components" not in args:
            args += ["--n-components", "2"]
        if "--restart" not in args:
            args += ["--checkpoint-dir", root / case / "ckpt"]
        commands[f"fit: {case}"] = ["fit", *args, "--output", root / case / "out.zarr"]
    for case, (store, _) in DURING_FIT_CASES.items():
        commands[f"during fit: {case}"] = [
            "fit",
            bad[store],
            "--n-components",
            4,
            "--output",
            root / case / "out.zarr",
            "--checkpoint-dir",
            root / case / "ckpt",
            "--quiet",
            *LOCAL,
        ]
    for case, (build, _) in OTHER_CASES.items():
        commands[f"other: {case}"] = build({**bad, "out": root / case / "out.zarr"})
    for target in FOREIGN_OUTPUTS:
        before[f"output: fit {target}"] = before[f"output: predict {target}"] = snapshot(
            bad[target]
        )
        commands[f"output: fit {target}"] = [
            "fit",
            bad["data"],
            "--n-components",
            2,
            "--output",
            bad[target],
            "--checkpoint-dir",
            root / f"fit {target}" / "ckpt",
        ]
        commands[f"output: predict {target}"] = [
            "predict",
            bad["model"],
            bad["data"],
            "--output",
            bad[target],
        ]
    for case in commands:
        (root / case.split(": ", 1)[1]).mkdir(exist_ok=True)
    results = run_many(commands)
    return {
        key: (result, root / key.split(": ", 1)[1], before.get(key, {}))
        for key, result in results.items()
    }


def assert_nothing_written(case_dir: Path) -> None:
    """The case's output directory holds no model, labels or checkpoint."""
    assert list(case_dir.iterdir()) == [], sorted(p.name for p in case_dir.iterdir())


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_bad_fit_input_exits_2_with_one_line(
    refused: dict, bad: dict[str, Path], case: str
) -> None:
    """Refused before any work: status 2, one line naming the problem, no traceback, no
    model and no checkpoint written (nor a foreign directory deleted by ``--restart``)."""
    result, case_dir, _ = refused[f"fit: {case}"]
    assert_usage_error(result, *FIT_CASES[case][1])
    assert_nothing_written(case_dir)
    assert (bad["foreign_ckpt"] / "results.csv").read_text() == "precious"


@pytest.mark.parametrize("case", list(DURING_FIT_CASES))
def test_bad_values_found_during_the_fit_exit_2_with_one_line(refused: dict, case: str) -> None:
    """Too few rows, NaN or inf (found by the workers; the message names the chunk):
    status 2, one line, no traceback (no worker log either), no model written."""
    result, case_dir, _ = refused[f"during fit: {case}"]
    assert_usage_error(result, *DURING_FIT_CASES[case][1])
    assert not (case_dir / "out.zarr").exists()


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_bad_input_of_other_commands_exits_2_with_one_line(refused: dict, case: str) -> None:
    """predict/score/info refuse bad input: status 2, one line, no traceback, no output."""
    result, case_dir, _ = refused[f"other: {case}"]
    assert_usage_error(result, *OTHER_CASES[case][1])
    assert_nothing_written(case_dir)


@pytest.mark.parametrize("target", FOREIGN_OUTPUTS)
@pytest.mark.parametrize("command", ["fit", "predict"])
def test_output_not_written_by_dask_em_is_refused_before_any_work(
    refused: dict, bad: dict[str, Path], command: str, target: str
) -> None:
    """An existing output that dask-em did not write is never replaced: status 2, one
    line, the file untouched, and refused up front (no checkpoint started)."""
    result, case_dir, before = refused[f"output: {command} {target}"]
    assert_usage_error(result, "exists and was not written by dask-em", str(bad[target]))
    assert before and snapshot(bad[target]) == before
    assert_nothing_written(case_dir)
