"""Document splits and fixed-length token blocks for calibration and held-out loss."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

log = logging.getLogger(__name__)


def split_documents(docs: Sequence[tuple[str, str]], heldout_fraction: float = 0.2,
                    seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split (title, text) documents into calibration and held-out parts, by document.

    Each title is hashed with the seed, so the split is deterministic, independent of
    document order, and no document lands in both parts. Order within a part follows
    ``docs``.

    Example:
        >>> docs = [(f"doc{i}", "text") for i in range(100)]
        >>> calib, held = split_documents(docs, heldout_fraction=0.2, seed=0)
        >>> len(calib) + len(held), {t for t, _ in calib} & {t for t, _ in held}
        (100, set())
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    from flextron_fx.data.corpus import doc_hash

    calib, held = [], []
    for doc in docs:
        (held if doc_hash(seed, doc[0]) < heldout_fraction else calib).append(doc)
    return calib, held


def token_blocks(tokenizer, texts: Iterable[str], seq_len: int,
                 max_blocks: int | None = None) -> torch.LongTensor:
    """Tokenize ``texts``, join them with the EOS id, cut into ``[n, seq_len]`` blocks.

    Blocks are consecutive and non-overlapping; the incomplete tail is dropped. Only
    ``tokenizer.encode(text, add_special_tokens=False)`` and ``tokenizer.eos_token_id``
    are used. Tokenizing stops once ``max_blocks`` blocks are filled.

    Example:
        >>> class Chars:
        ...     eos_token_id = 0
        ...     def encode(self, text, add_special_tokens=False):
        ...         return [ord(c) for c in text]
        >>> token_blocks(Chars(), ["ab", "cde"], seq_len=3).tolist()
        [[97, 98, 0], [99, 100, 101]]
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id to separate documents")
    need = None if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    for i, text in enumerate(texts):
        if need is not None and len(ids) >= need:
            break
        if i:
            ids.append(eos)
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration_and_heldout(tokenizer, seq_len: int = 256, n_calib: int = 512,
                            n_heldout_tokens: int = 32768, seed: int = 0,
                            cache_dir=None) -> tuple[torch.LongTensor, torch.LongTensor, str]:
    """Calibration and held-out token blocks from disjoint Wikipedia articles.

    The articles are the ``calibration`` and ``validation`` parts of the Wikipedia domain's
    split (:func:`flextron_fx.data.corpus.split_corpus`, the split ``flextron data fetch``
    writes), so neither ever overlaps the ``test`` part that ``flextron eval`` reports.
    Returns ``(calib [<= n_calib, seq_len], heldout [n_heldout_tokens // seq_len, seq_len],
    source)``, where ``source`` says where the text came from. Fewer calibration blocks
    than asked (with a warning) when the calibration articles run out; a ``ValueError``
    when the held-out articles are too short.

    Example:
        >>> calib, held, source = calibration_and_heldout(tok, n_calib=64)  # doctest: +SKIP
        >>> calib.shape, held.shape  # doctest: +SKIP
        (torch.Size([64, 256]), torch.Size([128, 256]))
    """
    from flextron_fx.data.corpus import split_corpus
    from flextron_fx.data.domains import DOMAINS
    from flextron_fx.data.wikipedia import GENSIM_VERSION, wikipedia_articles

    wiki = DOMAINS["wikipedia"]
    parts = split_corpus(wikipedia_articles(cache_dir), wiki.splits, seed=seed,
                         max_chars=wiki.max_chars)
    calib_docs, held_docs = parts["calibration"], parts["validation"]
    n_held = n_heldout_tokens // seq_len
    if n_held < 1:
        raise ValueError(f"n_heldout_tokens={n_heldout_tokens} is less than one block of "
                         f"seq_len={seq_len}")
    heldout = token_blocks(tokenizer, (t for _, t in held_docs), seq_len, max_blocks=n_held)
    if heldout.shape[0] < n_held:
        raise ValueError(
            f"held-out text too short: {len(held_docs)} articles give {heldout.shape[0]} "
            f"blocks of {seq_len} tokens, {n_held} needed; lower n_heldout_tokens or seq_len")
    calib = token_blocks(tokenizer, (t for _, t in calib_docs), seq_len, max_blocks=n_calib)
    if calib.shape[0] < n_calib:
        log.warning("calibration articles exhausted: %d of %d blocks of %d tokens",
                    calib.shape[0], n_calib, seq_len)
    source = (f"enwiki sample in gensim-{GENSIM_VERSION} wheel, {len(calib_docs)} calibration"
              f" / {len(held_docs)} validation articles (seed {seed})")
    return calib, heldout, source


def calibration_mix(tokenizer, domains: Sequence[str], seq_len: int = 256, n_calib: int = 512,
                    cache_dir=None) -> tuple[torch.LongTensor, str]:
    """Calibration blocks drawn in equal shares from the ``calibration`` split of each of
    ``domains`` (fetched with ``flextron data fetch``), interleaved so any prefix of the
    result is a mix too. Returns ``(calib [<= n_calib, seq_len], source)``.

    Example:
        >>> calib, source = calibration_mix(tok, ["wikipedia", "python"], n_calib=64)  # doctest: +SKIP
    """
    from flextron_fx.data.corpus import load_split
    from flextron_fx.data.domains import resolve_domains

    domains = resolve_domains(list(domains))
    if not domains:
        raise ValueError("calibration_mix needs at least one domain")
    share = -(-n_calib // len(domains))
    parts = [token_blocks(tokenizer, (t for _, t in load_split(d, "calibration", cache_dir)),
                          seq_len, max_blocks=share) for d in domains]
    for d, p in zip(domains, parts):
        if p.shape[0] < share:
            log.warning("calibration split of %s gives %d of %d blocks of %d tokens", d,
                        p.shape[0], share, seq_len)
    rows = [p[i] for i in range(max(p.shape[0] for p in parts)) for p in parts
            if i < p.shape[0]][:n_calib]
    if not rows:
        raise ValueError(f"the calibration splits of {domains} hold no block of {seq_len} tokens")
    source = "calibration splits of " + ", ".join(
        f"{d} ({p.shape[0]} blocks)" for d, p in zip(domains, parts))
    return torch.stack(rows), source
