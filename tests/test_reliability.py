"""Reliability guarantees: the checkpoint lock, no unpickling ever, numeric data only,
unknown format versions, leftovers of killed writers.

Real files, real Zarr stores and real processes (no mocks): a second process holds a
checkpoint's lock while this one tries to use it; a lock holder is SIGKILLed to leave a
stale lock; planted pickles carry a payload that would create a marker directory if
anything unpickled them, and the tests assert the marker never appears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import zarr
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_usage_error,
    kill_group,
    mixture,
    run_cli,
    run_many,
    snapshot,
    start_cli,
    wait_for,
    wait_for_committed,
    write_array,
)

from dask_em import GaussianMixture, load_model, staging
from dask_em import io as io_module
from dask_em.checkpoint import (
    LOCK,
    Checkpoint,
    CheckpointDamaged,
    CheckpointLocked,
    checkpoint_lock,
    content_hash,
    discard,
)
from dask_em.em import EMResult, FitState
from dask_em.errors import DataError
from dask_em.io import model_version_path, open_array, store_array
from dask_em.params import GMMParams

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

HOLDER = textwrap.dedent(
    """
    import sys
    from dask_em.checkpoint import checkpoint_lock

    with checkpoint_lock(sys.argv[1]):
        sys.stdin.readline()  # hold the lock until told (or killed)
    """
)


def make_state(n_iter: int) -> FitState:
    """A one-run state of 2 components in 2 dimensions whose means equal ``n_iter``."""
    cov = np.tile(np.eye(2), (2, 1, 1))
    params = GMMParams(np.full(2, 0.5), np.full((2, 2), float(n_iter)), cov, cov, "full")
    run = EMResult(params, n_iter, False, -float(n_iter), [-float(n_iter)])
    return FitState((1,), (run,))


def lock_pid(directory: Path) -> int | None:
    """The pid recorded in a checkpoint's lock file (None while absent or being written)."""
    try:
        return int(json.loads((directory / LOCK).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """Another process holding the lock of a checkpoint with two committed states."""
    ckpt = tmp_path / "ckpt"
    for n in (1, 2):
        Checkpoint(ckpt, {"f": 1}).save(make_state(n), n)
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(ckpt)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: lock_pid(ckpt) == process.pid, 60, "the holder to take the lock")
        yield ckpt, process
    finally:
        kill_group(process)


class Payload:
    """Pickles to a call that creates the directory ``marker``: proof of unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.marker,)


# ===================================================================== lock
def test_a_second_process_is_refused_while_another_holds_the_lock(
    holder: tuple[Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    """While another process holds the lock: taking it, `discard` and a Python fit are
    refused with `CheckpointLocked` naming the holder's pid; ``dask-em fit`` (with and
    without ``--restart``) exits 2 with one line; ``dask-em info`` still reads the
    checkpoint. Nothing is written. Once the holder ends, the lock is free and gone."""
    ckpt, process = holder
    before = snapshot(ckpt)
    data = write_array(tmp_path / "data.zarr", mixture(300, 2, 2, seed=1))
    with pytest.raises(CheckpointLocked, match=f"in use by another fit \\(pid {process.pid} "):
        with checkpoint_lock(ckpt):
            pass
    with pytest.raises(CheckpointLocked, match=f"pid {process.pid}"):
        discard(ckpt)
    with pytest.raises(CheckpointLocked, match=f"pid {process.pid}"):
        GaussianMixture(2, max_iter=2, checkpoint_dir=ckpt).fit(data)

    fit = ["fit", data, "--n-components", "2", "--checkpoint-dir", ckpt, *LOCAL]
    results = run_many(
        {
            "fit": [*fit, "--output", tmp_path / "a.zarr"],
            "restart": [*fit, "--output", tmp_path / "b.zarr", "--restart"],
            "info": ["info", ckpt],
        }
    )
    for key in ("fit", "restart"):
        assert_usage_error(results[key], "in use by another fit", f"pid {process.pid}")
    assert_ok(results["info"])
    assert json.loads(results["info"].stdout)["n_iter"] == 2
    assert snapshot(ckpt) == before
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()

    process.communicate("\n", timeout=60)
    assert process.returncode == 0
    assert not (ckpt / LOCK).exists()
    with checkpoint_lock(ckpt):
        assert lock_pid(ckpt) == os.getpid()


def test_a_lock_left_by_a_killed_process_is_stale_and_taken_over(
    holder: tuple[Path, subprocess.Popen[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The holder is SIGKILLed: its lock file stays, but the kernel released the lock, so
    the next fit takes it over (logging so), resumes from the checkpoint and removes
    the lock file at the end."""
    ckpt, process = holder
    kill_group(process)
    assert lock_pid(ckpt) == process.pid  # the file is left behind
    X = mixture(200, 2, 2, seed=3)
    with caplog.at_level(logging.WARNING, logger="dask_em.checkpoint"):
        with checkpoint_lock(ckpt):
            assert lock_pid(ckpt) == os.getpid()
    assert f"taking over a stale lock (pid {process.pid}" in caplog.text
    assert not (ckpt / LOCK).exists()

    (ckpt / LOCK).write_text(json.dumps({"pid": process.pid, "host": "h", "started": "t"}))
    discard(ckpt)  # a stale lock does not block --restart either
    assert list(ckpt.iterdir()) == []
    gm = GaussianMixture(2, max_iter=3, random_state=0, checkpoint_dir=ckpt).fit(X)
    assert gm.n_iter_ >= 1 and not (ckpt / LOCK).exists()


