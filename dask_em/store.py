"""Where dask-em's bytes live: strict access to Zarr chunks, and the storage interface.

`Location` is the one interface to local directories and object stores (fsspec URLs,
``s3://``): whole-object atomic writes, create-if-absent writes, listing, removal, and
`Location.check_reachable`, which turns denied credentials, a missing bucket or an
unreachable endpoint into one-line errors; `object_lock` is a one-writer-at-a-time lock
made of a create-if-absent object; `close_sessions` closes s3fs's HTTP sessions before
exit. Everything above it uses the same calls for both kinds of storage.

Strict access to Zarr chunks: every chunk present and decodable, or an error naming it.

Zarr fills a chunk missing from the store with the array's fill value (by design, for
sparse arrays; Zarr 3.1 has no option to raise instead), and a chunk that fails to
decode surfaces as a codec error naming no file. For data and models neither is what
the user means: a deleted chunk would be trained on as zeros. This module owns the two
checks:

- `check_chunks_present` lists the store's keys once, when an array is opened, and
  names the first stored chunk (or shard) that is missing. dask-em's own writers store
  every chunk (`WRITE_EVERY_CHUNK`), so only a foreign store that left out chunks of
  fill values is refused, with a message saying how to rewrite it.
- `StrictArray` wraps a `zarr.Array` for `dask.array.from_array`: a read that fails to
  decode, inside whichever Dask task reads it, raises `DataError` naming the chunk's
  key and the store. The error pickles, so it crosses from worker processes intact.
  Blosc decodes a truncated chunk without an error about half the time (it reads past
  the buffer and returns garbage), so for arrays whose last codec is Blosc the chunk's
  size is first checked against the compressed size in its Blosc header (one 16-byte
  read and one size query per chunk: tens of microseconds on a local store).

Keys are the store keys of Zarr's chunk grid, through Zarr's own key encoding (v2
``0.0`` or ``0/0``, v3 ``c/0/0`` or ``0.0``); a sharded array is checked shard by shard
(a chunk missing inside a present shard is recorded empty in the shard's index and is
not detected here).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zarr
from dask.base import tokenize
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from dask_em.errors import DataError, ParameterError, UserError
from dask_em.staging import process_alive

WRITE_EVERY_CHUNK = {"write_empty_chunks": True}
"""Zarr array config of every array dask-em writes: chunks equal to the fill value are
stored too, so that a missing chunk always means a damaged store."""


def store_location(node: zarr.Array, key: str | None = None) -> str:
    """Where an array (or one of its keys) lives: a local path, or the store's URL."""
    location = str(node.store_path)
    if location.startswith("file://"):
        location = location[len("file://") :]
    return location if key is None else f"{location.rstrip('/')}/{key}"


async def _list(store: Any, prefix: str) -> set[str]:
    return {key async for key in store.list_prefix(prefix)}


def check_chunks_present(node: zarr.Array, name: str) -> None:
    """Raise DataError naming the first chunk of ``node`` missing from its store.

    One listing of the array's prefix, compared to the keys of every chunk (or shard)
    of its grid.

    Parameters
    ----------
    node : zarr.Array
    name : str
        What to call the array in the message.
    """
    prefix = node.store_path.path
    present = sync(_list(node.store_path.store, f"{prefix}/" if prefix else ""))
    expected = list(node._iter_shard_keys())
    missing = [key for key in expected if (f"{prefix}/{key}" if prefix else key) not in present]
    if missing:
        raise DataError(
            f"{name} lacks {len(missing)} of its {len(expected)} stored chunk(s), the first "
            f"{store_location(node, missing[0])!r}; Zarr would read it as the fill value "
            f"{node.fill_value}, so dask-em refuses the store. Restore the chunk, or if "
            "the store was written leaving out chunks of fill values, rewrite it with every "
            "chunk stored (zarr.create_array(..., config={'write_empty_chunks': True}))."
        )


