"""The exceptions and warnings dask-em raises for problems the user can fix.

Every problem a user can fix is a `UserError`: its message is one line naming the
problem and the fix, in Python's words (parameter names such as ``checkpoint_dir=``).
The ``dask-em`` command catches `UserError` alone, prints the message (adding its own
option names where a subclass says which parameter is at fault) and exits with status
2; any other exception is a bug and exits with status 1 and a traceback.

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
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message is one line saying what to change.

    Attributes
    ----------
    parameter : str or None
        The Python parameter at fault (for example ``"reg_covar"``), when one is; the
        CLI uses it to name its own option.
    """

    parameter: str | None = None

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        if parameter is not None:
            self.parameter = parameter


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


class DaskEMWarning(UserWarning):
    """Base class of the warnings dask-em issues."""


class EmptyComponentWarning(DaskEMWarning):
    """A component lost all its mass during a fit and was re-seeded (`dask_em.reseed`),
    or could not be re-seeded and stays empty."""


class CheckpointWarning(DaskEMWarning):
    """A checkpoint was used with a reservation (a damaged newer state was skipped)."""
