"""Stage: export. Materialised dense models, ONNX files, Hugging Face models and
elastic checkpoints."""

from .hf import to_hf
from .onnx import to_onnx

__all__ = ["to_hf", "to_onnx"]
