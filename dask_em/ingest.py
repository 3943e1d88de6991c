"""Warehouse data into dask-em: Parquet files, hive-partitioned datasets or DuckDB SQL -> Zarr.

This module owns `ingest` and the layout and commit protocol of the stores it writes;
pyarrow and DuckDB (the ``ingest`` extra) are imported here only, when `ingest` runs.

The store is one 2-D Zarr v3 array (rows chunked by ``chunk_rows``, all features in
one chunk, `dask_em.io.ARRAY_COMPRESSORS`, every chunk written), readable by
`dask_em.io.open_array`. Its attribute ``dask_em_ingest`` records the feature columns,
the dtype, the chunk rows and every ingested partition in row order, each with its
row range, row count, dropped rows and the SHA-256 of its stored rows.

Units of ingestion ("partitions"):

- a Parquet file: one partition, named after the file (or ``partition=``);
- a dataset directory: each directory holding ``*.parquet`` files is a partition,
  named by its path under the dataset root (``dt=2026-11-22``, ``dt=…/region=eu``),
  taken in the lexicographic order of those names; ``partition=`` selects one (or
  those under it). Hive partition columns are not features;
- ``query=``: a DuckDB SQL query, run once per partition with the view ``source``
  bound to that partition's files (so ``SELECT f1, f2 FROM source WHERE …`` works
  with partitions); with ``source=None`` the query reads what it names itself
  (``read_parquet('…')``) and is one partition named ``partition=`` (default
  ``"query"``).

Commit protocol of an append (a process killed at any instant leaves the store
reading exactly as before, and rerunning the same call completes it):

1. rows are encoded into whole chunks of a staging array beside the store
   (``.NAME.ingest-HOST-PID-UUID``), the first of them holding the committed rows of
   the store's partial last chunk followed by new rows;
2. the staged chunk files beyond the committed shape are renamed into the store,
   then the partial last chunk is replaced (``os.replace``; under the old shape it
   reads the same rows in either version);
3. the array metadata (new shape and attributes) replaces ``zarr.json`` last.

On an object store (``s3://``) the staging array is ``OUT/.ingest-HOST-PID-UUID/``, its
chunks are copied into the store in the same order (a server-side copy makes an object
appear whole), the metadata is one PUT, and one ingest at a time holds the lock object
``OUT/ingest.lock`` (`dask_em.store.object_lock`); the next ingest deletes what a killed
one left (chunks beyond the committed shape, staging prefixes).

Replacing a partition (``replace_partition=True``) rewrites the store from that
partition's first row: its new rows, then the rows of every later partition as they
are stored (their row ranges shift, their hashes stay). That version is built
complete beside the store and swapped in with two renames (the old version is put
back by the next ingest if a process dies between them). Object stores have no rename:
there a replacement is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dask_em.errors import DataError, OutputError, ParameterError
from dask_em.io import ARRAY_COMPRESSORS
from dask_em.staging import beside, clean_leftovers, writer_tag
from dask_em.store import WRITE_EVERY_CHUNK, Location, is_url, object_lock, storage_error

FORMAT_VERSION = 1
ATTRIBUTE = "dask_em_ingest"
"""Name of the store attribute that holds the ingest record."""

CHUNK_TARGET_BYTES = 8 * 2**20
"""Bytes of a store chunk when ``chunk_rows`` is not given (``open_array`` merges
chunks into larger tasks; a small chunk keeps appends and ingest memory small)."""

BATCH_ROWS = 65_536
"""Most rows per record batch read from Parquet or DuckDB."""

LOCK = "ingest.lock"
"""The lock object inside a store on an object store (`_locked`)."""

MISSING_POLICIES = ("error", "drop", "keep")
DTYPES = ("float64", "float32")

Progress = Callable[[dict[str, Any]], None]


def _arrow() -> tuple[Any, Any, Any]:
    """pyarrow, pyarrow.compute and pyarrow.parquet, or a one-line error saying how to get them."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ParameterError(
            'ingest needs pyarrow and duckdb: pip install "dask-em[ingest]".'
        ) from None
    return pa, pc, pq


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError:
        raise ParameterError(
            'ingest needs pyarrow and duckdb: pip install "dask-em[ingest]".'
        ) from None
    return duckdb


