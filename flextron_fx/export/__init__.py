"""Stage: export. Materialised dense models, ONNX files (logits only, or a decoder with a
key/value cache), Hugging Face models (uniform or per-layer widths), generation and
elastic checkpoints."""

from .decoder_onnx import to_onnx_decoder
from .dense import materialize
from .elastic_onnx import to_elastic_onnx
from .hf import to_hf
from .onnx import to_onnx
from .sliced import sliced_hf

__all__ = ["materialize", "sliced_hf", "to_elastic_onnx", "to_hf", "to_onnx", "to_onnx_decoder"]
