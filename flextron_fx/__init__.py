"""flextron_fx: one trained transformer in, a family of nested elastic sub-networks out.

Example:
    >>> import flextron_fx                              # doctest: +SKIP
    >>> em = flextron_fx.flextronize(model, (ids,), calibration)  # doctest: +SKIP
    >>> em.set_widths(0.5); small = em.materialize()    # doctest: +SKIP
"""

from .config import FlextronConfig
from .elastic.model import ElasticModel
from .errors import (
    CalibrationDataError,
    CheckpointError,
    ExportError,
    FlextronError,
    InputShapeError,
    OutputError,
    ProfileError,
    TraceError,
    UnsupportedModelError,
    WidthError,
)
from .export.checkpoint import load, save
from .export.sliced import install as _install_auto_classes
from .pipeline import flextronize

_install_auto_classes()  # per-layer-width Hugging Face exports load with AutoModelForCausalLM

__all__ = [
    "CalibrationDataError", "CheckpointError", "ElasticModel", "ExportError", "FlextronConfig",
    "FlextronError", "InputShapeError", "OutputError", "ProfileError", "TraceError", "UnsupportedModelError",
    "WidthError", "flextronize", "load", "save",
]
__version__ = "0.1.0"
