"""Checkpoints of a fit: atomic save, verified load, fingerprints and resume rules.

Layout of a checkpoint directory::

    DIR/manifest.json           the commit point: format, fingerprint, committed states (newest first)
    DIR/state-000012/state.json the state's scalars and the SHA-256 of each array file
    DIR/state-000012/*.npy      the arrays (NumPy format, loaded with allow_pickle=False)
    DIR/lock                    while a fit uses the directory: its pid, host and start time

On an object store (a URL ``directory``, through `dask_em.store.Location`) there is no
rename: a state's arrays and then its ``state.json`` are written under their final
prefix ``state-NNNNNN/`` and the manifest object is written last (one PUT, atomic); the
lock is an object created with a conditional PUT (`_object_lock`).

`Checkpoint.save` writes a new state under a temporary name, fsyncs it, renames it to
``state-NNNNNN`` and then replaces ``manifest.json`` with ``os.replace``; a crash at any
instant leaves the previous manifest and its states intact. The last `KEEP_STATES`
committed states are kept, so a damaged newest state (truncated file, flipped bit: the
checksums catch both) falls back to the one before. `Checkpoint.load` refuses a
checkpoint made for other data or other hyper-parameters (`CheckpointMismatch`, naming
the difference) and raises `CheckpointDamaged` when no committed state is intact. A
state holding any file but its ``state.json`` and listed arrays, or an array that is not
plain floating-point ``.npy`` (an object array would need unpickling), is damaged:
nothing in a checkpoint is ever unpickled. `checkpoint_lock` gives one fit at a time
the use of a directory (`CheckpointLocked` for the others).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dask_em.em import EMResult, FitState
from dask_em.errors import CheckpointError
from dask_em.io import destination_problem
from dask_em.params import PARAM_ARRAYS, GMMParams
from dask_em.store import Location

FORMAT = "dask-em-checkpoint"
FORMAT_VERSION = 2  # 2: one run per initialization (shared passes), SQUAREM step cap
KEEP_STATES = 3
MANIFEST = "manifest.json"


class CheckpointMismatch(CheckpointError):
    """The checkpoint was made for other data or other hyper-parameters."""


class CheckpointDamaged(CheckpointError):
    """No committed state of the checkpoint is intact."""


def _checkpoint_write_failed(directory: Path, err: OSError) -> CheckpointError:
    """The one-line CheckpointError for an OSError met while writing a checkpoint."""
    return CheckpointError(
        f"cannot write the checkpoint {os.fspath(directory)!r}: {err.strerror or err}"
        f"{f' ({err.filename})' if err.filename else ''}; free space or choose another "
        "{checkpoint_dir}."
    )


def content_hash(*arrays: np.ndarray) -> str:
    """SHA-256 (hex) of the bytes, shapes and dtypes of arrays."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class Loaded:
    """A state read back from a checkpoint.

    Attributes
    ----------
    state : FitState
    n_passes : int
        Passes over the data made up to this state.
    sequence : int
        The state's number in the directory.
    skipped : list of str
        Newer states found damaged and passed over, with the reason.
    fingerprint : dict
        What the checkpoint was made for.
    """

    state: FitState
    n_passes: int
    sequence: int
    skipped: list[str]
    fingerprint: dict[str, Any]


