"""Error types. Every message names what is wrong and what the user can do about it."""

from __future__ import annotations


class FlextronError(Exception):
    """Base class of every error raised by flextron_fx."""


class TraceError(FlextronError):
    """The model could not be captured as a torch.fx graph."""


class UnsupportedModelError(FlextronError):
    """The graph holds no MLP or attention block that can be made elastic."""


class WidthError(FlextronError, ValueError):
    """Widths given to an elastic model are out of range or not among the candidates."""


class CalibrationDataError(FlextronError, ValueError):
    """Calibration inputs have the wrong type, shape or values."""


class MemoryBudgetError(FlextronError, MemoryError):
    """A step would need more memory than the machine has; raised before it starts."""


class CheckpointError(FlextronError):
    """A saved elastic model is missing, incomplete or does not match the model given."""


class TrainingError(FlextronError):
    """A training run was started with bad settings or cannot resume from its folder."""


class ProfileError(FlextronError):
    """A latency measurement or a cost model got settings or a table it cannot use."""


class FingerprintError(ProfileError):
    """A latency table was measured for another machine, backend, dtype, shape or model."""


class MissingEntryError(ProfileError, LookupError):
    """A latency table has no entry for an op at some width and shape."""


class InputError(FlextronError, ValueError):
    """Inputs given to an elastic model have the wrong shape or values."""


class InputShapeError(InputError):
    """An input's shape is one the traced graph does not accept (it was traced static or
    bounded along that dimension)."""


class OutputError(FlextronError):
    """An output path holds something that writing there would delete, or cannot be
    written to."""


class ExportError(FlextronError):
    """An export that failed, or whose result does not match the model it came from."""


class CodegenError(FlextronError):
    """A lowering or a kernel launch got a backend, device, dtype or block it cannot run."""
