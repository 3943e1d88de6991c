"""Data safety (issue 16): inputs never overwritten, strict reads, no NaN served, valid
and whole models, unwritable destinations refused in one line.

Every case runs on real Zarr stores on disk; the command-line cases run the real
``dask-em`` command in a subprocess, the corrupt-chunk case also on a real
multi-process Dask cluster, the torn-read case with a writer process and a reader
process, and the destination cases on real tmpfs mounts (read-only, and full).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_usage_error,
    dask_em_command,
    mixture,
    run_many,
    snapshot,
    write_array,
)

from dask_em import GaussianMixture, load_model
from dask_em import io as io_module
from dask_em.checkpoint import Checkpoint, checkpoint_lock
from dask_em.em import EMResult, FitState
from dask_em.errors import CheckpointError, DataError, OutputError
from dask_em.io import model_version_path, open_array, read_model, store_array, write_model
from dask_em.params import COVARIANCE_TYPES, GMMParams, validate_params

QUIET = ("--quiet", *LOCAL)
"""A small local cluster, and no progress lines on stderr (the error is the only line)."""


def chunk_file(store: str | Path, row_chunk: int) -> Path:
    """The file of row chunk ``row_chunk`` of a 2-D Zarr v3 array (default key encoding)."""
    return Path(store) / "c" / str(row_chunk) / "0"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Data written by dask-em (kind ``data``, 6 row chunks of 100) and a model of it."""
    X = mixture(600, 2, 2, seed=5)
    data = tmp_path / "d.zarr"
    store_array(da.from_array(X, chunks=(100, -1)), data, kind="data")
    model = tmp_path / "m.zarr"
    GaussianMixture(2, random_state=0, max_iter=5).fit(X).save(model)
    return {"root": tmp_path, "data": data, "model": model}


# ============================================= 1. inputs never overwritten
def test_an_output_never_replaces_an_input_or_another_kind(files: dict[str, Path]) -> None:
    """``fit d.zarr --output d.zarr``, ``predict m.zarr d.zarr --output d.zarr`` and
    ``--output m.zarr``, an output inside the input and a model over predictions: each
    exits 2 with one line, and every input stays byte for byte."""
    root, data, model = files["root"], files["data"], files["model"]
    labels = root / "labels.zarr"
    store_array(da.zeros(10, chunks=5, dtype=np.int64), labels, kind="predictions")
    before = {p: snapshot(p) for p in (data, model, labels)}
    fit = ["fit", data, "--n-components", "2", "--quiet", *QUIET, "--output"]
    predict = ["predict", model, data, *QUIET, "--output"]
    results = run_many(
        {
            "fit over data": [*fit, data],
            "fit inside data": [*fit, data / "m.zarr"],
            "predict over data": [*predict, data],
            "predict over model": [*predict, model],
            "fit over labels": [*fit, labels],
            "predict over model, relative": [*predict, f"{root}/./m.zarr"],
        }
    )
    for case in ("fit over data", "fit inside data", "predict over data"):
        assert_usage_error(results[case], "refusing to overwrite an input", str(data))
    assert_usage_error(results["predict over model"], "refusing to overwrite an input")
    assert_usage_error(results["predict over model, relative"], "is the input")
    assert_usage_error(results["fit over labels"], "holds dask-em predictions, not model")
    for path, files_before in before.items():
        assert snapshot(path) == files_before, path


def test_outputs_are_marked_with_their_kind_and_replace_only_that_kind(tmp_path: Path) -> None:
    """Each writer marks its kind; a model cannot overwrite data nor data a model."""
    data, labels, model = tmp_path / "d.zarr", tmp_path / "l.zarr", tmp_path / "m.zarr"
    store_array(da.ones((4, 2), chunks=2), data, kind="data")
    store_array(da.zeros(4, chunks=2, dtype=np.int64), labels, kind="predictions")
    gm = GaussianMixture(1).fit(np.random.default_rng(0).normal(size=(20, 2)))
    gm.save(model)
    assert zarr.open(str(data)).attrs["dask_em_output"] == "data"
    assert zarr.open(str(labels)).attrs["dask_em_output"] == "predictions"
    assert zarr.open_group(str(model)).attrs["dask_em_output"] == "model"
    with pytest.raises(OutputError, match="holds dask-em data, not model"):
        gm.save(data)
    with pytest.raises(OutputError, match="holds dask-em model, not data"):
        store_array(da.ones((4, 2), chunks=2), model, kind="data")
    store_array(da.ones(4, chunks=2, dtype=np.int64), labels, kind="predictions")  # same kind
    gm.save(model)
    assert load_model(model).n_components == 1


