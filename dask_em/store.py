"""Strict access to Zarr chunks: every chunk present and decodable, or an error naming it.

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
import os
from typing import Any

import numpy as np
import zarr
from dask.base import tokenize
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from dask_em.errors import DataError

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
