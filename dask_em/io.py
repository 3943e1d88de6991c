"""Zarr input and output: opening data arrays with clear errors, reading and writing models.

Data arrays are opened lazily as Dask arrays chunked by rows, with all features in one
chunk. This module owns the rows per task (``chunk_rows``: rows per Dask chunk, one task
per chunk and pass): `choose_chunk_rows` picks them for any input, a whole number of the
store's row chunks (``store_chunk_rows``) merged until a task holds enough data that
per-task scheduling overhead is small next to its computation; `open_array` applies it
to Zarr input and `row_chunked` to NumPy and Dask input. Models are Zarr groups with the arrays ``weights``, ``means``,
``covariances`` and ``precisions_cholesky`` and JSON attributes; nothing is pickled.
A model is published as one immutable version at a time (`write_model`: the model
path points to its current version, the pointer replaced last and atomically), so a
reader sees the old model or the new one whole, never a mix; it is validated when read.
Other outputs are written under a temporary name beside their destination and renamed
into place when complete. Every path may be an fsspec URL (``s3://``, with
``storage_options``): there, with no rename, the last write is the small object readers
need (a model's pointer, an array's ``zarr.json``), through `dask_em.store.Location`. An output replaces only an earlier dask-em output of the same
kind, and never an input of the command (`check_output`). Data and model chunks are read
strictly (`dask_em.store`): a missing or undecodable chunk is an error naming it.
Arrays that dask-em writes (generated data, predictions) use `ARRAY_COMPRESSORS`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from zarr.codecs import BloscCodec

from dask_em.errors import DataError, OutputError, invalid_parameter
from dask_em.params import (
    COVARIANCE_TYPES,
    PARAM_ARRAYS,
    GMMParams,
    covariance_shape,
    validate_params,
)
from dask_em.staging import beside, clean_leftovers, left_by_dead_writer, remove
from dask_em.store import (
    WRITE_EVERY_CHUNK,
    Location,
    StrictArray,
    check_chunks_present,
    is_url,
)

TASK_TARGET_BYTES = 32 * 2**20
"""Most input bytes per task when `choose_chunk_rows` merges small store chunks.

