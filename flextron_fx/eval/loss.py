"""Language-model loss per text domain: token-weighted loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Callable

from flextron_fx.data.blocks import token_blocks
from flextron_fx.data.corpus import load_split
from flextron_fx.eval.perplexity import perplexity


def domain_tokens(tokenizer, domain: str, split: str = "test", seq_len: int = 512,
                  max_tokens: int | None = 32768, cache_dir=None):
    """``[n, seq_len]`` token blocks of a fetched domain's split, at most ``max_tokens``.

    Documents are joined with EOS in their stored (hash) order and cut into consecutive
    blocks, so the same arguments always give the same tokens.
    """
    docs = load_split(domain, split, cache_dir)
    max_blocks = None if max_tokens is None else max(1, max_tokens // seq_len)
    blocks = token_blocks(tokenizer, (t for _, t in docs), seq_len, max_blocks=max_blocks)
    if blocks.shape[0] == 0:
        raise ValueError(f"{domain}/{split} has fewer than {seq_len} tokens")
    return blocks


def domain_loss(model: Callable, tokenizer, domain: str, *, split: str = "test",
                seq_len: int = 512, max_tokens: int | None = 32768, batch_size: int = 4,
                cache_dir=None, blocks=None) -> dict:
    """Loss of ``model`` on a domain: ``{"loss", "ppl", "bpb", "tokens", "bytes"}``.

    ``loss`` is the mean next-token cross-entropy in nats over every predicted token (as
    :func:`flextron_fx.eval.perplexity`), ``ppl`` its exp, and ``bpb`` the same total in
    bits divided by the UTF-8 bytes of the predicted tokens (each block decoded without
    its first token; special tokens count zero bytes), so tokenizers can be compared.
    Pass ``blocks`` (from :func:`domain_tokens`) to reuse the tokenization.

    Example:
        >>> r = domain_loss(model, tok, "wikipedia", max_tokens=4096)  # doctest: +SKIP
        >>> sorted(r)  # doctest: +SKIP
        ['bpb', 'bytes', 'domain', 'loss', 'ppl', 'split', 'tokens']
    """
    if blocks is None:
        blocks = domain_tokens(tokenizer, domain, split, seq_len, max_tokens, cache_dir)
    r = perplexity(model, blocks, batch_size=batch_size, desc=domain)
    n_bytes = sum(len(tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).encode())
                  for row in blocks)
    bpb = r["loss"] * r["tokens"] / math.log(2) / max(n_bytes, 1)
    return {"domain": domain, "split": split, "loss": r["loss"], "ppl": r["ppl"], "bpb": bpb,
            "tokens": r["tokens"], "bytes": n_bytes}