def test_the_lock_is_reentrant_in_its_thread_and_refuses_other_threads(tmp_path: Path) -> None:
    """``--restart`` discards then fits under one lock (re-entrant in the holding thread);
    a fit in another thread of the same process is refused."""
    ckpt = tmp_path / "ckpt"
    Checkpoint(ckpt, {"f": 1}).save(make_state(1), 1)
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with checkpoint_lock(ckpt):
                pass
        except CheckpointLocked as err:
            errors.append(err)

    with checkpoint_lock(ckpt):
        with checkpoint_lock(ckpt):
            discard(ckpt)
            assert [p.name for p in ckpt.iterdir()] == [LOCK]
            assert Checkpoint(ckpt, {"f": 1}).load() is None  # the lock alone is no state
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert (ckpt / LOCK).exists()
    assert len(errors) == 1 and "in this process" in str(errors[0])
    assert list(ckpt.iterdir()) == []


def test_the_lock_is_released_on_failure_and_keyboard_interrupt(tmp_path: Path) -> None:
    """An exception or a KeyboardInterrupt inside the locked block releases the lock and
    removes its file; a directory the lock created is removed when left empty."""
    ckpt = tmp_path / "new" / "ckpt"
    for error in (KeyboardInterrupt(), CheckpointDamaged("x")):
        with pytest.raises(type(error)):
            with checkpoint_lock(ckpt):
                assert (ckpt / LOCK).exists()
                raise error
        assert not ckpt.exists()
    X = mixture(200, 2, 2, seed=4)
    GaussianMixture(2, max_iter=2, random_state=0, checkpoint_dir=ckpt).fit(X)
    assert "manifest.json" in os.listdir(ckpt) and LOCK not in os.listdir(ckpt)
    with pytest.raises(ValueError, match="different fit"):  # refused: lock released
        GaussianMixture(3, max_iter=2, random_state=0, checkpoint_dir=ckpt).fit(X)
    assert not (ckpt / LOCK).exists()


@pytest.mark.slow
def test_a_running_cli_fit_holds_the_lock_until_killed(tmp_path: Path) -> None:
    """A real ``dask-em fit`` in progress: a second fit on its checkpoint exits 2 with one
    line, ``info`` reads it; after a SIGKILL of the first, the same command resumes."""
    data = write_array(tmp_path / "data.zarr", mixture(20_000, 4, 4, seed=5), (1000, 4))
    ckpt = tmp_path / "ckpt"
    command = ["fit", data, "--n-components", "4", "--tol", "0", "--max-iter", "400"]
    command += ["--checkpoint-dir", ckpt, "--output", tmp_path / "m.zarr", "--quiet", *LOCAL]
    first = start_cli(*command)
    try:
        wait_for_committed(first, ckpt, 2, 120)
        results = run_many({"second": command, "info": ["info", ckpt]})
        assert_usage_error(results["second"], "in use by another fit", f"pid {first.pid}")
        assert_ok(results["info"])
    finally:
        kill_group(first)
    assert lock_pid(ckpt) == first.pid
    # the last --max-iter wins: the same fit (max_iter is not in the fingerprint), ending now
    resumed = run_cli(*command, "--max-iter", "3", timeout=300)
    assert_ok(resumed)
    assert not (ckpt / LOCK).exists()


# ============================================================ no unpickling
def reseal(state: Path) -> None:
    """Recompute a state's checksums after tampering (a crafted checkpoint, not damage)."""
    meta = json.loads((state / "state.json").read_text())
    meta.pop("checksum")
    for fname in meta["files"]:
        meta["files"][fname] = hashlib.sha256((state / fname).read_bytes()).hexdigest()
    meta["checksum"] = content_hash(
        np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    )
    (state / "state.json").write_text(json.dumps(meta))


