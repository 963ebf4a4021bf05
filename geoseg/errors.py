"""One exception hierarchy for geoseg.

Every exception is a :class:`GeosegError` and also subclasses the builtin that fits, so callers may
catch either (``except ValueError`` keeps working). Messages name the file, the offending value and
the fix.
"""


class GeosegError(Exception):
    """Root of all geoseg errors."""


class InputError(GeosegError, ValueError):
    """An input raster cannot be segmented as it is (bad georeferencing, bands, dtype...)."""


class NotGeoreferencedError(InputError):
    """The raster has no CRS, an identity transform, or a rotated/sheared geotransform."""


class BandMismatchError(InputError):
    """The raster's bands (names, count or dtype) do not fit the model card."""


class RasterReadError(GeosegError, OSError):
    """A raster could not be opened or a window of it could not be read (corrupt, truncated)."""


class ModelCardError(GeosegError, ValueError):
    """A model directory, card or weights file is missing or invalid."""


class OutputExistsError(GeosegError, FileExistsError):
    """An output exists already and ``--overwrite`` was not given."""


class UnsafeOutputNameError(GeosegError, ValueError):
    """An output name would escape the output root."""


class ConfigError(GeosegError, ValueError):
    """Invalid options or configuration."""


class StorageError(GeosegError, OSError):
    """An object store or output folder could not be read or written."""


class LockedError(GeosegError, RuntimeError):
    """Another run holds the output root's lock."""


class InputChangedError(InputError):
    """An input was overwritten while it was segmented; its outputs were discarded."""


class DuplicateSubmissionError(GeosegError, RuntimeError):
    """The same job (same config and inputs) was submitted to the cluster already."""


class CompileError(GeosegError, RuntimeError):
    """A model compiled ahead of time disagrees with the model it was compiled from."""