# ------------------------------------------------------------------ partitions
@dataclass(frozen=True)
class _Unit:
    """One partition of the source: its name and Parquet files (none for a bare query)."""

    name: str
    files: tuple[str, ...]
    fs: Any = None
    """The fsspec file system of ``files`` (None: local paths)."""


def _parquet_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*.parquet")
        if p.is_file() and not any(part[:1] in "._" for part in p.relative_to(root).parts)
    )


def _remote_groups(place: Location) -> tuple[dict[str, list[str]], Any]:
    """`_units`' grouping of the Parquet files under a URL, and its file system."""
    place.check_reachable("the source")
    fs, root = place.filesystem()
    try:
        if fs.isfile(root):
            return {"": [root]}, fs
        found = fs.find(root)
    except Exception as err:  # noqa: BLE001 - mapped, or re-raised as a bug
        mapped = storage_error(err, place.location, "the source")
        if mapped is None:
            raise
        raise mapped from None
    groups: dict[str, list[str]] = {}
    base = root.rstrip("/").rsplit("/", 1)[-1]
    for file in sorted(found):
        rel = file[len(root.rstrip("/")) + 1 :]
        parts = rel.split("/")
        if not file.endswith(".parquet") or any(p[:1] in "._" for p in parts):
            continue
        groups.setdefault("/".join(parts[:-1]) or base, []).append(file)
    return groups, fs


def _units(
    source: str | None, partition: str | None, storage_options: dict[str, Any] | None = None
) -> list[_Unit]:
    """The partitions of ``source`` to ingest, in order (see the module docstring)."""
    if source is None:
        return [_Unit(partition or "query", ())]
    fs = None
    if is_url(source):
        groups, fs = _remote_groups(Location(source, storage_options))
        if "" in groups:  # a single file
            return [_Unit(partition or source.rsplit("/", 1)[-1], tuple(groups[""]), fs)]
    else:
        path = Path(source)
        if path.is_file():
            return [_Unit(partition or path.name, (str(path),))]
        if not path.is_dir():
            raise DataError(f"no such file or directory: {source!r}; check the source path.")
        groups = {}
        for file in _parquet_files(path):
            rel = file.parent.relative_to(path).as_posix()
            groups.setdefault(path.name if rel == "." else rel, []).append(str(file))
    if not groups:
        raise DataError(f"{source!r} holds no .parquet files; pass a Parquet file or dataset.")
    units = [_Unit(name, tuple(files), fs) for name, files in sorted(groups.items())]
    if partition is None:
        return units
    chosen = [u for u in units if u.name == partition or u.name.startswith(partition + "/")]
    if not chosen:
        shown = ", ".join(u.name for u in units[:5]) + (", …" if len(units) > 5 else "")
        raise ParameterError(
            f"no partition {partition!r} in {source!r}; its partitions: {shown}.",
            parameter="partition",
        )
    return chosen


# ------------------------------------------------------------------ reading rows
def _is_numeric(pa: Any, type_: Any) -> bool:
    return bool(
        pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_)
    )


def _feature_columns(pa: Any, schema: Any, columns: Sequence[str] | None, where: str) -> list[str]:
    """The feature columns of ``schema``: ``columns`` checked, or every numeric column."""
    if columns is None:
        chosen = [f.name for f in schema if _is_numeric(pa, f.type)]
        if not chosen:
            raise DataError(
                f"{where} has no numeric column (columns: {', '.join(schema.names)}); "
                "store numeric features or select them with a query."
            )
        return chosen
    absent = [c for c in columns if c not in schema.names]
    if absent:
        raise ParameterError(
            f"no column {', '.join(map(repr, absent))} in {where}; its columns: "
            f"{', '.join(schema.names)} (hive partition columns are not features).",
            parameter="columns",
        )
    bad = [
        f"{c!r} ({schema.field(c).type})"
        for c in columns
        if not _is_numeric(pa, schema.field(c).type)
    ]
    if bad:
        raise ParameterError(
            f"column{'s' if len(bad) > 1 else ''} {', '.join(bad)} of {where} "
            f"{'are' if len(bad) > 1 else 'is'} not numeric; select integer or "
            "floating-point feature columns only.",
            parameter="columns",
        )
    return list(columns)


