"""What can be wrong with a checkpoint; all are user-input errors (one line, exit status 2)."""

from ..errors import ModelFolderError


class CheckpointError(ModelFolderError):
    """A weights file that is empty, truncated, corrupt or not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that references code outside the allowlist; loading it could run that code."""


class UnsupportedModelError(CheckpointError):
    """A valid checkpoint of a model family this converter does not handle (SDXL, SD3, ...)."""