A 32 MiB task takes 15-70 ms in the E-step kernel (D = 8), so ~1 ms of scheduling per
task stays at a few percent; a chunk's memory on a worker is about its input bytes (the
kernel works in small blocks), far under a 512 MiB worker memory limit.
"""

MODEL_FORMAT = "dask-em-model"
MODEL_FORMAT_VERSION = 2
"""2: the model path is a group pointing to its current immutable version subgroup;
1 (still read): the arrays and attributes at the model path itself."""
MODEL_GRACE_SECONDS = 30.0
"""How long a replaced model version stays readable (beyond the previous version, which
is always kept): a reader that resolved it has this long to finish its read."""
MODEL_READ_ATTEMPTS = 10
"""Times `read_model` resolves the version pointer again when the version it was
reading was removed meanwhile (the model was republished twice during the read)."""
OUTPUT_KINDS = ("model", "predictions", "data")
"""What dask-em writes: models, predictions (labels or responsibilities) and generated
data. An output replaces only an earlier dask-em output of the same kind."""

ARRAY_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
"""Compression of the data and prediction arrays that dask-em writes: Blosc LZ4 with byte
shuffle. EM reads the data again on every pass it does not cache, so decoding speed
counts: a chunk of float64 mixture rows decodes in about half the time of Zarr 3's
default (Zstandard, level 0), and takes 94% of its raw size where Zstandard takes 97%
(int64 labels: 8% and 7%). Zstandard compresses better data with many repeated values
(rounded decimals), which dask-em does not write."""


UNSAFE_CODECS = ("pickle", "json", "msgpack", "vlen", "categorize", "object")
"""Fragments of codec names that dask-em refuses to decode: codecs that unpickle (numcodecs
``Pickle``) or decode into Python objects (JSON, MsgPack, variable-length strings and
bytes, Categorize). Data arrays and model arrays must be numeric with numeric codecs."""


def _codec_names(meta: dict[str, Any]) -> list[str]:
    """Names of the codecs of Zarr array metadata (as stored, or ``metadata.to_dict()``).

    Zarr v2: the ``id`` of each filter and of the compressor; Zarr v3: the ``name`` of
    each codec, with the inner and index codecs of sharding.
    """
    if meta.get("zarr_format") == 2:
        specs: list[Any] = [*(meta.get("filters") or []), meta.get("compressor")]
    else:
        specs = list(meta.get("codecs") or [])
    names = []
    while specs:
        spec = specs.pop()
        if not isinstance(spec, dict):
            continue
        names.append(str(spec.get("id", spec.get("name", ""))))
        config = spec.get("configuration")
        if isinstance(config, dict):
            specs += [*(config.get("codecs") or []), *(config.get("index_codecs") or [])]
    return names


def check_dtype_and_codecs(meta: dict[str, Any], numeric: bool, dtype: str, name: str) -> None:
    """Raise DataError for a non-numeric dtype or a codec that unpickles or makes objects.

    Called on metadata alone, before any chunk is read (or decoded).

    Parameters
    ----------
    meta : dict
        Zarr array metadata: the JSON of ``.zarray`` / ``zarr.json``, or
        ``zarr.Array.metadata.to_dict()``.
    numeric : bool
        Whether the array's dtype is real numeric (integer or floating point).
    dtype : str
        The dtype, as the message shows it.
    name : str
        What to call the array in the message.
    """
    unsafe = [c for c in _codec_names(meta) if any(f in c.lower() for f in UNSAFE_CODECS)]
    if not numeric:
        how = f" (encoded with the {unsafe[0]!r} codec)" if unsafe else ""
        raise DataError(
            f"{name} has dtype {dtype}{how}, which is not a real numeric type; "
            "store the data as float32 or float64."
        )
    if unsafe:
        raise DataError(
            f"{name} is encoded with the {unsafe[0]!r} codec, which decodes by unpickling or "
            "into Python objects; dask-em never decodes such data: rewrite it as a "
            "float32 or float64 array with numeric codecs (e.g. Blosc, Zstd)."
        )


def _check_stored_metadata(path: Path, name: str) -> None:
    """Check the stored metadata of a local Zarr array before Zarr parses it.

    Zarr itself refuses some object arrays with an obscure message, and parsing
    metadata may instantiate codecs; this names the non-numeric dtype or the codec
    (`check_dtype_and_codecs`) first. A path without array metadata is left to Zarr.
    """
    for fname in (".zarray", "zarr.json"):
        try:
            meta = json.loads((path / fname).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or meta.get("node_type", "array") != "array":
            return
        meta.setdefault("zarr_format", 2 if fname == ".zarray" else 3)
        dtype = meta.get("dtype", meta.get("data_type"))
        shown = dtype if isinstance(dtype, str) else json.dumps(dtype)
        check_dtype_and_codecs(meta, _numeric_dtype_name(dtype), shown, name)
        return


def _numeric_dtype_name(dtype: Any) -> bool:
    """Whether stored Zarr dtype metadata (v2 ``dtype`` or v3 ``data_type``) is real numeric."""
    if not isinstance(dtype, str):
        return False  # structured (a list) or an extension data type (a dict)
    if re.fullmatch(r"(u?int|float)\d+", dtype):
        return True
    try:
        return np.dtype(dtype).kind in "fiu"
    except TypeError:
        return False


def _check_node(node: zarr.Array, name: str) -> None:
    """Refuse (DataError) an opened array whose dtype or codecs dask-em does not decode."""
    numeric = getattr(node.dtype, "kind", "O") in "fiu"
    check_dtype_and_codecs(node.metadata.to_dict(), numeric, str(node.dtype), name)


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, str | os.PathLike) else type(source).__name__


def check_chunk_rows(chunk_rows: Any) -> None:
    """Raise ParameterError unless ``chunk_rows`` is None (automatic) or an integer >= 1."""
    is_int = isinstance(chunk_rows, int | np.integer) and not isinstance(chunk_rows, bool)
    if chunk_rows is not None and not (is_int and chunk_rows >= 1):
        raise invalid_parameter(
            "chunk_rows", chunk_rows, "use None (automatic) or an integer >= 1 (rows per task)"
        )


def choose_chunk_rows(
    n_rows: int,
    n_features: int,
    itemsize: int,
    store_chunk_rows: int,
    chunk_rows: int | None = None,
) -> int:
    """Rows per Dask task for data of shape (n_rows, n_features) stored in row chunks.

    Depends only on the data and ``chunk_rows``, never on the cluster: the row chunk
    layout fixes the reduction order and is part of a checkpoint's data fingerprint, so
    a fit resumed on another cluster must get the same chunks.

    Parameters
    ----------
    n_rows, n_features : int
        Shape of the data.
    itemsize : int
        Bytes per value as the kernels see it (4 for float32, 8 for float64).
    store_chunk_rows : int
        Rows per chunk of the source (1 for in-memory data): the unit of reading.
    chunk_rows : int, optional
        Rows per task chosen by the user, rounded up to a whole number of store chunks.
        None chooses automatically: as many whole store chunks as fit in
        `TASK_TARGET_BYTES`, at least one (store chunks that are already that big are
        kept as they are, one per task).

    Returns
    -------
    int
        Rows per task: a whole multiple of ``store_chunk_rows`` (so no store chunk is
        read by two tasks), or ``n_rows`` when one task holds all rows.

    Raises
    ------
    ParameterError
        If ``chunk_rows`` is neither None nor an integer >= 1.
    """
    check_chunk_rows(chunk_rows)
    store = max(1, int(store_chunk_rows))
    if chunk_rows is not None:
        per_task = -(-int(chunk_rows) // store)
    else:
        chunk_bytes = store * max(1, int(n_features) * int(itemsize))
        per_task = max(1, TASK_TARGET_BYTES // chunk_bytes)
    return max(1, min(per_task * store, int(n_rows)))


def open_array(
    source: str | os.PathLike[str] | zarr.Array | zarr.Group,
    array: str | None = None,
    chunk_rows: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> da.Array:
    """Open a 2-D numeric Zarr array as a lazy Dask array.

    Parameters
    ----------
    source : str, path, zarr.Array or zarr.Group
        A local path or fsspec URL of a Zarr array, or of a group holding one.
    array : str, optional
        Name of the array inside a group.
    chunk_rows : int, optional
        Rows per Dask chunk (task), rounded up to a whole number of store chunks;
        None chooses with `choose_chunk_rows`.
    storage_options : dict, optional
        fsspec options of a URL ``source`` (credentials, ``endpoint_url``).

    Returns
    -------
    dask.array.Array of shape (n, D)
        Row chunks of `choose_chunk_rows` rows (whole store chunks), features in one chunk.

    Raises
    ------
    DataError
        Missing path, not a Zarr array, a group without ``array``, an array that is
        not 2-D numeric with at least one row, or a store missing one of its chunks
        (`dask_em.store.check_chunks_present`); the message says what to change. A chunk
        that fails to decode raises DataError naming it when a task reads it.
    """
    node: Any = source
    if isinstance(source, str | os.PathLike):
        place = Location(source, storage_options)
        location = place.location
        place.check_reachable("the data")
        if not place.exists():
            raise DataError(f"no such file or directory: {location!r}; check the data path.")
        if not place.is_url:
            stored = Path(location) / array if array is not None else Path(location)
            _check_stored_metadata(stored, repr(os.fspath(stored)))
        try:
            node = zarr.open(location, mode="r", **place.zarr_options())
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise DataError(
                f"{location!r} is not a Zarr array or group ({type(err).__name__}); "
                "pass the path of a Zarr store."
            ) from None
    if isinstance(node, zarr.Group):
        names = sorted(node.array_keys())
        if array is None:
            listing = ", ".join(names) if names else "none"
            raise DataError(
                f"{_describe(source)!r} is a Zarr group; name the array to use with "
                f"{{array}}=NAME (arrays in it: {listing})."
            )
        if array not in names:
            raise DataError(
                f"no array {array!r} in the Zarr group {_describe(source)!r}; "
                f"arrays in it: {', '.join(names) or 'none'}."
            )
        node = node[array]
    elif array is not None and isinstance(source, str | os.PathLike):
        raise DataError(
            f"{_describe(source)!r} is a Zarr array, not a group; drop {{array}}.",
            parameter="array",
        )
    if not isinstance(node, zarr.Array):
        raise DataError(
            f"{_describe(source)!r} is not a Zarr array; pass the path of a Zarr array."
        )
    _check_node(node, repr(_describe(source)))  # before any chunk is read
    check_data_shape_dtype(node.shape, node.dtype, _describe(source))
    check_chunks_present(node, repr(_describe(source)))
    itemsize = 4 if node.dtype == np.float32 else 8  # other dtypes are fitted as float64
    rows = choose_chunk_rows(node.shape[0], node.shape[1], itemsize, node.chunks[0], chunk_rows)
    name = "from-zarr-" + tokenize(node, rows)
    return da.from_array(StrictArray(node), chunks=(rows, -1), name=name, inline_array=False)


def row_chunked(X: np.ndarray | da.Array, chunk_rows: int | None = None) -> da.Array:
    """In-memory or Dask data of shape (n, D) as a Dask array of row chunks.

    Parameters
    ----------
    X : ndarray or dask.array.Array of shape (n, D)
    chunk_rows : int, optional
        Rows per chunk (task). None: a NumPy array is cut with `choose_chunk_rows`, a
        Dask array keeps its row chunks (features are merged into one chunk later, by
        `dask_em.reduce.RowData`).

    Returns
    -------
    dask.array.Array of shape (n, D)
    """
    if isinstance(X, da.Array) and chunk_rows is None:
        return X
    rows = choose_chunk_rows(X.shape[0], X.shape[1], X.dtype.itemsize, 1, chunk_rows)
    if isinstance(X, da.Array):
        return X.rechunk({0: rows, 1: -1})
    return da.from_array(X, chunks=(rows, -1))


def check_data_shape_dtype(shape: tuple[int, ...], dtype: Any, name: str = "data") -> None:
    """Raise DataError unless ``shape`` is (n >= 1, D >= 1) and ``dtype`` is real numeric."""
    if len(shape) != 2:
        raise DataError(
            f"{name} has {len(shape)} dimension(s) {tuple(shape)}; expected a 2-D array "
            "(n_samples, n_features): reshape it."
        )
    kind = getattr(np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype, "kind", "O")
    if kind not in "fiu":
        raise DataError(
            f"{name} has dtype {dtype}, which is not a real numeric type; "
            "store the data as float32 or float64."
        )
    if shape[0] < 1 or shape[1] < 1:
        raise DataError(
            f"{name} has shape {tuple(shape)}; it needs at least one row and one feature."
        )


def output_kind(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> str | None:
    """The kind (one of `OUTPUT_KINDS`) of the dask-em output at ``path``, else None.

    Outputs carry ``dask_em_output: KIND``; earlier ones carried ``true`` and are told
    apart by their other attributes (a model's ``format``, predictions' ``kind``).
    """
    try:
        attrs = zarr.open(
            os.fspath(path), mode="r", **Location(path, storage_options).zarr_options()
        ).attrs
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return None
    marker = attrs.get("dask_em_output")
    if marker in OUTPUT_KINDS:
        return str(marker)
    if attrs.get("format") == MODEL_FORMAT:
        return "model"
    if marker is True:
        return "data" if "generator" in attrs else "predictions"
    return None


def _resolved(path: str | os.PathLike[str]) -> str:
    location = os.fspath(path)
    return location.rstrip("/") if "://" in location else os.path.realpath(location)


def _overlaps(output: str | os.PathLike[str], source: str | os.PathLike[str]) -> bool:
    """Whether writing ``output`` would replace or write into ``source`` (or contain it)."""
    out, src = _resolved(output), _resolved(source)
    if out == src or out.startswith(src.rstrip("/") + "/") or src.startswith(out + "/"):
        return True
    try:
        return os.path.samefile(out, src)  # hard links, bind mounts
    except OSError:
        return False


def check_output(
    path: str | os.PathLike[str],
    kind: str,
    inputs: Sequence[str | os.PathLike[str]] = (),
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Raise OutputError now if writing ``path`` would destroy anything it must not.

    ``path`` may be new, or an earlier dask-em output of the same ``kind``; it must
    never be, contain or lie inside one of the command's ``inputs`` (compared by
    resolved path and file identity). Writers check again when they publish; calling
    this before a long computation refuses a bad output path before the work.

    Parameters
    ----------
    path : str or path
    kind : {'model', 'predictions', 'data'}
    inputs : sequence of str or path
        What the command reads (data, and a model read by ``predict``).
    storage_options : dict, optional
        fsspec options of a URL ``path``.

    Raises
    ------
    OutputError
        Naming the path and what is in the way.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; use one of {', '.join(OUTPUT_KINDS)}.")
    location = os.fspath(path)
    for source in inputs:
        if _overlaps(location, source):
            raise OutputError(
                f"the output {location!r} is the input {os.fspath(source)!r} (or holds it, "
                "or lies inside it); refusing to overwrite an input: choose another output path."
            )
    if not Location(location, storage_options).exists():
        return
    found = output_kind(location, storage_options)
    if found is None:
        raise OutputError(
            f"{location!r} exists and was not written by dask-em; refusing to "
            "overwrite it: choose another output path."
        )
    if found != kind:
        raise OutputError(
            f"{location!r} holds dask-em {found}, not {kind}; refusing to replace it "
            f"with {kind}: choose another output path."
        )


def _publish(tmp: Path, dest: Path, kind: str, inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Move the complete ``tmp`` to ``dest``, replacing an earlier output of ``kind`` there.

    The earlier output is first renamed aside (``.NAME.old-…``); a writer killed
    between the two renames leaves it there, and the next write of ``dest`` puts it
    back (`_clean_leftovers`) before replacing it.
    """
    check_output(dest, kind, inputs)
    old = None
    if dest.exists():
        old = beside(dest, "old")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_failed(path: str | os.PathLike[str], err: OSError) -> OutputError:
    """The one-line OutputError for an OSError met while writing the output ``path``."""
    reason = err.strerror or errno.errorcode.get(err.errno or 0) or str(err)
    return OutputError(
        f"cannot write the output {os.fspath(path)!r}: {reason}"
        f"{f' ({err.filename})' if err.filename else ''}; free space, fix the permissions, "
        "or choose another output path."
    )


