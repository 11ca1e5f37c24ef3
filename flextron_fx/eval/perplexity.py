"""Token-weighted next-token perplexity of any logits function."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def perplexity(model: Callable, tokens: torch.LongTensor, batch_size: int = 8,
               desc: str = "ppl") -> dict:
    """Mean next-token cross-entropy over all ``n * (L - 1)`` predictions, and its exp.

    ``model`` maps input ids ``[b, L]`` to logits ``[b, L, V]``, either directly or as an
    output with ``.logits`` (a Hugging Face causal LM). The loss is summed in float32 over
    every predicted token and divided by their count, so the batch size does not change
    the result.

    Example:
        >>> vocab = 5
        >>> uniform = lambda ids: torch.zeros(*ids.shape, vocab)
        >>> r = perplexity(uniform, torch.randint(0, vocab, (3, 7)))
        >>> round(r["ppl"], 4), r["tokens"]
        (5.0, 18)
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n, L] with L >= 2, got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, leave=False):
            ids = tokens[start:start + batch_size].to(device)
            out = model(ids)
            logits = getattr(out, "logits", out)
            if logits.shape[:2] != ids.shape:
                raise ValueError(f"model returned logits {tuple(logits.shape)} for input "
                                 f"{tuple(ids.shape)}; expected [b, L, V]")
            pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            target = ids[:, 1:].reshape(-1)
            # A float64 running sum keeps the total exact to well past 1e7 tokens.
            total += F.cross_entropy(pred, target, reduction="sum").double().item()
            count += target.numel()
    loss = total / count
    return {"ppl": math.exp(loss), "loss": loss, "tokens": count}


def _device_of(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")
