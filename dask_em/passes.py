"""Shared passes: algorithms written as coroutines that ask for passes, served together.

An initializer or an EM run is a generator that yields requests and receives their
answers:

- `Pass` — one pass over the data: ``fn(X_block, w_block, chunk_index, row_start,
  *args)`` on every row chunk, summed over chunks; the answer is the sum.
- `Rows` — a few rows by global index (not a pass: only the chunks holding them are read).

`serve_together` advances several such generators in lock step: at each step it answers
every pending `Rows` request with one read, then every pending `Pass` request with
**one** pass over the data that evaluates all of them on each chunk. ``n_init``
candidates thus read the data once per step instead of once each. Each answer is
exactly what the request would get on its own (same chunks, same reduction order), so a
candidate's trajectory does not depend on which others share its passes.

No Dask here: the caller supplies ``run_passes`` and ``read_rows`` (see
`dask_em.reduce.RowData`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np

T = TypeVar("T")


class Pass(NamedTuple):
    """A request for one pass: ``fn`` over every row chunk with ``args``, summed."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


class Rows(NamedTuple):
    """A request for the rows at ``indices`` (ndarray of int), answered as (m, D) float64."""

    indices: np.ndarray


Request = Pass | Rows
Steps = Generator[Request, Any, T]
"""A coroutine: yields `Request` objects, is sent their answers, returns its result."""


def serve_together(
    steps: Sequence[Steps[Any]],
    run_passes: Callable[[list[Pass]], list[Any]],
    read_rows: Callable[[np.ndarray], np.ndarray],
    after_pass: Callable[[], None] | None = None,
) -> list[Any]:
    """Run coroutines to completion, serving their requests together.

    Parameters
    ----------
    steps : sequence of generators
        Each yields `Pass` / `Rows` requests and returns a result.
    run_passes : callable
        ``run_passes(passes) -> answers``: one pass over the data evaluating every
        request of ``passes``, answers in the same order.
    read_rows : callable
        ``read_rows(indices) -> rows`` of shape (len(indices), D).
    after_pass : callable, optional
        Called after every pass, once every coroutine has received its answer and run
        up to its next request (checkpointing hooks in here).

    Returns
    -------
    list
        The result of each coroutine, in order.
    """
    results: list[Any] = [None] * len(steps)
    pending: dict[int, Request] = {}

    def advance(i: int, answer: Any) -> None:
        try:
            pending[i] = steps[i].send(answer)
        except StopIteration as stop:
            pending.pop(i, None)
            results[i] = stop.value

    for i in range(len(steps)):
        advance(i, None)
    while pending:
        wanted = [(i, r) for i, r in pending.items() if isinstance(r, Rows)]
        if wanted:
            counts = [len(r.indices) for _, r in wanted]
            rows = read_rows(np.concatenate([np.asarray(r.indices, np.int64) for _, r in wanted]))
            ends = np.cumsum(counts)
            for (i, _), end, count in zip(wanted, ends, counts, strict=True):
                advance(i, rows[end - count : end])
            continue
        order = sorted(pending)
        answers = run_passes([pending[i] for i in order])  # type: ignore[misc]
        for i, answer in zip(order, answers, strict=True):
            advance(i, answer)
        if after_pass is not None:
            after_pass()
    return results


def serve_alone(
    steps: Steps[T],
    run_pass: Callable[[Pass], Any],
    read_rows: Callable[[np.ndarray], np.ndarray],
) -> T:
    """Run one coroutine to completion (`serve_together` with a single one)."""
    (result,) = serve_together([steps], lambda ps: [run_pass(p) for p in ps], read_rows)
    return result  # type: ignore[no-any-return]
