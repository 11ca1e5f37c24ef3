"""Stage: export. Materialised dense models, ONNX files (logits only, or a decoder with a
key/value cache), Hugging Face models (uniform or per-layer widths, or per-token widths
chosen by dynamic routers), generation and elastic checkpoints."""

from .decoder_onnx import to_onnx_decoder
from .dense import materialize
from .elastic_onnx import to_elastic_onnx
from .hf import to_hf
from .onnx import to_onnx
from .routed_hf import routed_hf
from .routed_onnx import to_routed_onnx
from .sliced import sliced_hf

__all__ = ["materialize", "routed_hf", "sliced_hf", "to_elastic_onnx", "to_hf", "to_onnx",
           "to_onnx_decoder", "to_routed_onnx"]
