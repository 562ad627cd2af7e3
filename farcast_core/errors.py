"""One exception root for the whole project.

Every error a user can cause is a ``FarcastError``; each subclass also inherits the
builtin it refines, so ``except ValueError`` in user code keeps working. Messages name
the file, the tensor and what to do.
"""


class FarcastError(Exception):
    """Root of every error farcast raises on purpose."""


class CheckpointError(FarcastError, ValueError):
    """A checkpoint directory or file cannot be used as it is (layout, naming, corruption)."""


class SequenceMismatchError(CheckpointError):
    """A tensor's shape, dtype or presence differs between steps of one run."""


class StoreError(FarcastError, RuntimeError):
    """The Zarr store is missing, belongs to another run, or cannot take the change asked."""


class ForecastError(FarcastError, ValueError):
    """A forecast cannot be made as asked (target too far, too few checkpoints, worse than persistence)."""


class ScheduleEndError(ForecastError):
    """The target lies past the end of the run's learning-rate schedule."""


class StoreLockedError(StoreError):
    """Another process is writing the store (or its forecaster files) now."""


class ConfigError(FarcastError, ValueError):
    """An option or setting has a value farcast cannot use."""