class Checkpoint:
    """A checkpoint directory bound to a fingerprint of the data and hyper-parameters.

    Parameters
    ----------
    directory : str or path
        Created on the first `save`.
    fingerprint : dict
        JSON-serializable description of what the fit depends on (see
        `dask_em.estimator`); a checkpoint with another fingerprint is refused.
    storage_options : dict, optional
        fsspec options of a URL ``directory`` (an object store: see `_save_to_object_store`).
    use_lock : bool, default True
        False: an object-store checkpoint is used without its lock (`_object_lock`).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        fingerprint: dict[str, Any],
        storage_options: dict[str, Any] | None = None,
        use_lock: bool = True,
    ) -> None:
        self.place = Location(directory, storage_options)
        self.use_lock = use_lock
        self.directory = Path(directory) if not self.place.is_url else self.place.location
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self._sequence: int | None = None

    @contextmanager
    def lock(self, restart: bool = False) -> Iterator[None]:
        """Hold this checkpoint's lock (see `checkpoint_lock`) in a ``with`` block.

        Parameters
        ----------
        restart : bool, default False
            First `discard` the checkpoint, under the same holding of the lock (so no
            other fit uses the directory between the discard and the fit). A directory
            holding anything but a checkpoint is refused before the lock is written.
        """
        if self.place.is_url:
            with _object_lock(self.place, self.use_lock):
                if restart:
                    _discard_objects(self.place)
                yield
            return
        if restart and self.directory.exists():
            _checkpoint_entries(self.directory)
        with checkpoint_lock(self.directory):
            if restart:
                discard(self.directory)
            yield

    # ------------------------------------------------------------------- save
    def save(self, state: FitState, n_passes: int) -> None:
        """Write ``state`` as the newest committed state, atomically.

        Raises
        ------
        CheckpointError
            If writing fails (read-only or full file system); the previous committed
            state stays intact and the temporary files are removed.
        """
        if self.place.is_url:
            self._save_to_object_store(state, n_passes)
            return
        try:
            self._save(state, n_passes)
        except OSError as err:
            self._prune(self._committed_names())  # what this save left half-written
            raise _checkpoint_write_failed(self.directory, err) from None
        except BaseException:  # stopped by a signal mid-save: leave no half-written state
            self._prune(self._committed_names())
            raise

    def _encode(
        self, state: FitState, n_passes: int, sequence: int
    ) -> tuple[bytes, dict[str, bytes]]:
        """``state.json`` and the ``.npy`` files (name -> bytes) of a state."""
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "sequence": sequence,
            "seeds": [int(s) for s in state.seeds],
            "done": state.done,
            "n_passes": int(n_passes),
            "runs": [],
            "files": {},
        }
        files: dict[str, bytes] = {}
        for index, run in enumerate(state.runs):
            if run is None:
                meta["runs"].append(None)
                continue
            meta["runs"].append(
                {
                    "n_iter": run.n_iter,
                    "converged": run.converged,
                    "lower_bound": run.lower_bound,
                    "lower_bounds": list(run.lower_bounds),
                    "step_max": run.step_max,
                    "covariance_type": run.params.covariance_type,
                }
            )
            for name in PARAM_ARRAYS:
                fname = f"run{index}_{name}.npy"
                buffer = io.BytesIO()
                np.save(buffer, np.asarray(getattr(run.params, name)), allow_pickle=False)
                files[fname] = buffer.getvalue()
                meta["files"][fname] = hashlib.sha256(files[fname]).hexdigest()
        meta["checksum"] = content_hash(
            np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
        )
        return json.dumps(meta, indent=1, sort_keys=True).encode(), files

    def _manifest(self, committed: list[str]) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "fingerprint": self.fingerprint,
                "states": committed,
            },
            indent=1,
            sort_keys=True,
        ).encode()

    def _save(self, state: FitState, n_passes: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._sequence is None:
            self._sequence = max(self._state_numbers(), default=0)
        sequence = self._sequence + 1
        tmp = self.directory / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        state_json, files = self._encode(state, n_passes, sequence)
        for fname, data in files.items():
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        with open(tmp / "state.json", "wb") as f:
            f.write(state_json)
            f.flush()
            os.fsync(f.fileno())
        final = self.directory / f"state-{sequence:06d}"
        os.replace(tmp, final)
        # without a readable manifest the scan already finds ``final``: list it once
        older = [name for name in self._committed_names() if name != final.name]
        committed = [final.name, *older][:KEEP_STATES]
        manifest_tmp = self.directory / f".{MANIFEST}.tmp-{uuid.uuid4().hex}"
        with open(manifest_tmp, "wb") as f:
            f.write(self._manifest(committed))
            f.flush()
            os.fsync(f.fileno())
        os.replace(manifest_tmp, self.directory / MANIFEST)
        _fsync(self.directory)
        self._sequence = sequence
        self._prune(committed)

    def _save_to_object_store(self, state: FitState, n_passes: int) -> None:
        """`save` on an object store (no rename): the state's arrays, then its
        ``state.json``, under its final prefix ``state-NNNNNN/``; then the manifest, one
        PUT, the commit point. A state the manifest does not list is not committed
        (a killed save leaves one; the next save replaces or prunes it)."""
        try:
            if self._sequence is None:
                self._sequence = max(self._state_numbers(), default=0)
            sequence = self._sequence + 1
            target = self.place.child(f"state-{sequence:06d}")
            target.remove()  # what a killed save of the same number left
            state_json, files = self._encode(state, n_passes, sequence)
            for fname, data in files.items():
                target.child(fname).write_bytes(data)
            target.child("state.json").write_bytes(state_json)
            manifest = self._read_manifest()
            older = [str(n) for n in manifest["states"]] if manifest is not None else []
            committed = [target.location.rsplit("/", 1)[-1], *older][:KEEP_STATES]
            self.place.child(MANIFEST).write_bytes(self._manifest(committed))
        except OSError as err:
            raise _checkpoint_write_failed(self.directory, err) from None
        self._sequence = sequence
        for name in self.place.names():
            if name.startswith("state-") and name not in committed:
                self.place.child(name).remove()

    def _state_numbers(self) -> list[int]:
        numbers = []
        for name in self.place.names():
            if not name.startswith("state-"):
                continue
            try:
                numbers.append(int(name.split("-", 1)[1]))
            except ValueError:
                continue
        return numbers

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            manifest = json.loads(self.place.child(MANIFEST).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("states"), list):
            return None
        return manifest

    def _committed_names(self) -> list[str]:
        manifest = self._read_manifest()
        if manifest is None:  # damaged or missing manifest: every complete state counts
            return [f"state-{n:06d}" for n in sorted(self._state_numbers(), reverse=True)]
        return [str(s) for s in manifest["states"]]

    def _prune(self, keep: list[str]) -> None:
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.name.startswith((".tmp-", f".{MANIFEST}.tmp-")) or (
                p.name.startswith("state-") and p.name not in keep
            ):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        p.unlink(missing_ok=True)
                    except OSError:
                        pass  # a read-only file system: nothing to clean

    # ------------------------------------------------------------------- load
    def load(self, check_fingerprint: bool = True) -> Loaded | None:
        """The newest intact committed state, or None for an empty or missing directory.

        Parameters
        ----------
        check_fingerprint : bool, default True
            Refuse a state whose fingerprint differs from this checkpoint's (False to
            inspect any checkpoint, as ``dask-em info`` does).

        Raises
        ------
        CheckpointMismatch
            If the checkpoint was made for other data or hyper-parameters.
        CheckpointDamaged
            If it has committed states but none is intact, or an unknown format.
        """
        if self.place.is_url:
            return self._load_states(check_fingerprint)
        if not self.directory.exists():
            return None
        if not self.directory.is_dir():
            raise CheckpointError(
                f"{os.fspath(self.directory)!r} is a regular file, not a directory; "
                "choose another {checkpoint_dir}."
            )
        names = self._committed_names()
        if not names:
            if any(self.directory.iterdir()) and not (self.directory / MANIFEST).exists():
                leftovers = [
                    p.name
                    for p in self.directory.iterdir()
                    if not p.name.startswith(".") and p.name != LOCK
                ]
                if leftovers:
                    raise CheckpointDamaged(
                        f"{self.directory} is not a dask-em checkpoint (it holds {leftovers[0]!r}); "
                        "choose an empty or new {checkpoint_dir}."
                    )
            return None
        return self._load_states(check_fingerprint)

    def _load_states(self, check_fingerprint: bool) -> Loaded | None:
        """The newest intact committed state (see `load`), local or on an object store."""
        names = self._committed_names()
        if not names:
            return None
        skipped: list[str] = []
        for name in names:
            try:
                meta = self._verified_meta(self.place.child(name))
                state = self._state_from(self.place.child(name), meta)
            except _Damaged as err:
                skipped.append(f"{name}: {err}")
                continue
            if check_fingerprint:
                self._check_fingerprint(meta["fingerprint"])
            return Loaded(
                state,
                meta["n_passes"],
                meta["sequence"],
                skipped,
                meta["fingerprint"],
            )
        raise CheckpointDamaged(
            f"checkpoint {self.directory} is damaged and holds no intact state "
            f"({'; '.join(skipped)}); use {{restart}} to discard it and start over."
        )

    def _verified_meta(self, path: Location) -> dict[str, Any]:
        try:
            meta = json.loads(path.child("state.json").read_bytes())
        except FileNotFoundError:
            raise _Damaged("state.json is missing") from None
        except (OSError, ValueError):
            raise _Damaged("state.json is unreadable") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _Damaged("state.json is not a dask-em checkpoint state")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointDamaged(
                f"checkpoint {self.directory} has format version {meta.get('format_version')!r}; "
                f"this dask-em reads version {FORMAT_VERSION}: use {{restart}} to discard it."
            )
        claimed = meta.pop("checksum", None)
        actual = content_hash(np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8))
        if claimed != actual:
            raise _Damaged("state.json fails its checksum")
        expected = {
            f"run{index}_{name}.npy"
            for index, run in enumerate(meta["runs"])
            if run is not None
            for name in PARAM_ARRAYS
        }
        if set(meta["files"]) != expected:
            raise _Damaged("state.json lists other array files than its runs need")
        present = set(path.names())
        unexpected = sorted(present - expected - {"state.json"})
        if unexpected:  # never read: a state holds nothing but state.json and its arrays
            raise _Damaged(f"it holds {unexpected[0]!r}, which is not part of a dask-em state")
        for fname, digest in meta["files"].items():
            if fname not in present:
                raise _Damaged(f"{fname} is missing")
            if hashlib.sha256(path.child(fname).read_bytes()).hexdigest() != digest:
                raise _Damaged(f"{fname} fails its checksum")
        return meta

    def _check_fingerprint(self, found: dict[str, Any]) -> None:
        if found == self.fingerprint:
            return

        def shown(d: dict[str, Any], k: str) -> str:  # a key may be absent on one side only
            return repr(d[k]) if k in d else "absent"

        def differ(a: dict[str, Any], b: dict[str, Any], k: str) -> bool:
            return (k in a) != (k in b) or a.get(k) != b.get(k)

        diffs = []
        for key in sorted(set(found) | set(self.fingerprint)):
            if not differ(found, self.fingerprint, key):
                continue
            a, b = found.get(key), self.fingerprint.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                diffs += [
                    f"{key}.{k}: {shown(a, k)} in the checkpoint, {shown(b, k)} now"
                    for k in sorted(set(a) | set(b))
                    if differ(a, b, k)
                ]
            else:
                now = shown(self.fingerprint, key)
                diffs.append(f"{key}: {shown(found, key)} in the checkpoint, {now} now")
        raise CheckpointMismatch(
            f"checkpoint {self.directory} was made for a different fit ({'; '.join(diffs)}); "
            "use another {checkpoint_dir}, or {restart} to discard it."
        )

    @staticmethod
    def _state_from(path: Location, meta: dict[str, Any]) -> FitState:
        runs: list[EMResult | None] = []
        for index, info in enumerate(meta["runs"]):
            if info is None:
                runs.append(None)
                continue
            arrays = [_read_npy(path.child(f"run{index}_{name}.npy")) for name in PARAM_ARRAYS]
            runs.append(
                EMResult(
                    GMMParams(*arrays, info["covariance_type"]),
                    int(info["n_iter"]),
                    bool(info["converged"]),
                    float(info["lower_bound"]),
                    [float(b) for b in info["lower_bounds"]],
                    float(info["step_max"]),
                )
            )
        return FitState(tuple(int(s) for s in meta["seeds"]), tuple(runs), bool(meta["done"]))


class _Damaged(Exception):
    """One state failed verification (internal: load falls back to an older state)."""


def _read_npy(path: Location) -> np.ndarray:
    """The floating-point array of a ``.npy`` file, read without ever unpickling.

    Raises
    ------
    _Damaged
        If the file is not a plain ``.npy`` array (an object array would need
        unpickling: it is refused unread) or its dtype is not floating point.
    """
    name = path.location.rstrip("/").rsplit("/", 1)[-1]
    try:
        array = np.lib.format.read_array(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except (OSError, ValueError):
        raise _Damaged(
            f"{name} is not a plain numeric .npy array (object arrays are never unpickled)"
        ) from None
    if array.dtype.kind != "f":
        raise _Damaged(f"{name} holds dtype {array.dtype}, not floating point")
    return array


def discard(directory: str | os.PathLike[str]) -> None:
    """Delete a checkpoint directory's states and manifest (``fit(..., restart=True)``).

    Refuses (`CheckpointDamaged`) a non-empty directory that does not look like a
    checkpoint, so a mistyped path never deletes unrelated files, and
    (`CheckpointLocked`) a checkpoint another fit is using.
    """
    path = Path(directory)
    if not path.exists():
        return
    _checkpoint_entries(path)  # refuse a foreign directory before writing a lock in it
    with checkpoint_lock(path):
        for p in _checkpoint_entries(path):
            if p.name == LOCK:
                continue  # ours: removed when the lock is released
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def check_available(
    directory: str | os.PathLike[str],
    restart: bool = False,
    n_runs: int = 1,
    params_bytes: int = 0,
    storage_options: dict[str, Any] | None = None,
    use_lock: bool = True,
) -> None:
    """Refuse now a checkpoint directory that a fit could not use at this moment.

    Lets a caller fail before a long setup (the CLI: before starting a cluster); the fit
    itself checks again when it takes the lock.

    Parameters
    ----------
    directory : str or path
    restart : bool, default False
        Also refuse what `discard` would: a directory holding anything but a checkpoint.
    n_runs : int, default 1
        Initializations whose parameters each state holds.
    params_bytes : int, default 0
        Bytes of one run's parameters: the free space needed is that of `KEEP_STATES`
        + 1 states (`dask_em.io.destination_problem`).
    storage_options : dict, optional
        fsspec options of a URL ``directory``.
    use_lock : bool, default True
        (Object stores) False: do not take the lock (`_object_lock`).

    Raises
    ------
    CheckpointError
        If the directory cannot be written: a regular file under that name, a parent
        that is a file, a read-only file system, too little free space.
    CheckpointLocked
        If another fit holds the directory's lock.
    CheckpointDamaged
        (``restart``) Naming the first entry that is not part of a checkpoint.
    """
    place = Location(directory, storage_options)
    if place.is_url:
        if restart:
            _checkpoint_objects(place)
        with _object_lock(place, use_lock):
            return
    problem = destination_problem(directory, (KEEP_STATES + 1) * n_runs * params_bytes)
    if problem is not None:
        raise CheckpointError(
            f"cannot use the checkpoint directory: {problem}; choose another {{checkpoint_dir}}."
        )
    if restart and Path(directory).exists():
        _checkpoint_entries(Path(directory))
    with checkpoint_lock(directory):
        pass


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint directory (it holds a manifest, a lock or a state)."""
    p = Path(path)
    return p.is_dir() and ((p / MANIFEST).exists() or (p / LOCK).exists() or any(p.glob("state-*")))


