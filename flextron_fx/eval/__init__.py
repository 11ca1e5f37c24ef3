"""Quality measurements for dense and elastic models."""

from flextron_fx.eval.perplexity import perplexity

__all__ = ["perplexity"]
