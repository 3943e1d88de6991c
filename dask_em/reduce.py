"""The only module that builds Dask graphs.

`RowData` holds a dataset as a Dask array chunked by rows (all features in one chunk)
with optional sample weights. `RowData.map_reduce` maps a chunk function of
`dask_em.kernels` over every row chunk and adds the results up with a tree reduction
of fan-in at most ``split_every``, in a fixed order (by chunk index), so the result does
not depend on which worker ran which task. Each call is one pass over the data and one
``compute``. Broadcast arguments (the current parameters) are one key in the graph,
shared by all tasks, never copied into each task.

`map_rows` builds the lazy per-row outputs (labels, responsibilities, log-densities).

No EM logic here: the callers decide what the chunk functions compute.
"""

from __future__ import annotations

import collections
import functools
import operator
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed

from dask_em.errors import DataError, invalid_parameter

DEFAULT_SPLIT_EVERY = 8

TASK_MEMORY_FACTOR = 3
"""Memory a chunk task needs, in multiples of its chunk's bytes (the chunk, the kernel's
per-row buffers, the decoded copy of a streamed read): the basis of `check_chunk_memory`."""


def as_row_chunked(X: da.Array) -> da.Array:
    """Return ``X`` with all features in one chunk (rechunked if it was split along features)."""
    if len(X.chunks[1]) > 1:
        X = X.rechunk({0: X.chunks[0], 1: -1})
    return X


def _sum(*values: Any) -> Any:
    """Add values left to right: the fixed-order combine step of the tree reduction."""
    return functools.reduce(operator.add, values)


def _apply_each(
    X: np.ndarray,
    w: np.ndarray | None,
    index: int,
    start: int,
    calls: tuple[tuple[Callable[..., Any], tuple[Any, ...]], ...],
) -> tuple[Any, ...]:
    """Every call's chunk function on one chunk (read once)."""
    return tuple(fn(X, w, index, start, *args) for fn, args in calls)


def _sum_each(*values: tuple[Any, ...]) -> tuple[Any, ...]:
    """Element-wise `_sum` of tuples (the combine step of `RowData.build_many`)."""
    return tuple(_sum(*column) for column in zip(*values, strict=True))


def _broadcast(value: Any) -> Any:
    """One graph key for a non-scalar argument, so tasks reference it instead of embedding it."""
    if isinstance(value, int | float | str | bool | None):
        return value
    return dask.delayed(value, pure=True, traverse=False)


try:  # Dask's task spec is not public API: without it, blocks stay tasks of their own
    from dask._task_spec import Task, convert_legacy_graph
except ImportError:  # pragma: no cover - depends on the installed Dask
    Task = None


def _fuse_block_tasks(result: Delayed, block_keys: Collection[Any]) -> Delayed:
    """``result`` with the task of each block in ``block_keys`` run inside the one task using it.

    In a pass, each block (a chunk read from Zarr, say) feeds one chunk task. Dask's own
    fusion leaves them apart because the chunk task also depends on the shared
    parameters; apart, every block becomes a result the worker stores and reports, and
    which the scheduler may copy to another worker, before the chunk function runs. Fused,
    a pass has half the tasks and a chunk lives only inside its task. Blocks already in
    memory (persisted) have no task and are left as they are.
    """
    if Task is None or not hasattr(Task, "fuse"):
        return result
    graph = convert_legacy_graph(dict(result.__dask_graph__()))
    n_dependents = collections.Counter(d for node in graph.values() for d in node.dependencies)
    fused = dict(graph)
    for key, node in graph.items():
        blocks = [
            graph[d]
            for d in node.dependencies
            if d in block_keys and type(graph.get(d)) is Task and n_dependents[d] == 1
        ]
        if blocks:
            for block in blocks:
                del fused[block.key]
            fused[key] = Task.fuse(*blocks, node, key=key)
    return Delayed(result.key, fused)


def _distributed_client() -> Any:
    """The ``distributed.Client`` that Dask's ``compute`` would run on now, or None.

    None also when a client exists but another scheduler is in force (e.g. inside
    ``dask.config.set(scheduler="threads")``).
    """
    if "distributed" not in sys.modules:  # no client can exist: do not import it for nothing
        return None
    from distributed import Client

    owner = getattr(dask.base.get_scheduler(), "__self__", None)
    return owner if isinstance(owner, Client) else None