def describe(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """What a checkpoint holds (for ``dask-em info``), or None if ``path`` is not one.

    Parameters
    ----------
    path : str or path
        A checkpoint directory, or one of its ``state-NNNNNN`` directories (the
        checkpoint is described then).

    Returns
    -------
    dict or None
        JSON-ready: ``kind`` ("checkpoint"), the best run's ``n_components``,
        ``covariance_type``, ``n_features``, ``n_iter``, ``converged``, ``lower_bound``
        and ``lower_bounds`` (non-finite bounds as None), ``n_passes``, ``done``,
        ``n_init``, ``runs`` (each initialization's progress), ``hyper_parameters``,
        ``data`` (the data fingerprint) and ``skipped_damaged_states``.

    Raises
    ------
    CheckpointDamaged
        If no committed state is intact.
    CheckpointError
        If it holds no state yet, or only one saved before any initialization ended.
    """
    place = Location(path, storage_options)
    if place.is_url:
        place.check_reachable("the path")
        if MANIFEST not in place.names():
            return None
        loaded = Checkpoint(path, {}, storage_options).load(check_fingerprint=False)
    else:
        directory = Path(path)
        if directory.name.startswith("state-") and (directory / "state.json").exists():
            directory = directory.parent
        if not is_checkpoint_dir(directory):
            return None
        loaded = Checkpoint(directory, {}).load(check_fingerprint=False)
    if loaded is None:
        raise CheckpointError(
            f"{path} holds no checkpoint state yet (a fit may be starting on it)."
        )
    state = loaded.state
    run = state.best
    if run is None:
        raise CheckpointError(
            f"{path} holds a state saved before any initialization finished; run the fit to go on."
        )

    def finite(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    return {
        "kind": "checkpoint",
        "n_components": run.params.n_components,
        "covariance_type": run.params.covariance_type,
        "n_features": run.params.n_features,
        "n_iter": run.n_iter,
        "converged": run.converged,
        "lower_bound": finite(run.lower_bound),
        "lower_bounds": [finite(b) for b in run.lower_bounds],
        "n_passes": loaded.n_passes,
        "done": state.done,
        "n_init": len(state.seeds),
        "runs": [
            None
            if r is None
            else {
                "n_iter": r.n_iter,
                "converged": r.converged,
                "lower_bound": finite(r.lower_bound),
            }
            for r in (state.run(i) for i in range(len(state.seeds)))
        ],
        "hyper_parameters": loaded.fingerprint.get("hyper_parameters", {}),
        "data": loaded.fingerprint.get("data"),
        "skipped_damaged_states": loaded.skipped,
    }


def _checkpoint_entries(path: Path) -> list[Path]:
    """The entries of a checkpoint directory; `CheckpointDamaged` if one is not ours."""
    entries = list(path.iterdir())
    ours = [
        p
        for p in entries
        if p.name in (MANIFEST, LOCK) or p.name.startswith(("state-", ".tmp-", f".{MANIFEST}.tmp-"))
    ]
    if len(ours) != len(entries):
        other = next(p.name for p in entries if p not in ours)
        raise CheckpointDamaged(
            f"{path} holds {other!r}, which is not part of a dask-em checkpoint; "
            "refusing to delete it: choose another {checkpoint_dir}."
        )
    return ours


def data_fingerprint(
    X: Any, sample_weight: Any = None, row_starts: list[int] | None = None
) -> dict[str, Any]:
    """What identifies a dataset cheaply: shape, dtype, row chunks and a hash of sampled rows.

    Parameters
    ----------
    X : dask.array.Array of shape (n, D)
    sample_weight : dask.array.Array of shape (n,), optional
    row_starts : list of int, optional
        First row of each chunk (computed from ``X.chunks`` when not given).

    Returns
    -------
    dict
        ``shape``, ``dtype``, ``row_chunks`` (a hash when there are many) and
        ``content``: the hash of the first row of up to 16 evenly spaced chunks and of
        the last row (and of their weights), read without a full pass.
    """
    chunks = [int(c) for c in X.chunks[0]]
    starts = row_starts if row_starts is not None else [0, *np.cumsum(chunks)[:-1].tolist()]
    picked = sorted({int(i) for i in np.linspace(0, len(chunks) - 1, min(16, len(chunks)))})
    rows = np.array(sorted({*(starts[i] for i in picked), int(X.shape[0]) - 1}))
    sampled = [np.asarray(X[rows].compute(), dtype=np.float64)]
    if sample_weight is not None:
        sampled.append(np.asarray(sample_weight[rows].compute(), dtype=np.float64))
    return {
        "shape": [int(s) for s in X.shape],
        "dtype": str(X.dtype),
        "row_chunks": chunks
        if len(chunks) <= 8
        else f"{len(chunks)} chunks, sha256 {content_hash(np.array(chunks))[:16]}",
        "content": content_hash(*sampled)[:16],
        "sample_weight": sample_weight is not None,
    }


# -------------------------------------------------------------------- lock
LOCK = "lock"
"""Name of the lock file inside a checkpoint directory while a fit uses it."""

_log = logging.getLogger(__name__)
_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


class CheckpointLocked(CheckpointError):
    """Another fit is using the checkpoint directory."""


@dataclass
class _Held:
    """A lock this process holds: its open file, owning thread and nesting depth."""

    fd: int
    thread: int
    depth: int
    created_dir: bool


def _lock_owner(fd: int) -> str:
    """Who holds a lock, from the JSON its holder wrote in the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


def _try_lock(path: Path) -> int:
    """Open and ``flock`` the lock file at ``path``; return its descriptor.

    Retries when the file was unlinked (released) between open and lock, so two
    processes never hold locks on different files of the same name.

    Raises
    ------
    CheckpointLocked
        If another open file of ``path`` holds the lock.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_owner(fd)
            os.close(fd)
            raise CheckpointLocked(
                f"checkpoint {path.parent} is in use by another fit ({owner}); wait for it "
                "to end, or use another {checkpoint_dir}."
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_owner(fd: int, path: Path) -> None:
    """Record this process in the lock file, noting a stale record left by a dead one."""
    previous = os.pread(fd, 4096, 0)
    if previous:
        _log.warning(
            "checkpoint %s: taking over a stale lock (%s, no longer running)",
            path.parent,
            _lock_owner(fd),
        )
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)


@contextmanager
def checkpoint_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of a checkpoint directory for the duration of the ``with`` block.

    The lock is an exclusive ``flock`` on ``DIR/lock``, which holds the JSON
    ``{pid, host, started}`` of its holder. The kernel releases it when the holder's
    process ends, however it ends (SIGKILL too), so a lock file left behind is stale
    by construction and the next fit takes it over, logging that it did. It is
    re-entrant in the thread that holds it (`Checkpoint.lock` discards, then fits); another
    thread or process is refused. On exit the lock file is removed, and the directory
    too if the lock created it and nothing else was written there.

    Parameters
    ----------
    directory : str or path
        The checkpoint directory; created if missing.

    Raises
    ------
    CheckpointLocked
        If another process, or another thread of this one, holds the lock.
    """
    path = Path(directory).absolute()
    with _held_guard:
        held = _held.get(path)
        if held is not None and held.thread != threading.get_ident():
            raise CheckpointLocked(
                f"checkpoint {path} is in use by another fit in this process; "
                "use another {checkpoint_dir}."
            )
        if held is None:
            if path.exists() and not path.is_dir():
                raise CheckpointError(
                    f"{os.fspath(path)!r} is a regular file, not a directory; "
                    "choose another {checkpoint_dir}."
                )
            created = not path.exists()
            try:
                path.mkdir(parents=True, exist_ok=True)
                fd = _try_lock(path / LOCK)
            except (CheckpointLocked, OSError) as err:
                if created:
                    _remove_if_empty(path)
                if isinstance(err, OSError):
                    raise _checkpoint_write_failed(path, err) from None
                raise
            try:
                _write_owner(fd, path / LOCK)
            except OSError as err:  # a full disk: never leave the lock file behind
                (path / LOCK).unlink(missing_ok=True)
                os.close(fd)
                if created:
                    _remove_if_empty(path)
                raise _checkpoint_write_failed(path, err) from None
            held = _Held(fd, threading.get_ident(), 0, created)
            _held[path] = held
        held.depth += 1
    try:
        yield
    finally:
        with _held_guard:
            held.depth -= 1
            if held.depth == 0:
                del _held[path]
                (path / LOCK).unlink(missing_ok=True)  # before unlocking: see `_try_lock`
                os.close(held.fd)
                if held.created_dir:
                    _remove_if_empty(path)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ------------------------------------------------------------------ object stores
def _probe_conditional_put(place: Location) -> bool:
    """Whether the store of ``place`` refuses a create-if-absent write over an existing
    object (S3 ``If-None-Match: *``): two creates of one probe key, the second must fail."""
    probe = place.child(f".lock-probe-{uuid.uuid4().hex}")
    try:
        probe.create(b"1")
        return not probe.create(b"2")
    finally:
        probe.remove()


def _object_lock_owner(lock: Location) -> dict[str, Any] | None:
    try:
        info = json.loads(lock.read_bytes())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextmanager
def _object_lock(place: Location, use_lock: bool = True) -> Iterator[None]:
    """`checkpoint_lock` on an object store: the lock object ``DIR/lock`` is created with
    a create-if-absent write (`dask_em.store.Location.create`), so of two fits starting
    together exactly one gets it; it is deleted when the block ends.

    Nothing releases the lock of a killed process by itself: a lock left by a process
    of this host that no longer runs is taken over (logged); one left by a fit killed on
    another machine must be deleted by hand (the message says so).

    Parameters
    ----------
    place : Location
    use_lock : bool, default True
        False: no lock at all (for stores without conditional writes; the user runs one
        fit at a time).

    Raises
    ------
    CheckpointError
        If the store ignores conditional writes (and ``use_lock``).
    CheckpointLocked
        If another fit holds the lock.
    """
    place.check_reachable("the checkpoint")
    if not use_lock:
        yield
        return
    if not _probe_conditional_put(place):
        raise CheckpointError(
            f"the object store of the checkpoint {place.location!r} ignores conditional "
            "writes (If-None-Match), so the one-fit-at-a-time lock cannot work there; pass "
            "{no_lock} to checkpoint without the lock (then run one fit at a time on it)."
        )
    lock = place.child(LOCK)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }
    for _ in range(3):
        if lock.create(json.dumps(info).encode()):
            break
        owner = _object_lock_owner(lock)
        if owner is None:
            continue  # released meanwhile (or being written): try again
        shown = (
            f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
        )
        if owner.get("host") == info["host"] and not _pid_alive(int(owner.get("pid", 0))):
            _log.warning("checkpoint %s: taking over a stale lock (%s)", place.location, shown)
            lock.remove()
            continue
        raise CheckpointLocked(
            f"checkpoint {place.location} is in use by another fit ({shown}); wait for it to "
            f"end, or if that fit was killed, delete {lock.location} and run again."
        )
    else:
        raise CheckpointLocked(
            f"checkpoint {place.location} is being locked by other fits; try again."
        )
    try:
        yield
    finally:
        owner = _object_lock_owner(lock)
        if owner is not None and owner.get("token") == info["token"]:
            lock.remove()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _checkpoint_objects(place: Location) -> list[str]:
    """The names under an object-store checkpoint; `CheckpointDamaged` if one is not ours."""
    names = place.names()
    foreign = [
        n
        for n in names
        if n not in (MANIFEST, LOCK) and not n.startswith(("state-", ".lock-probe-"))
    ]
    if foreign:
        raise CheckpointDamaged(
            f"{place.location} holds {foreign[0]!r}, which is not part of a dask-em "
            "checkpoint; refusing to delete it: choose another {checkpoint_dir}."
        )
    return names


def _discard_objects(place: Location) -> None:
    """`discard` on an object store: delete the manifest first (nothing is committed
    then), then the states; anything else under the prefix is refused, untouched."""
    names = _checkpoint_objects(place)
    place.child(MANIFEST).remove()
    for name in names:
        if name.startswith("state-"):
            place.child(name).remove()