def _batches(
    unit: _Unit, query: str | None
) -> tuple[Any, Callable[[list[str]], Iterator[Any]], str]:
    """The schema of one partition, a function streaming its record batches (with the
    given columns at least), and how messages name it."""
    pa, _, pq = _arrow()
    if query is None:
        try:
            files = [
                pq.ParquetFile(f if unit.fs is None else unit.fs.open(f, "rb"), pre_buffer=False)
                for f in unit.files
            ]
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"partition {unit.name!r}: {_first_line(err)}") from None

        def parquet(names: list[str]) -> Iterator[Any]:
            for f, name in zip(files, unit.files, strict=True):
                try:
                    yield from f.iter_batches(batch_size=BATCH_ROWS, columns=names)
                except (pa.ArrowException, OSError) as err:
                    raise DataError(f"cannot read {name!r}: {_first_line(err)}") from None

        schema = files[0].schema_arrow
        for f, name in zip(files[1:], unit.files[1:], strict=True):
            if f.schema_arrow.names != schema.names:
                raise DataError(
                    f"the files of partition {unit.name!r} have different columns "
                    f"({os.path.basename(unit.files[0])!r} and {os.path.basename(name)!r}); "
                    "rewrite them with one schema or select columns with a query."
                )
        return schema, parquet, f"partition {unit.name!r}"
    duckdb = _duckdb()
    con = duckdb.connect()

    def failed(err: Exception) -> ParameterError:
        return ParameterError(
            f"query failed on partition {unit.name!r}: {_first_line(err)}", parameter="query"
        )

    try:
        if unit.fs is not None:  # DuckDB reads the object store's files through Arrow
            import pyarrow.dataset as pds

            dataset = pds.dataset(
                list(unit.files), filesystem=unit.fs, format="parquet", partitioning="hive"
            )
            con.register("source", dataset)
        elif unit.files:
            listed = ", ".join("'" + f.replace("'", "''") + "'" for f in unit.files)
            con.execute(
                f"CREATE VIEW source AS SELECT * FROM read_parquet([{listed}], "
                "hive_partitioning = true)"
            )
        rel = con.sql(query)
        if rel is None:
            raise ParameterError(
                "query returns no rows (it is not a SELECT); pass a SELECT query.",
                parameter="query",
            )
        reader = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
        batches = reader(BATCH_ROWS)
    except duckdb.Error as err:
        raise failed(err) from None

    def stream(names: list[str]) -> Iterator[Any]:
        try:
            yield from batches
        except (duckdb.Error, pa.ArrowException) as err:  # errors found while running
            raise failed(err) from None
        finally:
            con.close()

    return batches.schema, stream, f"the query's result on partition {unit.name!r}"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@dataclass
class _Counts:
    """Non-finite values seen per feature column of one partition."""

    nan: np.ndarray
    inf: np.ndarray
    dropped: int = 0


def _blocks(
    unit: _Unit,
    query: str | None,
    columns: Sequence[str] | None,
    dtype: np.dtype,
    missing: str,
) -> tuple[list[str], Iterator[np.ndarray], _Counts]:
    """The feature columns of a partition and its rows as (rows, D) blocks of ``dtype``.

    Missing values (NULL, NaN) and infinities follow ``missing``; a refusal is raised
    only after the whole partition was counted, so the message gives the totals. The
    returned `_Counts` holds the dropped rows once the blocks are consumed.
    """
    pa, pc, _ = _arrow()
    schema, batches, where = _batches(unit, query)
    names = _feature_columns(pa, schema, columns, where)
    counts = _Counts(np.zeros(len(names), np.int64), np.zeros(len(names), np.int64))

    def convert(batch: Any) -> np.ndarray:
        block = np.empty((batch.num_rows, len(names)), dtype=dtype)
        for j, name in enumerate(names):
            values = pc.cast(batch.column(name), pa.float64(), safe=False)
            with np.errstate(over="ignore"):  # float32 overflow becomes inf, refused below
                block[:, j] = values.to_numpy(zero_copy_only=False)
        return block

    def generate() -> Iterator[np.ndarray]:
        refused = False
        for batch in batches(names):
            block = convert(batch)
            finite = np.isfinite(block)
            if finite.all():
                if not refused:
                    yield block
                continue
            nan = np.isnan(block)
            counts.nan += nan.sum(axis=0)
            counts.inf += (~finite & ~nan).sum(axis=0)
            if missing == "drop":
                keep = finite.all(axis=1)
                counts.dropped += int(block.shape[0] - keep.sum())
                yield block[keep]
            elif missing == "keep" and not counts.inf.any():
                yield block
            else:
                refused = True  # count the rest of the partition, then refuse
        if refused:
            raise DataError(_missing_message(where, names, counts, missing))

    return names, generate(), counts