# ======================================================= 2. strict reads
def test_a_deleted_data_chunk_is_an_error_naming_it(files: dict[str, Path]) -> None:
    """``rm d.zarr/c/1/0``: opening, fitting, ``fit``, ``predict`` and ``score`` refuse
    the store naming the missing chunk; nothing is written."""
    root, data, model = files["root"], files["data"], files["model"]
    missing = chunk_file(data, 1)
    missing.unlink()
    with pytest.raises(DataError, match=f"'{missing}'.*fill value"):
        open_array(data)
    with pytest.raises(DataError, match="lacks 1 of its 6 stored chunk"):
        GaussianMixture(2).fit(str(data))
    results = run_many(
        {
            "fit": ["fit", data, "--n-components", "2", "--output", root / "m2.zarr", *QUIET],
            "predict": ["predict", model, data, "--output", root / "l.zarr", *QUIET],
            "score": ["score", model, data, *QUIET],
        }
    )
    for result in results.values():
        assert_usage_error(result, str(missing), "lacks 1 of its 6 stored chunk(s)")
    assert not (root / "m2.zarr").exists() and not (root / "l.zarr").exists()


def test_a_deleted_model_chunk_is_an_error_naming_it(files: dict[str, Path]) -> None:
    """A model whose ``means`` chunk was deleted is refused, not read as zeros."""
    model = files["model"]
    missing = model_version_path(model) / "means" / "c" / "0" / "0"
    missing.unlink()
    with pytest.raises(DataError, match=f"model array .*means lacks .*'{missing}'"):
        load_model(model)
    assert_usage_error(run_many({"info": ["info", model]})["info"], str(missing))


def test_dask_em_writes_every_chunk_and_a_store_that_omits_fill_chunks_is_refused(
    tmp_path: Path,
) -> None:
    """Arrays and models dask-em writes store chunks equal to the fill value (all-zero
    labels, zero means), so they read back; a foreign store written with Zarr's default
    (all-fill chunks left out) is refused with how to rewrite it."""
    labels = tmp_path / "labels.zarr"
    store_array(da.zeros(10, chunks=5, dtype=np.int64), labels, kind="predictions")
    assert {p.name for p in (labels / "c").iterdir()} == {"0", "1"}
    params = GMMParams.from_covariances(np.ones(1), np.zeros((1, 2)), np.eye(2)[None], "full")
    write_model(tmp_path / "m.zarr", params, {})
    np.testing.assert_array_equal(read_model(tmp_path / "m.zarr")[0].means, np.zeros((1, 2)))

    X = np.ones((300, 2))
    X[100:200] = 0.0
    foreign = zarr.create_array(store=str(tmp_path / "f.zarr"), data=X, chunks=(100, 2))
    assert not chunk_file(foreign.store_path.store.root, 1).exists()
    with pytest.raises(DataError, match="write_empty_chunks"):
        open_array(tmp_path / "f.zarr")


# ======================================================= 6. corrupt chunks
def corrupt(path: Path, how: str) -> None:
    """Damage a chunk file: random bytes, truncated to half, or emptied."""
    raw = path.read_bytes()
    if how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(raw)))
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.write_bytes(b"")


def uncompressed(path: Path, X: np.ndarray) -> str:
    """``X`` in a Zarr store without compression (100-row chunks)."""
    z = zarr.create_array(store=str(path), data=X, chunks=(100, 2), compressors=None)
    return str(z.store_path.store.root)


