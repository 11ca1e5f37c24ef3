"""Stage: export. Materialised dense models, ONNX files, Hugging Face models and
elastic checkpoints."""

from .dense import materialize
from .elastic_onnx import to_elastic_onnx
from .hf import to_hf
from .onnx import to_onnx

__all__ = ["materialize", "to_elastic_onnx", "to_hf", "to_onnx"]