def _chunk_ranges(node: zarr.Array, selection: tuple[slice, ...]) -> list[tuple[int, ...]]:
    """Grid coordinates of the stored chunks (or shards) a selection of slices touches."""
    grid = node.shards or node.chunks
    ranges = []
    for s, size, n in zip(selection, grid, node.shape, strict=True):
        start, stop, _ = s.indices(n)
        ranges.append(range(start // size, max(start, stop - 1) // size + 1))
    return [
        tuple(r[i] for r, i in zip(ranges, index, strict=True))
        for index in np.ndindex(*(len(r) for r in ranges))
    ]


def _blosc_framed(node: zarr.Array) -> bool:
    """Whether each stored chunk of ``node`` is exactly one Blosc frame (unsharded arrays
    whose last codec, or v2 compressor, is Blosc)."""
    if node.shards is not None:
        return False
    meta = node.metadata.to_dict()
    if meta.get("zarr_format") == 2:
        compressor = meta.get("compressor")
        return isinstance(compressor, dict) and compressor.get("id") == "blosc"
    codecs = list(meta.get("codecs") or [])
    return bool(codecs) and isinstance(codecs[-1], dict) and codecs[-1].get("name") == "blosc"


async def _blosc_sizes(store: Any, keys: list[str]) -> list[tuple[int, int] | None]:
    """``(size in the Blosc header, stored size)`` of each key (None if missing)."""

    async def one(key: str) -> tuple[int, int] | None:
        head = await store.get(key, default_buffer_prototype(), RangeByteRequest(0, 16))
        if head is None:
            return None
        raw = head.to_bytes()
        claimed = int.from_bytes(raw[12:16], "little") if len(raw) == 16 else -1
        return claimed, await store.getsize(key)

    return list(await asyncio.gather(*(one(k) for k in keys)))


def _local_blosc_sizes(root: str, keys: list[str]) -> list[tuple[int, int] | None]:
    """`_blosc_sizes` for a local store: a 16-byte read and the size of each file."""
    sizes: list[tuple[int, int] | None] = []
    for key in keys:
        try:
            with open(os.path.join(root, key), "rb") as f:
                raw = f.read(16)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            sizes.append(None)
            continue
        sizes.append((int.from_bytes(raw[12:16], "little") if len(raw) == 16 else -1, size))
    return sizes


def _check_blosc_frames(node: zarr.Array, selection: tuple[slice, ...]) -> None:
    """Raise DataError naming a Blosc chunk whose stored size differs from its header's."""
    prefix = node.store_path.path
    keys = [node.metadata.encode_chunk_key(c) for c in _chunk_ranges(node, selection)]
    full = [f"{prefix}/{k}" if prefix else k for k in keys]
    store = node.store_path.store
    if isinstance(store, LocalStore):
        found = _local_blosc_sizes(str(store.root), full)
    else:
        found = sync(_blosc_sizes(store, full))
    for key, sizes in zip(keys, found, strict=True):
        if sizes is not None and sizes[0] != sizes[1]:
            raise DataError(
                f"chunk {store_location(node, key)!r} of the Zarr store "
                f"{store_location(node)!r} cannot be read (it holds {sizes[1]} bytes, its "
                f"Blosc header says {sizes[0]}: truncated or overwritten); the store is "
                "damaged: restore or rewrite that chunk."
            )


def chunk_error(node: zarr.Array, selection: Any, err: Exception) -> DataError:
    """The DataError for a failed read of ``node[selection]``, naming the chunk at fault.

    Reads each stored chunk (or shard) the selection touches on its own to find the
    first that fails; names the whole selection's store if none fails alone.
    """
    grid = node.shards or node.chunks
    key = None
    if isinstance(selection, tuple) and all(isinstance(s, slice) for s in selection):
        for coords in _chunk_ranges(node, selection):
            region = tuple(
                slice(c * size, min((c + 1) * size, n))
                for c, size, n in zip(coords, grid, node.shape, strict=True)
            )
            try:
                node[region]
            except Exception:  # noqa: BLE001 - any failure names this chunk
                key = node.metadata.encode_chunk_key(coords)
                break
    where = store_location(node, key) if key is not None else store_location(node)
    what = " ".join(f"{type(err).__name__}: {err}".split())[:200]
    return DataError(
        f"chunk {where!r} of the Zarr store {store_location(node)!r} cannot be read ({what}); "
        "the store is damaged: restore or rewrite that chunk."
    )


class StrictArray:
    """A `zarr.Array` for `dask.array.from_array` whose failed reads name their chunk.

    Parameters
    ----------
    node : zarr.Array
        Opened for reading; its chunks are checked with `check_chunks_present` first.

    Attributes
    ----------
    shape, dtype, ndim
        Those of ``node``.
    """

    def __init__(self, node: zarr.Array) -> None:
        self.node = node
        self.shape = node.shape
        self.dtype = node.dtype
        self.ndim = node.ndim
        self._blosc = _blosc_framed(node)

    def __getitem__(self, selection: Any) -> np.ndarray:
        slices = isinstance(selection, tuple) and all(isinstance(s, slice) for s in selection)
        if self._blosc and slices:
            _check_blosc_frames(self.node, selection)
        try:
            return np.asarray(self.node[selection])
        except Exception as err:  # noqa: BLE001 - a read that fails is a damaged chunk
            raise chunk_error(self.node, selection, err) from None

    def __dask_tokenize__(self) -> str:
        return tokenize("dask-em-strict", self.node)


# ------------------------------------------------------------------ object stores
def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is an fsspec URL (``s3://bucket/key``) rather than a local path."""
    return "://" in os.fspath(location)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def storage_error(err: BaseException, url: str, what: str) -> DataError | None:
    """The one-line DataError for a failure to reach ``url`` (credentials, bucket,
    endpoint), or None if ``err`` is none of those.

    Parameters
    ----------
    err : exception
        Raised by fsspec or its backend (s3fs, botocore, aiohttp).
    url : str
    what : str
        What ``url`` is to the command ("the data", "the output"), for the message.
    """
    if isinstance(err, PermissionError) or "Credentials" in type(err).__name__:
        return DataError(
            f"access to {what} {url!r} was denied ({_first_line(err)}); check the "
            "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
            "{storage_options} key=/secret=)."
        )
    module = type(err).__module__.split(".")[0]
    if module in ("botocore", "aiohttp", "aiobotocore") or isinstance(
        err, ConnectionError | TimeoutError
    ):
        return DataError(
            f"cannot reach the object store of {what} {url!r} ({_first_line(err)}); check "
            "the endpoint (AWS_ENDPOINT_URL or {storage_options} endpoint_url=) and the network."
        )
    return None


class Location:
    """A local path or an fsspec URL with its storage options: the one interface through
    which dask-em touches object stores.

    Everything above it (opening Zarr data, publishing models, checkpoints) uses the
    same calls for a local directory and a bucket; the differences live here: an
    atomic whole-object write is ``os.replace`` of a fsynced temporary file locally and
    a single PUT on an object store, and a create-if-absent write is ``O_EXCL`` locally
    and a conditional PUT (``If-None-Match: *``) on S3.

    Parameters
    ----------
    location : str or path
    storage_options : dict, optional
        fsspec options of a URL (credentials, ``endpoint_url``); refused for a local path.
    """

    def __init__(
        self, location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
    ) -> None:
        self.location = os.fspath(location).rstrip("/") if is_url(location) else os.fspath(location)
        self.storage_options = dict(storage_options or {})
        self.is_url = is_url(location)
        self._fs: Any = None
        self._path = ""

    def filesystem(self) -> tuple[Any, str]:
        """The fsspec file system and path of a URL (created once).

        Raises
        ------
        ParameterError
            If the URL's protocol needs a package that is missing (``s3fs`` for s3://),
            or the storage options are refused by it.
        """
        if self._fs is None:
            import fsspec

            try:
                self._fs, self._path = fsspec.core.url_to_fs(self.location, **self.storage_options)
            except ImportError:
                protocol = self.location.split("://", 1)[0]
                raise ParameterError(
                    f"{protocol}:// URLs need their fsspec backend: for s3:// run "
                    'pip install "dask-em[s3]".',
                    parameter="storage_options",
                ) from None
            except (TypeError, ValueError) as err:
                raise ParameterError(
                    f"the {{storage_options}} of {self.location!r} are refused: "
                    f"{_first_line(err)}.",
                    parameter="storage_options",
                ) from None
        return self._fs, self._path

    def zarr_options(self) -> dict[str, Any]:
        """Keyword arguments for ``zarr.open*`` of this location."""
        return {"storage_options": self.storage_options} if self.is_url else {}

    def child(self, name: str) -> Location:
        """The location ``name`` inside this one (same storage options)."""
        if self.is_url:
            return Location(f"{self.location}/{name}", self.storage_options)
        return Location(os.path.join(self.location, name))

    def parent(self) -> Location:
        """The location holding this one (same storage options)."""
        if self.is_url:
            return Location(self.location.rsplit("/", 1)[0], self.storage_options)
        return Location(os.path.dirname(os.path.abspath(self.location)))

    def move_to(self, dest: Location) -> None:
        """Make this object ``dest``'s content and remove it here: a reader of ``dest``
        sees the old or the new content whole (``os.replace``, creating ``dest``'s
        directory; on an object store a server-side copy, then a delete)."""
        if not self.is_url:
            os.makedirs(os.path.dirname(os.path.abspath(dest.location)), exist_ok=True)
            os.replace(self.location, dest.location)
            return
        fs, path = self.filesystem()
        fs.copy(path, dest.filesystem()[1])
        fs.rm(path)

    def check_reachable(self, what: str) -> None:
        """Raise DataError in one line if a URL's store cannot be used: denied
        credentials, a missing bucket or an unreachable endpoint (a local path: nothing).

        One metadata request; called before any work so no backend error surfaces later.
        """
        if not self.is_url:
            return
        fs, path = self.filesystem()
        bucket = path.split("/", 1)[0]
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise DataError(
                f"the bucket {bucket!r} of {what} {self.location!r} does not exist; "
                "create it or check the URL."
            ) from None
        except Exception as err:  # noqa: BLE001 - mapped, or re-raised as a bug
            mapped = storage_error(err, self.location, what)
            if mapped is None:
                raise
            raise mapped from None
        try:
            fs.exists(path)  # a key denied (not only the bucket) fails here
        except Exception as err:  # noqa: BLE001 - mapped, or re-raised as a bug
            mapped = storage_error(err, self.location, what)
            if mapped is None:
                raise
            raise mapped from None

    def exists(self) -> bool:
        if not self.is_url:
            return os.path.exists(self.location)
        fs, path = self.filesystem()
        fs.invalidate_cache(path)
        return bool(fs.exists(path))

    def read_bytes(self) -> bytes:
        """The whole object (FileNotFoundError if absent)."""
        if not self.is_url:
            with open(self.location, "rb") as f:
                return f.read()
        fs, path = self.filesystem()
        return bytes(fs.cat_file(path))

    def write_bytes(self, data: bytes) -> None:
        """Replace the object with ``data`` atomically: a reader sees the old or the new
        content whole (a fsynced temporary file and ``os.replace``; one PUT)."""
        if self.is_url:
            fs, path = self.filesystem()
            fs.pipe_file(path, data)
            return
        tmp = f"{self.location}.tmp-{os.getpid()}-{os.urandom(8).hex()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.location)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def create(self, data: bytes) -> bool:
        """Write ``data`` only if the object does not exist; return whether it was created.

        Locally ``O_CREAT | O_EXCL``; on S3 a conditional PUT (``If-None-Match: *``),
        which refuses the write when the key exists, atomically on the server.
        """
        if self.is_url:
            fs, path = self.filesystem()
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True
        try:
            fd = os.open(self.location, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def names(self) -> list[str]:
        """The names directly under this location (none if it does not exist)."""
        if not self.is_url:
            return sorted(os.listdir(self.location)) if os.path.isdir(self.location) else []
        fs, path = self.filesystem()
        fs.invalidate_cache(path)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def remove(self) -> None:
        """Delete this object or prefix and everything under it (missing: nothing)."""
        if not self.is_url:
            if os.path.isdir(self.location):
                shutil.rmtree(self.location, ignore_errors=True)
            elif os.path.exists(self.location):
                os.unlink(self.location)
            return
        fs, path = self.filesystem()
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass


_log = logging.getLogger(__name__)


def _conditional_put_works(place: Location) -> bool:
    """Whether the store of ``place`` refuses a create-if-absent write over an existing
    object (S3 ``If-None-Match: *``): two creates of one probe key, the second must fail."""
    probe = place.child(f".lock-probe-{uuid.uuid4().hex}")
    try:
        probe.create(b"1")
        return not probe.create(b"2")
    finally:
        probe.remove()


def _lock_owner(lock: Location) -> dict[str, Any] | None:
    try:
        info = json.loads(lock.read_bytes())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextmanager
def object_lock(
    lock: Location,
    *,
    unsupported: Callable[[], UserError],
    held: Callable[[str], UserError],
) -> Iterator[None]:
    """Hold the lock object ``lock`` for the ``with`` block (one writer at a time).

    The lock is created with a create-if-absent write (`Location.create`), so of two
    writers starting together exactly one gets it; it is deleted when the block ends.
    Nothing releases the lock of a killed process by itself: a lock left by a process
    of this host that no longer runs is taken over (logged); one left on another
    machine must be deleted by hand (the caller's message says so).

    Parameters
    ----------
    lock : Location
        The lock object (its JSON names the holder: pid, host, start time, token).
    unsupported : callable
        ``unsupported()``: the error to raise when the store ignores conditional writes.
    held : callable
        ``held(owner)``: the error to raise when another writer holds the lock
        (``owner`` describes it: pid, host and start time).

    Raises
    ------
    UserError
        ``unsupported()`` or ``held(owner)``, as above.
    """
    if not _conditional_put_works(lock.parent()):
        raise unsupported()
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }
    for _ in range(3):
        if lock.create(json.dumps(info).encode()):
            break
        owner = _lock_owner(lock)
        if owner is None:
            continue  # released meanwhile (or being written): try again
        shown = (
            f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
        )
        if owner.get("host") == info["host"] and not process_alive(int(owner.get("pid", 0))):
            _log.warning(
                "taking over a stale lock %s (%s, no longer running)", lock.location, shown
            )
            lock.remove()
            continue
        raise held(shown)
    else:
        raise held("other writers are taking it; try again")
    try:
        yield
    finally:
        owner = _lock_owner(lock)
        if owner is not None and owner.get("token") == info["token"]:
            lock.remove()


def _zarr_loop() -> Any:
    from zarr.core.sync import _get_loop

    return _get_loop()


def close_sessions() -> None:
    """Close the HTTP sessions of the object-store file systems this process opened.

    s3fs keeps one aiohttp session per cached file system (fsspec's instance cache,
    zarr's stores included) and does not close them at exit, where aiohttp then prints
    "Unclosed client session" on stderr (s3fs issue 943). The CLI calls this before it
    exits; a process that never used an object store does nothing here.
    """
    import sys

    if "s3fs" not in sys.modules:
        return
    from fsspec.asyn import sync
    from s3fs import S3FileSystem

    for fs in list(S3FileSystem._cache.values()):
        creator = getattr(fs, "_s3creator", None)
        # zarr's stores use asynchronous file systems, on zarr's event loop
        loop = _zarr_loop() if fs.asynchronous else getattr(fs, "_loop", None)
        if creator is None or loop is None or not loop.is_running():
            continue
        try:
            sync(loop, creator.__aexit__, None, None, None, timeout=5)
        except Exception:  # noqa: BLE001 - a session that cannot close is closed at exit anyway
            continue
        fs._s3 = None
        fs._s3creator = None
    S3FileSystem.clear_instance_cache()