CORRUPTIONS = ["random bytes", "truncated", "empty file", "uncompressed truncated"]


def corrupt_store(root: Path, how: str) -> tuple[Path, Path]:
    """A 600-row store whose row chunk 2 is damaged ``how``: ``(store, chunk file)``."""
    X = mixture(600, 2, 2, seed=6)
    store = root / f"{how.replace(' ', '-')}.zarr"
    if how == "uncompressed truncated":
        uncompressed(store, X)
        corrupt(chunk_file(store, 2), "truncated")
    else:
        store_array(da.from_array(X, chunks=(100, -1)), store, kind="data")
        corrupt(chunk_file(store, 2), how)
    return store, chunk_file(store, 2)


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_chunk_is_an_error_naming_the_chunk_and_the_store(
    tmp_path: Path, how: str
) -> None:
    """On Dask's threads: fit, predict and score raise DataError naming the chunk."""
    store, bad = corrupt_store(tmp_path, how)
    gm = GaussianMixture(2, random_state=0, max_iter=3, cache=False)
    with dask.config.set(scheduler="threads"):
        with pytest.raises(DataError, match=f"chunk '{bad}' of the Zarr store '{store}'"):
            gm.fit(str(store))
        fitted = GaussianMixture(2, random_state=0).fit(mixture(100, 2, 2, seed=1))
        with pytest.raises(DataError, match=f"chunk '{bad}'"):
            fitted.predict(str(store)).compute()
        with pytest.raises(DataError, match=f"chunk '{bad}'"):
            fitted.score(str(store))


def test_a_corrupt_chunk_error_crosses_worker_processes(tmp_path: Path, dask_client) -> None:
    """On a real multi-process cluster the DataError pickles back whole."""
    store, bad = corrupt_store(tmp_path, "random bytes")
    with pytest.raises(DataError, match=f"chunk '{bad}' of the Zarr store"):
        GaussianMixture(2, random_state=0, max_iter=3, cache=False).fit(str(store))


def test_cli_fit_on_a_corrupt_chunk_exits_2_in_one_line_and_writes_nothing(
    tmp_path: Path,
) -> None:
    """``dask-em fit`` on its local cluster of worker processes, for a compressed chunk of
    random bytes and an uncompressed truncated one: exit 2, one line naming the chunk."""
    cases = {
        how: corrupt_store(tmp_path, how) for how in ("random bytes", "uncompressed truncated")
    }
    results = run_many(
        {
            how: [
                "fit",
                store,
                "--n-components",
                "2",
                "--quiet",
                "--output",
                tmp_path / f"{i}.zarr",
                *QUIET,
            ]
            for i, (how, (store, _)) in enumerate(cases.items())
        },
        max_workers=2,
    )
    for i, (how, (_, bad)) in enumerate(cases.items()):
        assert_usage_error(results[how], f"chunk '{bad}'", "cannot be read")
        assert not (tmp_path / f"{i}.zarr").exists()


# ================================================ 3. NaN/inf refused by inference
def test_predict_and_score_refuse_nan_and_inf_rows_naming_the_row(tmp_path: Path) -> None:
    """NumPy and Zarr input with NaN or inf rows: every inference method raises DataError
    naming the first bad row (not label 0, not a NaN score)."""
    X = mixture(500, 2, 2, seed=8)
    gm = GaussianMixture(2, random_state=0).fit(X)
    bad = X.copy()
    bad[3, 1] = np.nan
    bad[420, 0] = np.inf
    store = tmp_path / "bad.zarr"
    zarr.create_array(store=str(store), data=bad, chunks=(100, 2))
    for method in ("predict", "predict_proba", "score_samples", "score"):
        with pytest.raises(DataError, match="the first at row 3;"):
            getattr(gm, method)(bad)
    only_inf = X.copy()
    only_inf[420, 0] = -np.inf
    with pytest.raises(DataError, match="chunk 0 contains 1 row.*row 420"):
        gm.predict(only_inf)
    with pytest.raises(DataError, match="the first at row 3;"):
        gm.predict(str(store)).compute()
    gm.set_params(chunk_rows=100)
    with pytest.raises(DataError, match="chunk 4 contains 1 row.*the first at row 420"):
        gm.predict_proba(str(store))[400:].compute()