def _persist_spread(
    client: Any, X: da.Array, w: da.Array | None
) -> tuple[da.Array, da.Array | None]:
    """Persist ``X`` (and ``w``) with row chunk ``i`` on worker ``i mod n_workers``.

    Every pass then finds the chunks evenly spread, instead of wherever the reads
    happened to run (3 of 4 chunks on one worker makes a pass 1.5x longer). The
    placement is a preference (``allow_other_workers``): a chunk lost with its worker is
    recomputed on any other.
    """
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    x_parts, w_parts = [], []
    for i in range(len(X.chunks[0])):
        where = {"workers": [workers[i % len(workers)]], "allow_other_workers": True}
        x_parts.append(client.persist(X.blocks[i], **where))
        if w is not None:
            w_parts.append(client.persist(w.blocks[i], **where))
    X = da.concatenate(x_parts, axis=0)
    return X, (da.concatenate(w_parts, axis=0) if w is not None else None)


def cluster_memory_limit() -> float:
    """Total memory limit of the workers, in bytes.

    The workers of the active ``distributed.Client`` if there is one (a worker without a
    limit counts with the machine's memory), else this machine's available memory.
    """
    import psutil

    machine = float(psutil.virtual_memory().available)
    client = _distributed_client()
    if client is None:
        return machine
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return float(sum(w.get("memory_limit") or machine for w in workers)) or machine