def _missing_message(where: str, names: list[str], counts: _Counts, missing: str) -> str:
    if missing == "keep":
        j = int(np.flatnonzero(counts.inf)[0])
        return (
            f"{where}: column {names[j]!r} has {counts.inf[j]} infinite value(s); "
            "{missing_keep} stores NULL and NaN as NaN but never infinity: pass "
            "{missing_drop} to drop those rows."
        )
    total = counts.nan + counts.inf
    bad = np.flatnonzero(total)
    j = int(bad[0])
    what = f"{counts.nan[j]} missing (NULL or NaN)" if counts.nan[j] else ""
    if counts.inf[j]:
        what += (" and " if what else "") + f"{counts.inf[j]} infinite"
    more = f" (and {len(bad) - 1} more column(s))" if len(bad) > 1 else ""
    return (
        f"{where}: column {names[j]!r} has {what} value(s){more}; pass {{missing_drop}} "
        "to drop those rows or {missing_keep} to store missing values as NaN."
    )


# ------------------------------------------------------------------ the store
def _record(store: zarr.Array) -> dict[str, Any]:
    return dict(store.attrs.get(ATTRIBUTE) or {})


def _check_record(out: Location, store: zarr.Array) -> dict[str, Any]:
    """The ingest record of an existing store, checked against its shape."""
    record = _record(store)
    if record.get("format_version") != FORMAT_VERSION:
        raise OutputError(
            f"{out.location!r} exists and is not a store written by dask-em ingest; "
            "choose another output path.",
            parameter="out",
        )
    parts = record.get("partitions", [])
    if sum(p["rows"] for p in parts) != store.shape[0]:
        raise DataError(
            f"{out.location!r} is damaged: its partitions hold "
            f"{sum(p['rows'] for p in parts)} rows, its array {store.shape[0]}; re-ingest it."
        )
    return record


@contextmanager
def _locked(out: Location) -> Iterator[None]:
    """Hold the one-ingest-at-a-time lock of the store ``out``: an exclusive ``flock`` on
    its directory, or on an object store the lock object ``OUT/ingest.lock``
    (`dask_em.store.object_lock`)."""
    if out.is_url:
        lock = out.child(LOCK)
        with object_lock(
            lock,
            unsupported=lambda: OutputError(
                f"the object store of {out.location!r} ignores conditional writes "
                "(If-None-Match), so concurrent ingests could not be kept apart; ingest "
                "into a local store, then copy it to the bucket.",
                parameter="out",
            ),
            held=lambda owner: OutputError(
                f"another ingest is writing {out.location!r} ({owner}); wait until it ends, "
                f"or if it was killed on another machine, delete {lock.location}.",
                parameter="out",
            ),
        ):
            yield
        return
    while True:
        fd = os.open(out.location, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"another ingest is writing {out.location!r}; wait until it ends.",
                parameter="out",
            ) from None
        if os.stat(out.location).st_ino == os.fstat(fd).st_ino:  # not swapped out meanwhile
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _chunk_files(root: Location) -> dict[int, Location]:
    """Chunk objects of a store (row chunk index -> location)."""
    chunks = root.child("c")
    return {int(n): chunks.child(n).child("0") for n in chunks.names() if n.isdigit()}


def _open(place: Location, mode: str = "r") -> zarr.Array:
    return zarr.open_array(place.location, mode=mode, **place.zarr_options())


def _staging(out: Location) -> Location:
    """Where a writer stages a new version of ``out``: beside it locally (swapped in
    with renames), inside it on an object store (``OUT/.ingest-…``, not part of the
    array; cleared by the next ingest holding the lock)."""
    if out.is_url:
        return out.child(f".ingest-{writer_tag()}")
    staging = Location(beside(Path(out.location), "ingest"))
    os.mkdir(staging.location)
    return staging