def test_cli_score_refuses_nan_rows_and_prints_only_valid_json(files: dict[str, Path]) -> None:
    """``dask-em score`` on data with a NaN row exits 2 in one line; on data whose
    log-likelihood overflows to -inf it prints valid JSON (null), never ``NaN``."""
    root, model = files["root"], files["model"]
    X = mixture(300, 2, 2, seed=9)
    X[7] = np.nan
    nan_store = root / "nan.zarr"
    zarr.create_array(store=str(nan_store), data=X, chunks=(100, 2))
    X[7] = 1e200  # finite, but its squared distance overflows
    far_store = root / "far.zarr"
    zarr.create_array(store=str(far_store), data=X, chunks=(100, 2))
    results = run_many(
        {"nan": ["score", model, nan_store, *QUIET], "far": ["score", model, far_store, *QUIET]}
    )
    assert_usage_error(results["nan"], "NaN or infinite", "row 7")
    assert_ok(results["far"])

    def no_constants(name: str) -> None:
        raise AssertionError(f"invalid JSON constant {name}")

    score = json.loads(results["far"].stdout, parse_constant=no_constants)
    assert score["mean_log_likelihood"] is None and score["n_samples"] == 300


# =================================================== 4. model validation at load
def rewrite_array(model: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace the array ``name`` of a saved model's current version by ``change(it)``."""
    group = zarr.open_group(model_version_path(model), mode="r+")
    value = change(np.array(group[name][...]))
    del group[name]
    group.create_array(name, data=value)


INVALID = {
    "weights sum to 1.2": ("weights", lambda w: w * 1.2, "the weights sum to 1.2"),
    "a negative weight": ("weights", lambda w: w * [-1, 3], "weight 0 is negative"),
    "a NaN weight": ("weights", lambda w: w * [np.nan, 1], "weight 0 is not finite"),
    "a NaN mean": ("means", lambda m: m * [[1, 1], [1, np.nan]], r"mean \(1, 1\) is not finite"),
    "covariances twice precisions_cholesky's": (
        "covariances",
        lambda c: 2 * c,
        "covariance 0 disagrees with precisions_cholesky",
    ),
    "a covariance not positive definite": (
        "covariances",
        lambda c: c * [[[1, 1], [1, -1]], [[1, 1], [1, 1]]],
        "covariance 0 is not positive definite",
    ),
    "an asymmetric covariance": (
        "covariances",
        lambda c: c + [[[0, 1], [0, 0]], [[0, 0], [0, 0]]],
        "covariance 0 is not symmetric",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_an_invalid_model_is_refused_at_load_naming_the_violation(
    files: dict[str, Path], case: str
) -> None:
    name, change, message = INVALID[case]
    rewrite_array(files["model"], name, change)
    with pytest.raises(DataError, match=f"is not a valid model: {message}"):
        load_model(files["model"])


def test_cli_refuses_an_invalid_model_in_one_line(files: dict[str, Path]) -> None:
    rewrite_array(files["model"], "weights", lambda w: w * 1.2)
    results = run_many(
        {
            "score": ["score", files["model"], files["data"], *QUIET],
            "info": ["info", files["model"]],
        }
    )
    for result in results.values():
        assert_usage_error(result, "is not a valid model: the weights sum to 1.2")


def badly_scaled_fits() -> Iterator[tuple[str, GaussianMixture]]:
    """Fits on the hardest data of the robustness and singular tests: 64 features at
    scales 1e-8..1e8 with an offset of 1e6 (all four types), points on a line with 1e-9
    noise, and float32 data with tiny variances far from the origin."""
    rng = np.random.default_rng(11)
    scales = np.logspace(-8, 8, 64)
    centers = rng.normal(scale=4.0, size=(3, 64))
    X = (centers[rng.integers(3, size=3000)] + rng.normal(size=(3000, 64))) * scales + 1e6
    for covariance_type in COVARIANCE_TYPES:
        gm = GaussianMixture(3, covariance_type=covariance_type, reg_covar=0.0, max_iter=20)
        yield f"scales {covariance_type}", gm.set_params(random_state=0).fit(X)
    t = rng.normal(size=400)
    t[:200] += 5.0
    line = np.c_[t, 0.3 * t + 0.1] + 1e-9 * rng.normal(size=(400, 2))
    for reg_covar in (1e-6, 0.0):
        for covariance_type in COVARIANCE_TYPES:
            gm = GaussianMixture(2, covariance_type=covariance_type, reg_covar=reg_covar)
            try:
                yield f"line {covariance_type} {reg_covar}", gm.set_params(random_state=0).fit(line)
            except ValueError:  # ill-defined covariance: no model to save
                continue
    tiny = np.concatenate(
        [
            1e3 + rng.normal(scale=1e-3, size=(3000, 3)),
            1e3 + 0.5 + rng.normal(scale=1e-2, size=(3000, 3)),
        ]
    ).astype(np.float32)
    yield "float32 tiny", GaussianMixture(2, reg_covar=0.0, random_state=0).fit(tiny)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_valid_but_badly_scaled_models_save_and_load(tmp_path: Path) -> None:
    """No valid model is refused by the validation: each fit saves and loads equal."""
    names = []
    for i, (name, gm) in enumerate(badly_scaled_fits()):
        validate_params(gm._params())
        gm.save(tmp_path / f"{i}.zarr")
        loaded = load_model(tmp_path / f"{i}.zarr")
        np.testing.assert_array_equal(loaded.covariances_, gm.covariances_, err_msg=name)
        names.append(name)
    assert len(names) >= 9, names


# ======================================================== 5. torn-free models
WRITER = """
import sys, numpy as np
from dask_em.io import write_model
from dask_em.params import GMMParams
path, rounds = sys.argv[1], int(sys.argv[2])
for i in range(1, rounds + 1):  # version i: means i, covariances (i + 1) I
    cov = np.repeat((i + 1.0) * np.eye(3)[None], 2, axis=0)
    params = GMMParams.from_covariances(np.array([0.5, 0.5]), np.full((2, 3), float(i)), cov, "full")
    write_model(path, params, {"round": i})
"""

READER = """
import json, sys, time, numpy as np
from dask_em.io import read_model
path, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
reads, torn, errors, seen = 0, [], [], set()
while time.monotonic() < deadline:
    try:
        params, attrs = read_model(path)
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
        continue
    i = attrs["round"]
    whole = (
        np.all(params.means == i)
        and np.all(params.covariances == (i + 1.0) * np.eye(3))
        and np.allclose(params.precisions_cholesky, np.eye(3) / np.sqrt(i + 1.0), rtol=1e-15)
    )
    reads += 1
    seen.add(i)
    if not whole:
        torn.append(i)
    if open(sys.argv[3]).read() == "done" and reads > 1:
        break
print(json.dumps({"reads": reads, "torn": torn, "errors": errors[:5], "seen": len(seen)}))
"""


def test_a_reader_looping_while_a_writer_republishes_reads_only_whole_versions(
    tmp_path: Path,
) -> None:
    """A writer process publishes 150 versions of one model path while a reader process
    loads it in a loop: every read is one whole version (its means, covariances and
    precision factors all of the same round), no read fails, and the reader saw many
    versions. Bounded: 150 rounds, and the reader stops at the latest 120 s after start.
    (Replaced versions stay readable for `MODEL_GRACE_SECONDS`; without that grace a
    reader slowed down by a loaded machine lost the race 10 times in a row twice in
    204 reads, against a writer republishing every few milliseconds.)"""
    model, flag = tmp_path / "m.zarr", tmp_path / "writer-state"
    flag.write_text("running")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = [sys.executable, "-c"]
    subprocess.run([*run, WRITER, model, "1"], check=True, env=env, timeout=120)
    reader = subprocess.Popen(
        [*run, READER, model, "120", flag], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        subprocess.run([*run, WRITER, model, "150"], check=True, env=env, timeout=120)
        flag.write_text("done")
        out, _ = reader.communicate(timeout=150)
    finally:
        reader.kill()
    result = json.loads(out)
    assert result["torn"] == [] and result["errors"] == [], result
    assert result["reads"] > 10 and result["seen"] > 2, result
    assert read_model(model)[1]["round"] == 150


def test_replaced_versions_are_removed_after_the_grace(tmp_path: Path, monkeypatch) -> None:
    """Republishing keeps the current and the previous version, and older ones only
    while their grace lasts (here none); hidden leftovers of the writes are removed."""
    model = tmp_path / "m.zarr"
    params = GMMParams.from_covariances(np.ones(1), np.zeros((1, 2)), np.eye(2)[None], "full")
    for _ in range(3):
        write_model(model, params, {})
    assert len([p for p in model.iterdir() if p.name.startswith("v-")]) == 3  # in grace
    monkeypatch.setattr(io_module, "MODEL_GRACE_SECONDS", 0.0)
    write_model(model, params, {})
    names = sorted(p.name for p in model.iterdir())
    assert len(names) == 3 and names[2] == "zarr.json", names  # previous, current
    root = json.loads((model / "zarr.json").read_text())["attributes"]
    assert [root["previous"], root["current"]] == names[:2]


def test_a_format_1_model_is_still_read(tmp_path: Path) -> None:
    """A model of format version 1 (arrays at the model path) loads; saving over it
    writes format version 2."""
    gm = GaussianMixture(2, random_state=0).fit(mixture(200, 2, 2, seed=3))
    path = tmp_path / "old.zarr"
    group = zarr.open_group(str(path), mode="w")
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        group.create_array(name, data=getattr(gm, f"{name}_"))
    group.attrs.update(
        {"format": "dask-em-model", "format_version": 1, "covariance_type": "full", "n_iter": 4}
    )
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.means_, gm.means_)
    assert loaded.n_iter_ == 4
    gm.save(path)
    assert zarr.open_group(str(path)).attrs["format_version"] == 2
    np.testing.assert_array_equal(load_model(path).means_, gm.means_)


# ============================================ 7. unwritable and full destinations
def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr}")


def fill(path: Path) -> None:
    """Write ``path`` until its file system is full (ENOSPC)."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Two 1 MiB tmpfs mounts: ``ro`` (remounted read-only) and ``full`` (filled up)."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    mounted = []
    try:
        for path in (ro, full):
            mount_tmpfs(path, "1m")
            mounted.append(path)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        fill(full / "filler")
        yield {"ro": ro, "full": full, "root": tmp_path}
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_unwritable_destinations_fail_before_the_fit_in_one_line(
    mounts: dict[str, Path], files: dict[str, Path]
) -> None:
    """``--output`` or ``--checkpoint-dir`` on a read-only mount or a full disk, and a
    ``--checkpoint-dir`` naming a regular file: exit 2, one line naming the path and
    the reason, before any pass (no lock, no checkpoint, no model)."""
    ro, full, data = mounts["ro"], mounts["full"], files["data"]
    a_file = mounts["root"] / "a-file"
    a_file.write_text("x")
    fit = ["fit", data, "--n-components", "2", "--quiet", *QUIET]
    good = mounts["root"] / "new.zarr"
    results = run_many(
        {
            "ro output": [*fit, "--output", ro / "m.zarr"],
            "full output": [*fit, "--output", full / "m.zarr"],
            "ro checkpoint": [*fit, "--output", good, "--checkpoint-dir", ro / "ck"],
            "full checkpoint": [*fit, "--output", good, "--checkpoint-dir", full / "ck"],
            "file checkpoint": [*fit, "--output", good, "--checkpoint-dir", a_file],
            "output under a file": [*fit, "--output", a_file / "m.zarr"],
        }
    )
    assert_usage_error(results["ro output"], str(ro), "Read-only file system")
    assert_usage_error(results["full output"], str(full), "MiB free")
    assert_usage_error(results["ro checkpoint"], str(ro), "Read-only file system")
    assert_usage_error(results["full checkpoint"], str(full), "MiB free")
    assert_usage_error(results["file checkpoint"], str(a_file), "regular file, not a directory")
    assert_usage_error(results["output under a file"], str(a_file), "regular file")
    assert not good.exists() and a_file.read_text() == "x"
    assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_writes_failing_on_a_full_disk_raise_one_line_and_leave_nothing(
    mounts: dict[str, Path],
) -> None:
    """On a full disk: the checkpoint lock (its file created, its owner not written),
    a checkpoint save, a model and an array raise CheckpointError/OutputError naming the
    path and the errno text, and leave no lock file and no temporary behind."""
    full = mounts["full"]
    with pytest.raises(CheckpointError, match=f"'{full}/ck'.*No space left on device"):
        with checkpoint_lock(full / "ck"):
            pass
    assert not (full / "ck").exists()

    params = GMMParams.from_covariances(
        np.full(4, 0.25), np.zeros((4, 50)), np.repeat(np.eye(50)[None], 4, axis=0), "full"
    )
    with pytest.raises(OutputError, match=f"'{full}/m.zarr': No space left on device"):
        write_model(full / "m.zarr", params, {})
    with pytest.raises(OutputError, match="No space left on device"):
        store_array(da.ones((100_000, 4), chunks=(10_000, 4)), full / "a.zarr", kind="data")
    assert sorted(p.name for p in full.iterdir()) == ["filler"]

    (full / "filler").unlink()  # room for one state and the lock, then full again
    ckpt = Checkpoint(full / "ck", {"data": 1})
    state = FitState((0,), (EMResult(params, 1, False, -1.0, [-1.0], 1.0),), False)
    with checkpoint_lock(full / "ck"):
        ckpt.save(state, 1)
        fill(full / "filler")
        with pytest.raises(CheckpointError, match="No space left on device"):
            ckpt.save(state, 2)
        assert ckpt.load().n_passes == 1  # the committed state is intact
    assert sorted(p.name for p in (full / "ck").iterdir()) == ["manifest.json", "state-000001"]


def test_a_negative_memory_limit_and_a_json_file_that_is_no_scheduler_file_exit_2(
    tmp_path: Path,
) -> None:
    """Issue 16, case 8: ``--memory-limit=-5GB`` and a ``--scheduler-file`` holding JSON
    without an address were internal errors (exit 1, a traceback); each is now one line,
    exit 2, and no model is written."""
    data = write_array(tmp_path / "d.zarr", mixture(500, 2, 2, seed=0), (250, 2))
    not_a_scheduler_file = tmp_path / "s.json"
    not_a_scheduler_file.write_text('{"a": 1}')
    fit = ["fit", data, "--n-components", "2", "--quiet", "--output"]
    results = run_many(
        {
            "memory": [*fit, tmp_path / "m1.zarr", "--memory-limit=-5GB"],
            "scheduler file": [
                *fit,
                tmp_path / "m2.zarr",
                "--scheduler-file",
                not_a_scheduler_file,
            ],
        }
    )
    assert_usage_error(results["memory"], "--memory-limit", "positive memory size")
    assert_usage_error(results["scheduler file"], "not a Dask scheduler file", "s.json")
    assert not (tmp_path / "m1.zarr").exists() and not (tmp_path / "m2.zarr").exists()


def test_a_reader_closing_the_output_pipe_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    """Issue 16, case 8: ``dask-em info MODEL | head -c0`` — stdout is a pipe whose reader
    is gone before anything is written: one line on stderr, exit 2, no traceback."""
    model = tmp_path / "m.zarr"
    GaussianMixture(2, random_state=0).fit(mixture(300, 2, 2, seed=0)).save(model)
    read, write = os.pipe()
    os.close(read)  # the reader is gone: every write to the pipe fails with EPIPE
    try:
        result = subprocess.run(
            [*dask_em_command(), "info", str(model)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "standard output was closed" in lines[0], result.stderr