def check_chunk_memory(X: da.Array) -> None:
    """Refuse row chunks too large for the memory limit of the active cluster's workers.

    A worker whose tasks need more than its memory limit is restarted by its nanny
    again and again, and the fit ends after minutes with a ``KilledWorker`` error;
    checking before the first pass fails at once and says what to change. Nothing is
    checked without a ``distributed.Client`` or when no worker has a memory limit.

    Parameters
    ----------
    X : dask.array.Array of shape (n, D)
        Row-chunked data, as the passes will read it.

    Raises
    ------
    DataError
        If `TASK_MEMORY_FACTOR` x the largest chunk's bytes x a worker's threads exceeds
        that worker's memory limit; the message suggests a number of rows per chunk.
    """
    client = _distributed_client()
    if client is None or X.size == 0:
        return
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    limits = [(w["memory_limit"], w.get("nthreads") or 1) for w in workers if w.get("memory_limit")]
    if not limits:
        return
    row_bytes = X.dtype.itemsize * int(X.shape[1])
    chunk_bytes = max(X.chunks[0]) * row_bytes
    limit, nthreads = min(limits, key=lambda lt: lt[0] / lt[1])
    if TASK_MEMORY_FACTOR * chunk_bytes * nthreads <= limit:
        return
    rows = max(1, int(limit // (2 * TASK_MEMORY_FACTOR * nthreads * row_bytes)))
    raise DataError(
        f"row chunks of {chunk_bytes / 2**20:.1f} MiB are too large for workers with a "
        f"{limit / 2**20:.0f} MiB memory limit and {nthreads} thread(s) (a task needs about "
        f"{TASK_MEMORY_FACTOR}x its chunk); use smaller chunks of about {rows} rows "
        f"({{chunk_rows}}={rows}, which cannot split a store's own chunks) or give the "
        "workers more memory ({memory_limit}).",
        parameter="chunk_rows",
    )


class RowData:
    """A dataset of rows to map-reduce over, with a count of the passes made.

    Parameters
    ----------
    X : dask.array.Array of shape (n, D)
        Chunked by rows; features are merged into one chunk if needed.
    sample_weight : dask.array.Array of shape (n,), optional
        Rechunked to the row chunks of ``X``.
    split_every : int, default 8
        Maximum fan-in of the tree reduction (at least 2).

    Attributes
    ----------
    n_passes : int
        Number of `map_reduce` calls made, i.e. full passes over the data.
    """

    def __init__(
        self,
        X: da.Array,
        sample_weight: da.Array | None = None,
        split_every: int = DEFAULT_SPLIT_EVERY,
    ) -> None:
        if split_every < 2:
            raise invalid_parameter("split_every", split_every, "use an integer >= 2")
        self.X = as_row_chunked(X)
        self.sample_weight = (
            None if sample_weight is None else sample_weight.rechunk((self.X.chunks[0],))
        )
        self.split_every = int(split_every)
        self.n_passes = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_samples, n_features)``."""
        return (int(self.X.shape[0]), int(self.X.shape[1]))

    @property
    def row_starts(self) -> list[int]:
        """Global index of the first row of each chunk."""
        return [0, *np.cumsum(self.X.chunks[0])[:-1].tolist()]

    def persisted(self, cache: bool | str) -> RowData:
        """This data held in the cluster's memory, if ``cache`` says so.

        Parameters
        ----------
        cache : {'auto', True, False}
            ``'auto'`` persists when the array takes less than half of
            `cluster_memory_limit`; ``True`` always; ``False`` never (every pass streams
            from the source).
        """
        if cache == "auto":
            cache = self.X.nbytes < 0.5 * cluster_memory_limit()
        if not cache:
            return self
        X, w = self.X, self.sample_weight
        client = _distributed_client()
        if client is not None:
            X, w = _persist_spread(client, X, w)
        else:
            X, w = dask.persist(X, w) if w is not None else (X.persist(), None)
        data = RowData(X, w, self.split_every)
        data.n_passes = self.n_passes
        return data

    def build(self, chunk_fn: Callable[..., Any], *args: Any) -> Delayed:
        """The graph of one pass: ``chunk_fn`` over every chunk, then a fixed-order tree sum.

        ``chunk_fn(X_block, w_block, chunk_index, row_start, *args)`` must return a value
        supporting ``+``. Computing a block (reading it from Zarr) and ``chunk_fn`` on it
        run as one task (see `_fuse_block_tasks`). Returns the lazy result (one key).
        """
        return self._pass(chunk_fn, [_broadcast(a) for a in args], _sum)

    def build_many(self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]) -> Delayed:
        """The graph of one pass evaluating several ``(chunk_fn, args)`` on every chunk.

        Each chunk is read once and every call applied to it; the per-call results are
        summed in the same tree as `build` would, so each sum equals that call's own
        pass exactly. Returns the lazy tuple of sums (one key).
        """
        # task keys name the kernels (e.g. ``em_chunk+em_chunk-<token>``) for dashboards
        name = "+".join(getattr(fn, "__name__", "call") for fn, _ in calls)
        return self._pass(_apply_each, [_broadcast(tuple(calls))], _sum_each, name)

    @functools.cached_property
    def _chunk_blocks(self) -> tuple[list[Any], list[Any]]:
        """The delayed blocks of ``X`` and of the weights (None each without weights),
        made once: every pass's graph starts from them."""
        x_blocks = list(self.X.to_delayed().ravel())
        if self.sample_weight is None:
            return x_blocks, [None] * len(x_blocks)
        return x_blocks, list(self.sample_weight.to_delayed().ravel())

    def _pass(
        self,
        fn: Callable[..., Any],
        shared: list[Any],
        add: Callable[..., Any],
        name: str | None = None,
    ) -> Delayed:
        """``fn(X_block, w_block, i, row_start, *shared)`` per chunk, a fixed-order tree of
        ``add`` over the results, and each block's read fused into its chunk task."""
        x_blocks, w_blocks = self._chunk_blocks
        task = dask.delayed(fn, pure=True)
        parts = []
        for i, (xb, wb, start) in enumerate(zip(x_blocks, w_blocks, self.row_starts, strict=True)):
            if name is None:
                parts.append(task(xb, wb, i, start, *shared))
            else:
                key = f"{name}-{tokenize(fn, xb, wb, i, start, *shared)}"
                parts.append(task(xb, wb, i, start, *shared, dask_key_name=key))
        combine = dask.delayed(add, pure=True)
        while len(parts) > 1:
            parts = [
                combine(*parts[j : j + self.split_every])
                for j in range(0, len(parts), self.split_every)
            ]
        block_keys = {b.key for b in (*x_blocks, *w_blocks) if b is not None}
        return _fuse_block_tasks(parts[0], block_keys)

    def map_reduce(self, chunk_fn: Callable[..., Any], *args: Any) -> Any:
        """Run one pass (one ``compute``) of ``chunk_fn`` over the data; see `build`."""
        result = self.build(chunk_fn, *args).compute()
        self.n_passes += 1
        return result

    def map_reduce_many(
        self, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]
    ) -> list[Any]:
        """Run one pass (one ``compute``) serving every ``(chunk_fn, args)``; see `build_many`.

        A single call runs as `map_reduce` (the same graph as before shared passes).
        """
        if len(calls) == 1:
            ((fn, args),) = calls
            return [self.map_reduce(fn, *args)]
        result = list(self.build_many(calls).compute())
        self.n_passes += 1
        return result

    def read_rows(self, indices: np.ndarray) -> np.ndarray:
        """The rows at ``indices`` (in that order), reading only the chunks that hold them.

        Returns
        -------
        rows : ndarray of shape (len(indices), D), float64
        """
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices)
        rows = np.asarray(self.X[indices[order]].compute(), dtype=np.float64)
        out = np.empty_like(rows)
        out[order] = rows
        return out


