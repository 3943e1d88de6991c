"""Exceptions that dask-em raises for problems the user can fix.

`DataError` is a `ValueError` about the input data (shape, dtype, values, store layout);
its message is one line naming the problem and the fix. The CLI prints such messages
without a traceback and exits with status 2. `EmptyComponentWarning` reports a re-seeded
component (the CLI prints it as a ``warning:`` line).
"""

from __future__ import annotations


class DataError(ValueError):
    """The input data cannot be fitted as given; the message says what to change."""


class EmptyComponentWarning(UserWarning):
    """A component lost all its mass during a fit and was re-seeded (`dask_em.reseed`)."""