@contextmanager
def _published(
    dest: Path, kind: str, inputs: Sequence[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """A temporary path beside ``dest`` to write into, published as ``dest`` at the end.

    Refuses (OutputError, `check_output`) a ``dest`` that is an input or not an earlier
    output of ``kind``, and first clears what killed writers of ``dest`` left
    (`_clean_leftovers`). When the block ends normally the complete temporary is renamed
    into place (`_publish`); in any case nothing of it is left behind. An OSError while
    writing or publishing (read-only or full file system) becomes an OutputError.
    """
    check_output(dest, kind, inputs)
    tmp = beside(dest, "tmp")
    try:
        _clean_leftovers(dest)
        yield tmp
        _publish(tmp, dest, kind, inputs)
    except OSError as err:
        raise write_failed(dest, err) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def model_bytes(n_components: int, n_features: int, covariance_type: str) -> int:
    """Bytes a model of this size needs on disk, uncompressed, with its metadata."""
    cov = int(np.prod(covariance_shape(covariance_type, n_components, n_features)))
    return 8 * (n_components * (1 + n_features) + 2 * cov) + 64 * 1024


def destination_problem(path: str | os.PathLike[str], expected_bytes: int = 0) -> str | None:
    """Why ``path`` cannot be written now (a directory to create or replace), else None.

    Checks, before any work: no regular file stands where a directory is needed (the
    path itself or one of its parents), the nearest existing directory (and ``path``
    itself if it is one) accepts a new file, and its file system has ``expected_bytes``
    free (`shutil.disk_usage`). Local paths only (a URL is left to its writer).

    Returns
    -------
    str or None
        One clause naming the problem and the errno text, for a message.
    """
    location = os.fspath(path)
    if "://" in location:
        return None
    target = Path(location).absolute()
    if target.exists() and not target.is_dir():
        return f"{location!r} is a regular file, not a directory"
    probe = target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{os.fspath(probe)!r} is a regular file, not a directory"
    for where in ([target] if target.is_dir() else []) + [probe]:
        try:
            fd, name = tempfile.mkstemp(prefix=".dask-em-probe-", dir=where)
            os.close(fd)
            os.unlink(name)
        except OSError as err:
            return f"{os.fspath(where)!r} cannot be written ({err.strerror or err})"
    free = shutil.disk_usage(probe).free
    if free < expected_bytes:
        return (
            f"{os.fspath(probe)!r} has {free / 2**20:.1f} MiB free, and writing "
            f"{location!r} needs about {expected_bytes / 2**20:.1f} MiB"
        )
    return None


def check_destination(
    path: str | os.PathLike[str],
    expected_bytes: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Raise OutputError now if the output ``path`` cannot be written (`destination_problem`).

    Called before a long computation, so an unwritable or full destination fails
    before the work instead of after it. A URL's store is checked to be reachable
    (`dask_em.store.Location.check_reachable`: credentials, bucket, endpoint).
    """
    Location(path, storage_options).check_reachable("the output")
    problem = destination_problem(path, expected_bytes)
    if problem is not None:
        raise OutputError(f"cannot write the output: {problem}; choose another output path.")


def _clean_leftovers(dest: Path) -> list[str]:
    """Remove what killed writers of ``dest`` left beside it; return what was done.

    A half-written ``.NAME.tmp-…`` is deleted, and an earlier output renamed aside
    (``.NAME.old-…``) while ``dest`` is missing is put back (`dask_em.staging`).
    """
    return clean_leftovers(dest, ("tmp", "old"), lambda p: output_kind(p) is not None)


def store_array(
    X: da.Array,
    path: str | os.PathLike[str],
    attrs: dict[str, Any] | None = None,
    *,
    kind: str,
    inputs: Sequence[str | os.PathLike[str]] = (),
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Compute a lazy array chunk by chunk into a Zarr array, published atomically.

    Written under a temporary name beside ``path`` and renamed into place when every
    chunk is written, so no half-written array ever appears under ``path``. Every chunk
    is stored (`dask_em.store.WRITE_EVERY_CHUNK`), compressed with `ARRAY_COMPRESSORS`.
    On an object store (a URL: no rename) the array's metadata object ``zarr.json``,
    without which no reader sees an array, is written last (`_store_to_object_store`).

    Parameters
    ----------
    X : dask.array.Array
        Chunks must be regular (equal but the last) along each axis.
    path : str or path
    attrs : dict, optional
        JSON attributes; ``dask_em_output: kind`` is always added.
    kind : {'predictions', 'data'}
        What the array is: it replaces only an earlier output of this kind.
    inputs : sequence of str or path
        What the computation reads; ``path`` must not be, hold or lie inside any of them.
    storage_options : dict, optional
        fsspec options of a URL ``path``.

    Raises
    ------
    OutputError
        If ``path`` must not be written (`check_output`) or writing fails (OSError).
    """
    if is_url(path):
        _store_to_object_store(
            X,
            Location(path, storage_options),
            {**(attrs or {}), "dask_em_output": kind},
            kind,
            inputs,
        )
        return
    with _published(Path(path), kind, inputs) as tmp:
        da.to_zarr(
            X, str(tmp), compute=True, compressors=list(ARRAY_COMPRESSORS), config=WRITE_EVERY_CHUNK
        )
        group_attrs = zarr.open_array(str(tmp), mode="r+").attrs
        group_attrs.update({**(attrs or {}), "dask_em_output": kind})


def _store_to_object_store(
    X: da.Array,
    place: Location,
    attrs: dict[str, Any],
    kind: str,
    inputs: Sequence[str | os.PathLike[str]],
) -> None:
    """`store_array` on an object store: "the previous output or a complete one, never a
    half one" by the metadata object. An earlier output is made invisible first (its
    ``zarr.json`` deleted, then its chunks), the chunks are written, and ``zarr.json``
    is put back last, one PUT. A writer killed meanwhile leaves no array at ``path``
    (chunk objects without metadata, removed by the next write), never a partial one.
    """
    place.check_reachable("the output")
    check_output(place.location, kind, inputs, place.storage_options)
    meta = place.child("zarr.json")
    meta.remove()
    place.remove()
    try:
        target = zarr.create_array(
            place.location,
            shape=X.shape,
            chunks=tuple(c[0] for c in X.chunks),
            dtype=X.dtype,
            compressors=list(ARRAY_COMPRESSORS),
            config=WRITE_EVERY_CHUNK,
            attributes=attrs,
            **place.zarr_options(),
        )
        published = meta.read_bytes()
        meta.remove()  # invisible until every chunk is written
        da.store(X, target, lock=False, compute=True)
        meta.write_bytes(published)
    except OSError as err:
        raise write_failed(place.location, err) from None


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


_VERSION = re.compile(r"^v-(\d{8})-[0-9a-f]{32}$")
"""Name of a published model version: ``v-SEQUENCE-UUID``."""


def _versions(root: Path) -> list[tuple[int, str]]:
    """``(sequence, name)`` of the published versions under a model path, oldest first."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        match = _VERSION.match(p.name)
        if match:
            found.append((int(match.group(1)), p.name))
    return sorted(found)


def _write_version(path: Path | Location, params: GMMParams, attrs: dict[str, Any]) -> None:
    """Write one complete, self-contained model version group at ``path``."""
    place = path if isinstance(path, Location) else Location(path)
    group = zarr.open_group(place.location, mode="w", **place.zarr_options())
    for name in PARAM_ARRAYS:
        group.create_array(
            name,
            data=np.asarray(getattr(params, name), dtype=np.float64),
            config=WRITE_EVERY_CHUNK,
        )
    group.attrs.update(attrs)


def _pointer(current: str, previous: str | None) -> bytes:
    """The model group's metadata pointing to its ``current`` version."""
    meta = {
        "zarr_format": 3,
        "node_type": "group",
        "attributes": {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "dask_em_output": "model",
            "current": current,
            "previous": previous,
        },
    }
    return json.dumps(meta, indent=2).encode()


def _write_pointer(root: Path, current: str, previous: str | None) -> None:
    """Replace the model group's metadata (the pointer to ``current``) atomically."""
    tmp = beside(root / "zarr.json", "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_pointer(current, previous))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / "zarr.json")
    finally:
        tmp.unlink(missing_ok=True)


def _remove_old_versions(root: Path, keep_from: int) -> None:
    """Remove versions numbered below ``keep_from`` that were replaced more than
    `MODEL_GRACE_SECONDS` ago (and what dead writers left).

    A version stopped being current when the next one was published (renamed into
    place: its ``ctime``). Each removed version is first renamed to a hidden
    ``.trash-…`` name, so a reader still reading it sees it gone and reads again
    (`read_model`); then deleted.
    """
    versions = _versions(root)
    now = time.time()
    for (sequence, name), (_, successor) in zip(versions, versions[1:], strict=False):
        if sequence >= keep_from:
            break
        try:
            replaced_at = os.stat(root / successor).st_ctime
        except OSError:
            continue
        if now - replaced_at < MODEL_GRACE_SECONDS:
            break  # later versions were replaced later still
        trash = root / f".trash-{uuid.uuid4().hex}"
        try:
            os.replace(root / name, trash)
        except OSError:
            continue  # another writer removed it first
        shutil.rmtree(trash, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(".trash-") or left_by_dead_writer(p.name, ["v", "zarr.json"], ["tmp"]):
            remove(p)


def write_model(
    path: str | os.PathLike[str],
    params: GMMParams,
    attrs: dict[str, Any],
    inputs: Sequence[str | os.PathLike[str]] = (),
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Publish a model at ``path`` as one new immutable version (format version 2).

    The model path is a Zarr group whose attributes point to its ``current`` version,
    a complete subgroup ``v-SEQUENCE-UUID`` (arrays and attributes). A new version is
    written under a hidden name, renamed to its final name, and only then is the
    pointer (the group's ``zarr.json``) replaced with ``os.replace``: a reader resolving
    the pointer once reads either the old model or the new one, whole. The previous
    version is kept for readers still reading it, and older ones until
    `MODEL_GRACE_SECONDS` after they were replaced; then they are removed. A path that
    does not hold a version-2 model yet (new, or an earlier format) is written whole
    under a temporary name and renamed into place. On an object store (a URL: there is
    no rename) the version is written under its final prefix, invisible to readers
    until the pointer object, written last with one PUT, names it.

    Parameters
    ----------
    path : str or path
        Destination, a local path or an fsspec URL; must be new or an earlier dask-em
        model (`check_output`).
    params : GMMParams
    attrs : dict
        JSON-serializable attributes (non-finite floats are stored as null).
    inputs : sequence of str or path
        What produced the model reads; ``path`` must not be any of them.
    storage_options : dict, optional
        fsspec options of a URL ``path``.

    Raises
    ------
    OutputError
        If ``path`` must not be written, or writing fails (OSError).
    """
    clean = {k: (_json_float(v) if isinstance(v, float) else v) for k, v in attrs.items()}
    version_attrs = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "covariance_type": params.covariance_type,
        "n_components": params.n_components,
        "n_features": params.n_features,
        **clean,
    }
    if is_url(path):
        _write_model_to_object_store(Location(path, storage_options), params, version_attrs, inputs)
        return
    root = Path(path)
    pointer = _read_pointer(root) if root.is_dir() else None
    if pointer is None:  # a new path, or a model of format version 1: publish whole
        with _published(root, "model", inputs) as tmp:
            name = f"v-{1:08d}-{uuid.uuid4().hex}"
            _write_version(tmp / name, params, version_attrs)
            _write_pointer(tmp, name, None)
        return
    check_output(root, "model", inputs)
    sequence = max((n for n, _ in _versions(root)), default=0) + 1
    name = f"v-{sequence:08d}-{uuid.uuid4().hex}"
    staging = beside(root / "v", "tmp")
    try:
        _write_version(staging, params, version_attrs)
        os.replace(staging, root / name)
        _write_pointer(root, name, pointer)
        previous = _VERSION.match(pointer)
        _remove_old_versions(root, int(previous.group(1)) if previous else sequence)
    except OSError as err:
        raise write_failed(root, err) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _write_model_to_object_store(
    root: Location,
    params: GMMParams,
    attrs: dict[str, Any],
    inputs: Sequence[str | os.PathLike[str]],
) -> None:
    """`write_model` on an object store: the version under its final prefix, then the
    pointer object (one PUT, the commit point); then versions older than the previous
    one, and versions of killed writers, are removed."""
    root.check_reachable("the output")
    check_output(root.location, "model", inputs, root.storage_options)
    try:
        pointer = _parse_pointer(root.child("zarr.json").read_bytes())
    except FileNotFoundError:
        pointer = None
    versions = [(int(m.group(1)), n) for n in root.names() if (m := _VERSION.match(n))]
    sequence = max((n for n, _ in versions), default=0) + 1
    name = f"v-{sequence:08d}-{uuid.uuid4().hex}"
    try:
        _write_version(root.child(name), params, attrs)
        root.child("zarr.json").write_bytes(_pointer(name, pointer))
    except OSError as err:
        root.child(name).remove()
        raise write_failed(root.location, err) from None
    for number, old in versions:  # older than the version now previous, or never published
        if old != pointer and number < sequence:
            root.child(old).remove()


def _parse_pointer(raw: bytes) -> str | None:
    """The ``current`` version named by a version-2 model group's metadata, else None."""
    try:
        attrs = json.loads(raw).get("attributes", {})
    except (ValueError, AttributeError):
        return None
    current = attrs.get("current") if isinstance(attrs, dict) else None
    if attrs.get("format") != MODEL_FORMAT or not isinstance(current, str):
        return None
    return current if _VERSION.match(current) else None


def _read_pointer(root: Path) -> str | None:
    """The ``current`` version named by a version-2 model group, else None."""
    try:
        attrs = json.loads((root / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    current = attrs.get("current") if isinstance(attrs, dict) else None
    if attrs.get("format") != MODEL_FORMAT or not isinstance(current, str):
        return None
    return current if _VERSION.match(current) else None


def model_version_path(path: str | os.PathLike[str]) -> Path:
    """The group holding a model's arrays: its current version (format 2) or itself (1)."""
    root = Path(path)
    current = _read_pointer(root)
    return root / current if current is not None else root


def read_model(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> tuple[GMMParams, dict[str, Any]]:
    """Read one whole version of a model written by `write_model`, and validate it.

    Resolves the version pointer once and reads that version; if the version was
    removed during the read (the model was republished twice meanwhile), resolves the
    pointer again, at most `MODEL_READ_ATTEMPTS` times. Models of format version 1
    (arrays at the model path) are read too.

    Parameters
    ----------
    path : str or path
        A local path or an fsspec URL.
    storage_options : dict, optional
        fsspec options of a URL (credentials, ``endpoint_url``).

    Returns
    -------
    params : GMMParams
        Checked by `dask_em.params.validate_params`.
    attrs : dict
        The version's attributes.

    Raises
    ------
    DataError
        If ``path`` is not a dask-em model of a known format version, its arrays are
        missing, damaged or of inconsistent shapes, or its parameters are not a valid
        mixture (the message names the first violation).
    """
    place = Location(path, storage_options)
    location = place.location
    place.check_reachable("the model")
    if not place.exists():
        raise DataError(f"no such model: {location!r}; check the model path.")
    for _ in range(MODEL_READ_ATTEMPTS):
        try:
            group = zarr.open_group(location, mode="r", **place.zarr_options())
        except (FileNotFoundError, ValueError) as err:
            if isinstance(err, zarr.errors.ContainsArrayError):
                raise DataError(
                    f"{location!r} is a Zarr array (data), not a dask-em model; pass the path "
                    "of a model written by GaussianMixture.save."
                ) from None
            raise DataError(
                f"{location!r} is not a dask-em model ({type(err).__name__})."
            ) from None
        attrs = dict(group.attrs)
        if attrs.get("format") != MODEL_FORMAT:
            raise DataError(
                f"{location!r} is not a dask-em model (no 'format: {MODEL_FORMAT}' attribute)."
            )
        if attrs.get("format_version") == 1:
            return _read_model_group(place, location, attrs)
        if attrs.get("format_version") != MODEL_FORMAT_VERSION:
            raise DataError(
                f"{location!r} has model format version {attrs.get('format_version')!r}; this "
                f"dask-em reads versions 1 and {MODEL_FORMAT_VERSION}: upgrade dask-em or refit."
            )
        current = attrs.get("current")
        if not isinstance(current, str) or not _VERSION.match(current):
            raise DataError(f"{location!r} names no valid current version; the model is damaged.")
        version = place.child(current)
        try:
            group_attrs = dict(
                zarr.open_group(version.location, mode="r", **version.zarr_options()).attrs
            )
            result = _read_model_group(version, location, group_attrs)
        except (DataError, FileNotFoundError, KeyError, ValueError):
            if version.exists():
                raise
            continue  # removed by a later writer while being read: resolve again
        if version.exists():  # still published: every read happened before any removal
            return result
    raise DataError(
        f"{location!r} was republished {MODEL_READ_ATTEMPTS} times while being read; "
        "read it again when its writer is done."
    )


def _read_model_group(
    group_path: Location, location: str, attrs: dict[str, Any]
) -> tuple[GMMParams, dict[str, Any]]:
    """The parameters of the model group at ``group_path`` (``location`` names it)."""
    cov_type = attrs.get("covariance_type")
    if cov_type not in COVARIANCE_TYPES:
        raise DataError(f"{location!r} has an unknown covariance_type {cov_type!r}.")
    if not group_path.is_url:
        for name in PARAM_ARRAYS:  # before Zarr parses any array's metadata
            _check_stored_metadata(
                Path(group_path.location) / name, f"the model array {location}/{name}"
            )
    group = zarr.open_group(group_path.location, mode="r", **group_path.zarr_options())
    arrays = {}
    for name in PARAM_ARRAYS:
        if name not in group.array_keys():
            raise DataError(f"{location!r} lacks the array {name!r}; the model is incomplete.")
        node = group[name]
        _check_node(node, f"the model array {location}/{name}")  # before reading it
        check_chunks_present(node, f"the model array {location}/{name}")
        whole = tuple(slice(None) for _ in node.shape)
        arrays[name] = np.asarray(StrictArray(node)[whole], dtype=np.float64)
    k, d = arrays["means"].shape if arrays["means"].ndim == 2 else (0, 0)
    expected = covariance_shape(cov_type, k, d)
    if (
        arrays["means"].ndim != 2
        or arrays["weights"].shape != (k,)
        or arrays["covariances"].shape != expected
        or (arrays["precisions_cholesky"].shape != expected)
    ):
        raise DataError(f"{location!r} has arrays of inconsistent shapes; the model is damaged.")
    params = GMMParams(
        arrays["weights"],
        arrays["means"],
        arrays["covariances"],
        arrays["precisions_cholesky"],
        cov_type,
    )
    try:
        validate_params(params)
    except DataError as err:
        raise DataError(f"{location!r} is not a valid model: {err}") from None
    return params, attrs
