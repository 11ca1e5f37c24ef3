"""Stage: export. Materialised dense models, Hugging Face models and elastic checkpoints."""

from .hf import to_hf

__all__ = ["to_hf"]