def _create(out: Location, names: list[str], dtype: np.dtype, chunk_rows: int) -> None:
    """Create an empty store (0 rows) at ``out``, atomically: built beside and renamed
    locally; on an object store its metadata is one PUT (under the ingest lock)."""
    if out.is_url:
        _new_array(out.location, out.zarr_options(), names, dtype, chunk_rows)
        return
    tmp = beside(Path(out.location), "ingest")
    try:
        _new_array(str(tmp), {}, names, dtype, chunk_rows)
        try:
            os.rename(tmp, out.location)
        except OSError:
            if not os.path.exists(out.location):
                raise  # another ingest created it meanwhile otherwise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _new_array(
    store: str, options: dict[str, Any], names: list[str], dtype: np.dtype, chunk_rows: int
) -> None:
    zarr.create_array(
        store=store,
        **options,
        shape=(0, len(names)),
        chunks=(chunk_rows, len(names)),
        dtype=dtype,
        compressors=list(ARRAY_COMPRESSORS),
        fill_value=0.0,
        attributes={
            ATTRIBUTE: {
                "format_version": FORMAT_VERSION,
                "columns": names,
                "dtype": dtype.name,
                "chunk_rows": chunk_rows,
                "partitions": [],
            }
        },
    )


class _Writer:
    """Rows into whole chunks of a staging array that shares the store's metadata.

    Parameters
    ----------
    out : Location
        The committed store (its metadata is copied; its rows before ``start`` in the
        chunk holding ``start`` are copied in first).
    start : int
        First row to write; the staging chunks start at ``start // chunk_rows``.
    """

    def __init__(self, out: Location, start: int) -> None:
        self.out = out
        self.staging = _staging(out)
        self.staging.child("zarr.json").write_bytes(out.child("zarr.json").read_bytes())
        committed = _open(out)
        self.array = _open(self.staging, "r+").with_config(WRITE_EVERY_CHUNK)
        self.chunk_rows = int(committed.chunks[0])
        self.first_chunk = start // self.chunk_rows
        self.index = self.first_chunk
        self.buffer = np.empty((self.chunk_rows, committed.shape[1]), dtype=committed.dtype)
        self.fill = start - self.first_chunk * self.chunk_rows
        self.buffer[: self.fill] = committed[start - self.fill : start]
        self.rows = start

    def add(self, block: np.ndarray) -> None:
        """Append rows (n, D) of the store's dtype."""
        self.rows += block.shape[0]
        while block.shape[0]:
            take = min(block.shape[0], self.chunk_rows - self.fill)
            self.buffer[self.fill : self.fill + take] = block[:take]
            self.fill += take
            block = block[take:]
            if self.fill == self.chunk_rows:
                self._flush()

    def _flush(self) -> None:
        self.buffer[self.fill :] = 0.0  # the fill value, as Zarr pads an edge chunk
        stop = (self.index + 1) * self.chunk_rows
        if self.array.shape[0] < stop:
            self.array.resize((stop, self.buffer.shape[1]))
        self.array[stop - self.chunk_rows : stop] = self.buffer
        self.index += 1
        self.fill = 0

    def finish(self, record: dict[str, Any]) -> None:
        """Write the last partial chunk and the staged metadata (shape, ``record``)."""
        if self.fill:
            self._flush()
        self.array.resize((self.rows, self.buffer.shape[1]))
        self.array.attrs.put({ATTRIBUTE: record})

    def commit_append(self) -> None:
        """Move the staged chunks, then the metadata, into the store (see module docstring)."""
        staged = _chunk_files(self.staging)
        for index in sorted(staged, reverse=True):  # the committed partial chunk last
            staged[index].move_to(self.out.child("c").child(str(index)).child("0"))
        self.staging.child("zarr.json").move_to(self.out.child("zarr.json"))

    def commit_swap(self) -> int:
        """Make the staging array, completed with the store's earlier chunks, the store.

        Returns a descriptor of the new store holding its lock (taken before the swap),
        for the caller to close when done. Local stores only (two renames).
        """
        out, staging = Path(self.out.location), Path(self.staging.location)
        for index, chunk in _chunk_files(self.out).items():
            if index < self.first_chunk:
                path, target = Path(chunk.location), staging / "c" / str(index)
                target.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, target / "0")  # chunk files are replaced, never modified
                except OSError:  # a file system without hard links
                    shutil.copyfile(path, target / "0")
        fd = os.open(staging, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else knows this directory yet
        old = beside(out, "old")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
        return fd

    def discard(self) -> None:
        self.staging.remove()


def _drop_uncommitted(out: Location, n_rows: int, chunk_rows: int) -> None:
    """Delete chunks beyond the committed shape (left by a killed append) and, on an
    object store, the staging prefixes of killed ingests (we hold the lock)."""
    last = -(-n_rows // chunk_rows) - 1
    for index, chunk in _chunk_files(out).items():
        if index > last:
            chunk.parent().remove()
    if out.is_url:
        for name in out.names():
            if name.startswith(".ingest-"):
                out.child(name).remove()


# ------------------------------------------------------------------ ingest
def ingest(
    source: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    query: str | None = None,
    partition: str | None = None,
    missing: str = "error",
    replace_partition: bool = False,
    dtype: str | None = None,
    chunk_rows: int | None = None,
    progress: Progress | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest Parquet data (files, a hive-partitioned dataset, or a DuckDB query) into Zarr.

    Each partition of ``source`` (see the module docstring) that ``out`` does not hold
    yet is appended to it and committed on its own; ``out`` is created when missing.

    Parameters
    ----------
    source : str, path or None
        A Parquet file or a directory of Parquet files (hive-partitioned or not), a
        local path or an fsspec URL (``s3://bucket/dataset``, read with
        ``storage_options``). None with ``query`` that reads files itself.
    out : str or path
        The Zarr array to create or append to: a local directory or an fsspec URL
        (``s3://bucket/data.zarr``, written with ``storage_options``; see the module
        docstring for how each commits).
    columns : sequence of str, optional
        Feature columns, in order. Default: every numeric column of the first partition
        (integer, floating point, decimal), or the store's columns when appending.
    query : str, optional
        DuckDB SQL producing the rows; ``source`` is the view of the partition's files.
    partition : str, optional
        With a dataset: the partition to ingest (``"dt=2026-11-22"``); otherwise the
        name recorded for the one partition.
    missing : {"error", "drop", "keep"}
        NULL, NaN and infinite values: refuse the partition (naming the column and the
        count), drop their rows (counted in the summary), or store NULL and NaN as NaN
        (an infinite value is then still refused).
    replace_partition : bool
        Replace a partition whose content changed since it was ingested (its rows and
        those of every later partition are rewritten, see the module docstring); without
        it such a partition is refused and nothing is written.
    dtype : {"float64", "float32"}, optional
        Stored dtype; default float64 for a new store, the store's when appending.
    chunk_rows : int, optional
        Rows per store chunk of a new store (default: the largest power of two whose
        chunk takes at most `CHUNK_TARGET_BYTES`, 65,536 rows for 16 float64 features).
    progress : callable, optional
        Called with a dict (``rows``, ``partitions``, ``partitions_total``, ``partition``,
        ``seconds``, ``rows_per_s``) after every chunk written and every partition.
    storage_options : dict, optional
        fsspec options (credentials, ``endpoint_url``) of a URL ``source`` or ``out``.

    Returns
    -------
    dict
        ``out``, ``n_samples`` and ``n_features`` of the store, ``columns``, ``dtype``,
        ``chunk_rows``, ``rows_added``, ``rows_dropped``, ``partitions`` (one dict per
        partition of the source: ``name``, ``status`` in {"added", "unchanged",
        "replaced"}, ``rows``, ``rows_dropped``), ``messages`` (one line each, for the
        user), ``seconds`` and ``rows_per_s``.

    Raises
    ------
    ParameterError
        Bad arguments, unknown or non-numeric columns, a failing query, an unknown
        partition, or pyarrow/duckdb missing.
    DataError
        Missing source, refused missing values, a changed partition without
        ``replace_partition``.
    OutputError
        ``out`` exists and is not an ingest store, or another ingest is writing it.
    """
    began = time.perf_counter()
    if missing not in MISSING_POLICIES:
        raise ParameterError(
            f"Invalid value for 'missing': {missing!r}; use one of {', '.join(MISSING_POLICIES)}.",
            parameter="missing",
        )
    if dtype is not None and dtype not in DTYPES:
        raise ParameterError(
            f"Invalid value for 'dtype': {dtype!r}; use 'float64' or 'float32'.",
            parameter="dtype",
        )
    is_int = isinstance(chunk_rows, int | np.integer) and not isinstance(chunk_rows, bool)
    if chunk_rows is not None and not (is_int and chunk_rows >= 1):
        raise ParameterError(
            f"Invalid value for 'chunk_rows': {chunk_rows!r}; use None or an integer >= 1.",
            parameter="chunk_rows",
        )
    if source is None and query is None:
        raise ParameterError("pass a source path, a query, or both.", parameter="source")
    if columns is not None and (isinstance(columns, str) or not columns):
        raise ParameterError(
            f"Invalid value for 'columns': {columns!r}; pass a non-empty list of names.",
            parameter="columns",
        )
    _arrow()
    if query is not None:
        _duckdb()
    units = _units(None if source is None else os.fspath(source), partition, storage_options)
    place = Location(out, storage_options if is_url(out) else None)
    if place.is_url:
        place.check_reachable("the output")
    else:
        clean_leftovers(Path(out), ("ingest", "old"))
    foreign = [n for n in place.names() if n != LOCK and not n.startswith(".ingest-")]
    exists = place.child("zarr.json").exists()
    if not exists and (foreign or (not place.is_url and place.exists())):
        raise OutputError(
            f"{place.location!r} exists and is not a store written by dask-em ingest; "
            "choose another output path.",
            parameter="out",
        )

    def create() -> None:
        dt = np.dtype(dtype or "float64")
        names, _, _ = _blocks(units[0], query, columns, dt, missing)
        fit = max(1, CHUNK_TARGET_BYTES // (len(names) * dt.itemsize))
        chunk = chunk_rows or 1 << (fit.bit_length() - 1)  # a power of two, <= 8 MiB
        _create(place, names, dt, int(chunk))

    created = not exists
    if created and not place.is_url:
        create()  # locally the lock is on the store's directory: create it first
    locks: list[int] = []  # descriptors locking the versions of ``out`` swapped in
    with _locked(place):
        if created and place.is_url:
            create()
        try:
            return _ingest_locked(
                units,
                place,
                locks,
                columns,
                query,
                missing,
                replace_partition,
                dtype,
                chunk_rows,
                progress,
                began,
            )
        except BaseException:
            if created and not _record(_open(place))["partitions"]:
                for name in place.names():  # the empty store this call made: leave nothing
                    if name != LOCK:
                        place.child(name).remove()
                if not place.is_url:
                    os.rmdir(place.location)
            raise
        finally:
            for fd in locks:
                os.close(fd)


def _ingest_locked(
    units: list[_Unit],
    out: Location,
    locks: list[int],
    columns: Sequence[str] | None,
    query: str | None,
    missing: str,
    replace_partition: bool,
    dtype: str | None,
    chunk_rows: int | None,
    progress: Progress | None,
    began: float,
) -> dict[str, Any]:
    """The work of `ingest` once ``out`` exists and is locked (same parameters; ``locks``
    collects the lock descriptors of the versions a replacement swaps in)."""
    store = _open(out)
    record = _check_record(out, store)
    names = list(record["columns"])
    stored = np.dtype(record["dtype"])
    if columns is not None and list(columns) != names:
        raise ParameterError(
            f"{out.location!r} holds the columns {names}; ingest the same columns into "
            "it, or write another store.",
            parameter="columns",
        )
    if dtype is not None and np.dtype(dtype) != stored:
        raise ParameterError(
            f"{out.location!r} holds {stored.name}; pass dtype={stored.name!r} or write "
            "another store.",
            parameter="dtype",
        )
    if chunk_rows is not None and chunk_rows != record["chunk_rows"]:
        raise ParameterError(
            f"{out.location!r} has chunks of {record['chunk_rows']} rows; appends keep "
            "them: drop chunk_rows or write another store.",
            parameter="chunk_rows",
        )
    _drop_uncommitted(out, store.shape[0], record["chunk_rows"])

    done = {p["name"]: p for p in record["partitions"]}
    report: list[dict[str, Any]] = []
    messages: list[str] = []
    state = {"rows": 0, "partitions": 0}

    def tell(name: str) -> None:
        if progress is not None:
            seconds = time.perf_counter() - began
            progress(
                {
                    "rows": state["rows"],
                    "partitions": state["partitions"],
                    "partitions_total": len(units),
                    "partition": name,
                    "seconds": seconds,
                    "rows_per_s": state["rows"] / seconds if seconds > 0 else 0.0,
                }
            )

    # Partitions already in the store: hash them again, refuse a changed one before writing.
    changed: list[tuple[_Unit, str]] = []
    for unit in units:
        if unit.name not in done:
            continue
        digest = hashlib.sha256()
        _, blocks, _ = _blocks(unit, query, names, stored, missing)
        for block in blocks:
            digest.update(np.ascontiguousarray(block).data)
            state["rows"] += block.shape[0]
        if "sha256:" + digest.hexdigest() == done[unit.name]["sha256"]:
            messages.append(f"partition {unit.name!r} is already in the store, unchanged; skipped.")
            report.append(_entry(done[unit.name], "unchanged"))
            state["partitions"] += 1
            tell(unit.name)
        else:
            changed.append((unit, done[unit.name]["sha256"]))
    if changed and replace_partition and out.is_url:
        raise OutputError(
            f"partition {changed[0][0].name!r} changed since it was ingested into "
            f"{out.location!r}; replacing it rewrites the store from that partition on, "
            "which needs renames that object stores lack: ingest into a new store, or into "
            "a local store and copy it to the bucket.",
            parameter="replace_partition",
        )
    if changed and not replace_partition:
        raise DataError(
            f"partition {changed[0][0].name!r} changed since it was ingested into "
            f"{out.location!r} (content hash differs); pass {{replace_partition}} to "
            "replace it (its rows and the rows after it are rewritten)."
        )

    def write(unit: _Unit, start: int) -> tuple[_Writer, dict[str, Any]]:
        """Stage the rows of ``unit`` from row ``start`` on; return the writer and its entry."""
        writer = _Writer(out, start)
        try:
            digest = hashlib.sha256()
            _, blocks, counts = _blocks(unit, query, names, stored, missing)
            for block in blocks:
                digest.update(np.ascontiguousarray(block).data)
                before = writer.index
                writer.add(block)
                state["rows"] += block.shape[0]
                if writer.index != before:
                    tell(unit.name)
        except BaseException:
            writer.discard()
            raise
        entry = {
            "name": unit.name,
            "row_start": start,
            "row_stop": writer.rows,
            "rows": writer.rows - start,
            "rows_dropped": counts.dropped,
            "sha256": "sha256:" + digest.hexdigest(),
        }
        return writer, entry

    for unit, _ in changed:  # each replaced version keeps the lock: in ``locks``
        current = _record(_open(out))
        parts = current["partitions"]
        at = next(i for i, p in enumerate(parts) if p["name"] == unit.name)
        writer, entry = write(unit, parts[at]["row_start"])
        try:
            later = []
            committed = _open(out)
            for p in parts[at + 1 :]:
                shifted = dict(p, row_start=writer.rows)
                for lo in range(p["row_start"], p["row_stop"], writer.chunk_rows):
                    writer.add(committed[lo : min(lo + writer.chunk_rows, p["row_stop"])])
                later.append(dict(shifted, row_stop=writer.rows))
            writer.finish(dict(current, partitions=[*parts[:at], entry, *later]))
            locks.append(writer.commit_swap())
        finally:
            writer.discard()
        messages.append(
            f"partition {unit.name!r} replaced ({entry['rows']} rows); "
            f"{len(later)} later partition(s) moved."
        )
        report.append(_entry(entry, "replaced"))
        state["partitions"] += 1
        tell(unit.name)

    for unit in units:
        if unit.name in done:
            continue
        current = _record(_open(out))
        start = int(_open(out).shape[0])
        writer, entry = write(unit, start)
        try:
            writer.finish(dict(current, partitions=[*current["partitions"], entry]))
            writer.commit_append()
        finally:
            writer.discard()
        report.append(_entry(entry, "added"))
        state["partitions"] += 1
        tell(unit.name)

    final = _open(out)
    seconds = time.perf_counter() - began
    added = [r for r in report if r["status"] != "unchanged"]
    return {
        "out": out.location,
        "n_samples": int(final.shape[0]),
        "n_features": int(final.shape[1]),
        "columns": names,
        "dtype": stored.name,
        "chunk_rows": int(final.chunks[0]),
        "rows_added": sum(r["rows"] for r in added),
        "rows_dropped": sum(r["rows_dropped"] for r in added),
        "partitions": report,
        "messages": messages,
        "seconds": seconds,
        "rows_per_s": state["rows"] / seconds if seconds > 0 else 0.0,
    }


def _entry(part: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "name": part["name"],
        "status": status,
        "rows": part["rows"],
        "rows_dropped": part["rows_dropped"],
    }
