"""The exceptions and warnings dask-em raises for problems the user can fix.

Every problem a user can fix is a `UserError`: its message is one line naming the
problem and the fix, in Python's words (parameter names such as ``checkpoint_dir``).
The ``dask-em`` command catches `UserError` alone, prints the message with its own
option names (`UserError.render`) and exits with status 2; any other exception is a
bug and exits with status 1 and a traceback.

A message is written as a template in which a parameter the user can change is a
field in braces, ``"use another {checkpoint_dir}"``. `PYTHON_WORDS` lists every field
and its Python wording (``str(err)`` renders with it); the CLI renders the same template
with its option names instead, so no library message names a CLI flag
and the CLI never parses a message.

`UserError` subclasses `ValueError`, so code written against scikit-learn's
``GaussianMixture`` (``except ValueError``) keeps working.

=============================  ====================================================
class                          raised for
=============================  ====================================================
`ParameterError`               an invalid hyper-parameter or argument value
`DataError`                    input data that cannot be used as given (shape,
                               dtype, values, store layout, a missing or corrupt
                               chunk, a damaged model)
`OutputError`                  a destination that cannot or must not be written
`CheckpointError`              a checkpoint directory that cannot be used
                               (`dask_em.checkpoint` has the subclasses
                               ``CheckpointMismatch``, ``CheckpointDamaged``,
                               ``CheckpointLocked``)
`ClusterError`                 a Dask cluster that cannot be reached or used
`IllDefinedCovarianceError`    a covariance that is not positive definite
=============================  ====================================================

`Interrupted` is not a user error: it is how the ``dask-em`` command stops a running
command on SIGTERM or SIGINT (a `KeyboardInterrupt`, so ``finally`` blocks and context
managers close clusters and release checkpoint locks on the way out); `stop_deferred`
holds it back over a step that must not be cut short (starting a cluster).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

PYTHON_WORDS: dict[str, str] = {
    "array": "array",
    "ca_file": "ca_file",
    "cert": "cert",
    "checkpoint_dir": "checkpoint_dir",
    "chunk_rows": "chunk_rows",
    "compute_dtype": "compute_dtype",
    "cores": "cores",
    "init_model": "init_model",
    "job_extra_directives": "job_extra_directives",
    "jobs": "jobs",
    "key": "key",
    "memory": "memory",
    "memory_limit": "memory_limit",
    "missing_drop": "missing='drop'",
    "missing_keep": "missing='keep'",
    "missing": "missing='em'",
    "n_components": "n_components",
    "queue": "queue",
    "no_lock": "checkpoint_lock=False",
    "reg_covar": "reg_covar",
    "replace_partition": "replace_partition=True",
    "restart": "fit(..., restart=True)",
    "scheduler": "scheduler",
    "scheduler_file": "scheduler_file",
    "security": "security",
    "walltime": "walltime",
    "storage_options": "storage_options",
}
"""The fields a message template may hold, each with its wording for a Python user.

A field is a parameter (or fit option) the message asks the user to change; the CLI
maps each one to its option (a test checks that it maps them all)."""

_FIELD = re.compile(r"\{([a-z_]+)\}")


def render(template: str, words: Mapping[str, str]) -> str:
    """``template`` with each field ``{name}`` of `PYTHON_WORDS` replaced by ``words[name]``.

    Braces around anything else (a path, a repr) are left as they are.
    """
    return _FIELD.sub(
        lambda m: words.get(m[1], PYTHON_WORDS[m[1]]) if m[1] in PYTHON_WORDS else m[0],
        template,
    )


class UserError(ValueError):
    """A problem the user can fix; the message is one line saying what to change.

    Parameters
    ----------
    template : str
        The message, with the parameters the user can change as ``{name}`` fields
        (keys of `PYTHON_WORDS`); ``str(err)`` renders it with `PYTHON_WORDS`.
    parameter : str, optional
        The Python parameter at fault, when one is (overrides the class's).

    Attributes
    ----------
    template : str
    parameter : str or None
        The Python parameter at fault (for example ``"reg_covar"``), when one is; the
        CLI uses it to say which of its options was at fault.
    """

    parameter: str | None = None

    def __init__(self, template: str, *, parameter: str | None = None) -> None:
        super().__init__(render(template, PYTHON_WORDS))
        self.template = template
        if parameter is not None:
            self.parameter = parameter

    def render(self, words: Mapping[str, str]) -> str:
        """The message with the fields named by ``words`` (e.g. the CLI's option names)."""
        return render(self.template, words)

    def __reduce__(self) -> tuple[Any, ...]:
        # raised in a Dask worker, re-raised in the client: keep template and parameter
        return (type(self), (self.template,), self.__dict__)


def invalid_parameter(name: str, value: Any, rule: str) -> ParameterError:
    """The `ParameterError` for hyper-parameter ``name`` of invalid ``value``.

    One wording for every hyper-parameter check: ``Invalid value for 'tol': -1; use a
    number >= 0.``
    """
    return ParameterError(f"Invalid value for {name!r}: {value!r}; {rule}.", parameter=name)


class ParameterError(UserError):
    """A hyper-parameter or argument has an invalid value."""


class DataError(UserError):
    """The input data cannot be used as given; the message says what to change."""


class OutputError(UserError):
    """An output destination cannot, or must not, be written."""


class CheckpointError(UserError):
    """A checkpoint directory cannot be used as asked."""

    parameter = "checkpoint_dir"


class ClusterError(UserError):
    """The Dask cluster cannot be reached or used (connection, TLS, lost workers)."""


class IllDefinedCovarianceError(UserError):
    """A covariance is not positive definite (collapsed or too few samples)."""

    parameter = "reg_covar"


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM or SIGINT).

    Raised in the main thread by the ``dask-em`` command's signal handler, wherever the
    command is (a Dask ``compute`` waiting included), so the work unwinds as for Ctrl-C.
    A `KeyboardInterrupt`, so that Dask and distributed cancel the running computation
    as they do for Ctrl-C, and no ``except Exception`` turns it into another error.

    Parameters
    ----------
    signum : int
        The signal received.

    Attributes
    ----------
    signum : int
    name : str
        The signal's name, e.g. ``'SIGTERM'``.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


class _StopHold:
    """The state of `stop_deferred` blocks (main thread, where signal handlers run)."""

    depth = 0
    pending: int | None = None


def hold_stop(signum: int) -> bool:
    """For a signal handler about to raise `Interrupted`: whether a `stop_deferred` block
    is running, in which case the stop is recorded and raised at the block's end."""
    if _StopHold.depth == 0:
        return False
    _StopHold.pending = signum
    return True


@contextmanager
def stop_deferred() -> Iterator[None]:
    """Hold back a stop by signal (see `hold_stop`) until the ``with`` block ends, then
    raise it as `Interrupted`: for steps that must not be cut short (starting a cluster,
    whose half-made state nothing could close)."""
    _StopHold.depth += 1
    try:
        yield
    finally:
        _StopHold.depth -= 1
    if _StopHold.depth == 0 and _StopHold.pending is not None:
        signum, _StopHold.pending = _StopHold.pending, None
        raise Interrupted(signum)


class DaskEMWarning(UserWarning):
    """Base class of the warnings dask-em issues."""


class EmptyComponentWarning(DaskEMWarning):
    """A component lost all its mass during a fit and was re-seeded (`dask_em.reseed`),
    or could not be re-seeded and stays empty."""


class CheckpointWarning(DaskEMWarning):
    """A checkpoint was used with a reservation (a damaged newer state was skipped)."""