def _located(
    X: np.ndarray,
    params: Any,
    block_fn: Callable[..., np.ndarray],
    block_info: dict[Any, Any] | None = None,
) -> np.ndarray:
    """``block_fn(X, params, chunk_index, row_start)`` with the block's place in the array."""
    info = (block_info or {}).get(0, {})
    chunk_index = int(info.get("chunk-location", (0,))[0])
    row_start = int(info.get("array-location", [(0, 0)])[0][0])
    return block_fn(X, params, chunk_index, row_start)


def map_rows(
    X: da.Array,
    block_fn: Callable[..., np.ndarray],
    params: Any,
    dtype: Any,
    n_cols: int | None = None,
) -> da.Array:
    """Lazy per-row output of ``block_fn(X_block, params, chunk_index, row_start)``.

    Parameters
    ----------
    X : dask.array.Array of shape (n, D)
    block_fn : callable
        Returns shape (n_block,) when ``n_cols`` is None, else (n_block, n_cols);
        ``chunk_index`` and ``row_start`` (the global index of the block's first row)
        name the block in its errors.
    params : object
        Shared by every block as one graph key.
    dtype : numpy dtype of the output
    n_cols : int, optional

    Returns
    -------
    dask.array.Array of shape (n,) or (n, n_cols)
    """
    X = as_row_chunked(X)
    shared = _broadcast(params)
    if n_cols is None:
        return X.map_blocks(
            _located, shared, block_fn, drop_axis=1, dtype=dtype, meta=np.empty((0,), dtype=dtype)
        )
    return X.map_blocks(
        _located,
        shared,
        block_fn,
        chunks=(X.chunks[0], (n_cols,)),
        dtype=dtype,
        meta=np.empty((0, 0), dtype=dtype),
    )


def from_blocks(
    block_fn: Callable[..., np.ndarray],
    row_chunks: Sequence[int],
    n_cols: int | None,
    dtype: Any,
    *args: Any,
) -> da.Array:
    """A lazy array whose chunk ``i`` is ``block_fn(i, row_chunks[i], *args)``.

    Parameters
    ----------
    block_fn : callable
        Returns shape (rows,) when ``n_cols`` is None, else (rows, n_cols).
    row_chunks : sequence of int
        Rows of each chunk.
    n_cols : int or None
    dtype : numpy dtype of the blocks
    *args
        Shared by every block (one graph key each).

    Returns
    -------
    dask.array.Array of shape (sum(row_chunks),) or (sum(row_chunks), n_cols)
    """
    shared = [_broadcast(a) for a in args]
    fn = dask.delayed(block_fn, pure=True)
    blocks = [
        da.from_delayed(
            fn(i, int(rows), *shared),
            shape=(int(rows),) if n_cols is None else (int(rows), n_cols),
            dtype=dtype,
        )
        for i, rows in enumerate(row_chunks)
    ]
    return da.concatenate(blocks, axis=0)


def row_chunks(n_rows: int, chunk_rows: int) -> tuple[int, ...]:
    """Row chunk sizes: ``chunk_rows`` each, the last one shorter."""
    full, rest = divmod(int(n_rows), int(chunk_rows))
    return (int(chunk_rows),) * full + ((rest,) if rest else ())