def plant_object_npy(state: Path, marker: Path) -> None:
    """Replace a state's means by an object-dtype .npy whose pickle would create ``marker``."""
    np.save(state / "run0_means.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)


PLANTS = {
    "extra evil.pkl": (
        lambda state, marker: (state / "evil.pkl").write_bytes(pickle.dumps(Payload(marker))),
        "'evil.pkl', which is not part of a dask-em state",
    ),
    "object npy with resealed checksums": (
        lambda state, marker: (plant_object_npy(state, marker), reseal(state)),
        "run0_means.npy is not a plain numeric .npy array",
    ),
    "object npy": (plant_object_npy, "run0_means.npy fails its checksum"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_a_planted_pickle_in_a_checkpoint_is_never_unpickled(tmp_path: Path, plant: str) -> None:
    """A pickle planted in the newest state makes it damaged: load falls back to the state
    before, naming the file; with no other state, `CheckpointDamaged`. Never unpickled."""
    marker = tmp_path / "unpickled"
    ckpt = tmp_path / "ckpt"
    for n in (1, 2):
        Checkpoint(ckpt, {"f": 1}).save(make_state(n), n)
    plant_fn, reason = PLANTS[plant]
    plant_fn(ckpt / "state-000002", marker)
    loaded = Checkpoint(ckpt, {"f": 1}).load()
    assert loaded is not None and loaded.sequence == 1
    assert len(loaded.skipped) == 1 and reason in loaded.skipped[0]

    plant_fn(ckpt / "state-000001", marker)
    with pytest.raises(CheckpointDamaged, match="holds no intact state"):
        Checkpoint(ckpt, {"f": 1}).load()
    assert not marker.exists()


def write_v2_array(path: Path, dtype: Any, filters: Any, compressor: Any, chunk: bytes) -> None:
    """Hand-write a Zarr v2 array of shape (4, 2) in one chunk (``chunk``: its stored bytes)."""
    path.mkdir(parents=True)
    meta = {
        "zarr_format": 2,
        "shape": [4, 2],
        "chunks": [4, 2],
        "dtype": dtype,
        "compressor": compressor,
        "fill_value": None,
        "filters": filters,
        "order": "C",
        "dimension_separator": ".",
    }
    (path / ".zarray").write_text(json.dumps(meta))
    (path / "0.0").write_bytes(chunk)


def write_v3_pickle_array(path: Path, chunk: bytes) -> None:
    """Hand-write a Zarr v3 float64 array of shape (4, 2) whose codecs end with a pickle."""
    path.mkdir(parents=True)
    meta = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [4, 2],
        "data_type": "float64",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 2]}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": 0.0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "pickle"}],
    }
    (path / "zarr.json").write_text(json.dumps(meta))
    (path / "c").mkdir()
    (path / "c" / "0").mkdir()
    (path / "c" / "0" / "0").write_bytes(chunk)


UNSAFE_STORES = {  # case: (writer(path, chunk), what the message names)
    "v2 object array, pickle filter": (
        lambda p, c: write_v2_array(p, "|O", [{"id": "pickle", "protocol": 5}], None, c),
        "'pickle' codec",
    ),
    "v2 float64, pickle compressor": (
        lambda p, c: write_v2_array(p, "<f8", None, {"id": "pickle", "protocol": 5}, c),
        "'pickle' codec",
    ),
    "v2 object array, msgpack2 filter": (
        lambda p, c: write_v2_array(p, "|O", [{"id": "msgpack2"}], None, c),
        "'msgpack2' codec",
    ),
    "v2 strings, vlen-utf8": (
        lambda p, c: write_v2_array(p, "|O", [{"id": "vlen-utf8"}], None, c),
        "'vlen-utf8' codec",
    ),
    "v2 structured dtype": (
        lambda p, c: write_v2_array(p, [["a", "<f8"], ["b", "<i4"]], None, None, c),
        "not a real numeric type",
    ),
    "v3 float64, pickle codec": (write_v3_pickle_array, "'pickle' codec"),
}


@pytest.fixture(scope="module")
def unsafe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each store of `UNSAFE_STORES` (chunks holding a pickle that creates a marker), a
    model whose ``means`` is replaced by such a store, and the CLI run on each."""
    root = tmp_path_factory.mktemp("unsafe")
    marker = root / "unpickled"
    chunk = pickle.dumps(Payload(marker))
    model = root / "model.zarr"
    X = mixture(200, 2, 2, seed=2)
    GaussianMixture(2, max_iter=3, random_state=0).fit(X).save(model)
    data = write_array(root / "data.zarr", X)
    for index, (write, _) in enumerate(UNSAFE_STORES.values()):
        write(root / f"{index}.zarr", chunk)
    bad_model = root / "bad-model.zarr"
    shutil.copytree(model, bad_model)
    shutil.rmtree(model_version_path(bad_model) / "means")
    write_v3_pickle_array(model_version_path(bad_model) / "means", chunk)
    commands: dict[str, list[object]] = {
        "fit": ["fit", root / "0.zarr", "--n-components", "2", "--output", root / "m.zarr"],
        "info": ["info", bad_model],
    }
    return {
        "root": root,
        "data": data,
        "marker": marker,
        "bad model": bad_model,
        "results": run_many(commands),
    }


@pytest.mark.parametrize("case", list(UNSAFE_STORES))
def test_pickle_object_and_non_numeric_stores_are_refused_unread(
    unsafe: dict[str, Any], case: str
) -> None:
    """Data whose dtype is not numeric or whose codecs unpickle or make Python objects is
    refused by `open_array`, by a fit and by ``dask-em fit`` (exit 2, one line naming the
    codec or dtype and the fix), before any chunk is read: the payload never runs."""
    index = list(UNSAFE_STORES).index(case)
    path = unsafe["root"] / f"{index}.zarr"
    fragment = UNSAFE_STORES[case][1]
    with pytest.raises(DataError, match=fragment.replace("(", "\\(")):
        open_array(path)
    with pytest.raises(DataError, match="float32 or float64"):
        GaussianMixture(2).fit(str(path))
    assert not unsafe["marker"].exists()


def test_cli_refuses_a_pickled_store_and_model_with_one_line(unsafe: dict[str, Any]) -> None:
    """``dask-em fit`` on data stored with a pickle codec and ``dask-em info`` on a model
    with such an array exit 2 with one line naming the codec; the payload never runs."""
    assert_usage_error(unsafe["results"]["fit"], "'pickle' codec", "float32 or float64")
    assert_usage_error(unsafe["results"]["info"], "means is encoded with the 'pickle' codec")
    assert not unsafe["marker"].exists()


@pytest.mark.slow
def test_cli_refuses_every_unsafe_store_and_model(unsafe: dict[str, Any]) -> None:
    """Every store of `UNSAFE_STORES` through ``dask-em fit``, and the pickled model through
    ``dask-em predict`` and ``score``: exit 2, one line naming the codec or dtype."""
    root, model = unsafe["root"], unsafe["bad model"]
    commands: dict[str, list[object]] = {
        case: ["fit", root / f"{i}.zarr", "--n-components", "2", "--output", root / f"{i}m.zarr"]
        for i, case in enumerate(UNSAFE_STORES)
    }
    commands["predict"] = ["predict", model, unsafe["data"], "--output", root / "labels.zarr"]
    commands["score"] = ["score", model, unsafe["data"]]
    results = run_many(commands)
    for case, (_, fragment) in UNSAFE_STORES.items():
        assert_usage_error(results[case], fragment, "float32 or float64")
    for command in ("predict", "score"):
        assert_usage_error(results[command], "'pickle' codec")
    assert not unsafe["marker"].exists()


def test_a_model_with_a_pickled_array_is_refused_unread(unsafe: dict[str, Any]) -> None:
    """A model whose ``means`` array is stored with a pickle codec: `load_model` refuses
    it naming the codec before reading any array; nothing runs."""
    with pytest.raises(DataError, match="model array .*means is encoded with the 'pickle'"):
        load_model(unsafe["bad model"])
    assert not unsafe["marker"].exists()


@pytest.mark.filterwarnings("ignore:The data type .* does not have a Zarr V3 specification")
def test_opened_arrays_of_strings_or_records_are_refused(tmp_path: Path) -> None:
    """A `zarr.Array` passed directly (no stored metadata read by dask-em) is checked from
    its metadata: a string array (vlen-utf8 codec) and a structured array are refused."""
    strings = zarr.create_array(store=str(tmp_path / "s.zarr"), shape=(4, 2), dtype=str)
    with pytest.raises(DataError, match="'vlen-utf8' codec"):
        open_array(strings)
    records = zarr.create_array(
        store=str(tmp_path / "r.zarr"), shape=(4, 2), dtype=[("a", "f8"), ("b", "i4")]
    )
    with pytest.raises(DataError, match="not a real numeric type"):
        GaussianMixture(2).fit(records)


# ===================================================== unknown format versions
@pytest.fixture
def unknown_versions(tmp_path: Path) -> dict[str, Any]:
    """Data, and a checkpoint and a model of it whose format versions are 99 and 999."""
    X = mixture(200, 2, 2, seed=7)
    data = write_array(tmp_path / "data.zarr", X)
    ckpt, model = tmp_path / "ckpt", tmp_path / "model.zarr"
    GaussianMixture(2, max_iter=2, random_state=0, checkpoint_dir=ckpt).fit(X).save(model)
    for state in ckpt.glob("state-*"):
        meta = json.loads((state / "state.json").read_text())
        meta["format_version"] = 99
        (state / "state.json").write_text(json.dumps(meta))
    zarr.open_group(str(model), mode="r+").attrs["format_version"] = 999
    return {"X": X, "data": data, "ckpt": ckpt, "model": model, "root": tmp_path}


def test_unknown_format_versions_are_refused_in_one_line(unknown_versions: dict[str, Any]) -> None:
    """A checkpoint state or a model of an unknown format version: the Python API raises
    a DataError naming the version; ``dask-em info`` exits 2 with one line naming it."""
    X, ckpt, model = (unknown_versions[k] for k in ("X", "ckpt", "model"))
    with pytest.raises(CheckpointDamaged, match="format version 99"):
        GaussianMixture(2, max_iter=2, random_state=0, checkpoint_dir=ckpt).fit(X)
    with pytest.raises(DataError, match="format version 999"):
        load_model(model)

    results = run_many({"checkpoint": ["info", ckpt], "model": ["info", model]})
    assert_usage_error(results["checkpoint"], "format version 99", "--restart")
    assert_usage_error(results["model"], "format version 999", "upgrade dask-em")


@pytest.mark.slow
def test_fit_and_predict_refuse_unknown_format_versions(unknown_versions: dict[str, Any]) -> None:
    """``dask-em fit --checkpoint-dir`` on a checkpoint, and ``dask-em predict`` with a
    model, of unknown format versions: exit 2, one line naming the version."""
    data, ckpt, model, root = (unknown_versions[k] for k in ("data", "ckpt", "model", "root"))
    fit = ["fit", data, "--n-components", "2", "--checkpoint-dir", ckpt, "--quiet", *LOCAL]
    results = run_many(
        {
            "fit": [*fit, "--output", root / "m.zarr"],
            "predict": ["predict", model, data, "--output", root / "labels.zarr"],
        }
    )
    assert_usage_error(results["fit"], "format version 99", "--restart")
    assert_usage_error(results["predict"], "format version 999")


# ------------------------------------------------------------ leftovers of killed writers
def dead_pid() -> int:
    """The pid of a real process that has exited (and been reaped)."""
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(process.stdout)


def test_leftovers_of_dead_writers_are_cleaned_and_an_output_renamed_aside_is_restored(
    tmp_path: Path,
) -> None:
    """The state a writer killed between its two renames leaves (the earlier output
    renamed aside, no output) and a half-written array of a dead writer: the next write
    puts the earlier output back, removes the half-written array, then publishes; files
    of live writers and of other hosts are left alone."""
    out = tmp_path / "labels.zarr"
    store_array(da.from_array(np.arange(10), chunks=4), out, kind="predictions")
    earlier = snapshot(out)
    dead, host = dead_pid(), staging.HOST
    aside = tmp_path / f".labels.zarr.old-{host}-{dead}-{uuid.uuid4().hex}"
    os.replace(out, aside)
    half = tmp_path / f".labels.zarr.tmp-{host}-{dead}-{uuid.uuid4().hex}"
    shutil.copytree(aside, half)
    (half / "zarr.json").unlink()
    live = tmp_path / f".labels.zarr.tmp-{host}-{os.getpid()}-{uuid.uuid4().hex}"
    other_host = tmp_path / f".labels.zarr.tmp-elsewhere-{dead}-{uuid.uuid4().hex}"
    live.mkdir()
    other_host.mkdir()

    done = io_module._clean_leftovers(out)
    assert len(done) == 2 and "restored" in done[0] and "removed" in done[1], done
    assert snapshot(out) == earlier
    assert not aside.exists() and not half.exists()
    assert live.is_dir() and other_host.is_dir()

    store_array(da.from_array(np.arange(10) * 2, chunks=4), out, kind="predictions")  # next
    np.testing.assert_array_equal(zarr.open_array(str(out), mode="r")[...], np.arange(10) * 2)
    leftovers = {p.name for p in tmp_path.iterdir() if p.name.startswith(".labels.zarr")}
    assert leftovers == {live.name, other_host.name}
