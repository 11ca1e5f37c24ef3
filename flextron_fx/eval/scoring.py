"""Log-likelihood of continuations, batched: the compute behind every downstream task.

``score(model, pairs)`` takes ``(context tokens, continuation tokens)`` pairs, as
lm-evaluation-harness's ``TemplateLM`` encodes them, and returns ``(sum of log-probs,
is greedy)`` per pair, the quantities lm-eval's ``acc``/``acc_norm``/LAMBADA metrics read.
It follows lm-eval's Hugging Face adapter: the model sees ``(context + continuation)[:-1]``
left-truncated to ``max_length`` and is scored on the last ``len(continuation)`` positions,
in float32. Pairs that give the same model input (a shared context with one-token answers,
as in MMLU) share one forward; inputs are sorted by length and padded on the right, which
a causal model cannot see.

For a Hugging Face causal LM, a context prefix shared by many pairs (the few-shot
examples of HellaSwag or of an MMLU subject) is run once and its key/value cache reused
(``prefix_cache=True``); any other model (an elastic or materialized graph, an ONNX
session wrapped as a function) is run on the whole sequence.
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from flextron_fx.eval.perplexity import _device_of

Pair = tuple[Sequence[int], Sequence[int]]


def score(model: Callable, pairs: Sequence[Pair], *, max_length: int = 2048,
          batch_tokens: int = 4096, prefix_cache: bool = True, min_prefix: int = 64,
          progress: bool = True, desc: str = "scoring") -> list[tuple[float, bool]]:
    """``(log p(continuation | context), continuation is the greedy output)`` per pair.

    ``model`` maps ids ``[b, L]`` to logits ``[b, L, V]`` (or an output with ``.logits``).
    ``batch_tokens`` bounds the padded tokens per forward (the logits of a batch are
    ``batch_tokens * V`` floats).

    Example:
        >>> table = torch.log_softmax(torch.randn(5, 5), -1)
        >>> bigram = lambda ids: table[ids]
        >>> ll, greedy = score(bigram, [([1], [2, 3])], progress=False)[0]
        >>> round(ll, 5) == round((table[1, 2] + table[2, 3]).item(), 5)
        True
    """
    for ctx, cont in pairs:
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError("every pair needs at least one context and one continuation token")
    inputs: dict[tuple[int, ...], list[int]] = defaultdict(list)
    # the first position whose logits a key's pairs read: a shared prefix must end before it
    first_read: dict[tuple[int, ...], int] = {}
    for i, (ctx, cont) in enumerate(pairs):
        whole = (list(ctx) + list(cont))[-(max_length + 1):]
        key = tuple(whole[:-1])
        inputs[key].append(i)
        first_read[key] = min(first_read.get(key, len(key)), len(key) - len(cont))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    groups = _prefix_groups(inputs, first_read, min_prefix) \
        if prefix_cache and _is_hf_causal(model) else {(): list(inputs)}
    bar = tqdm(total=len(inputs), desc=desc, disable=not progress, leave=False)
    with torch.inference_mode():
        for prefix, keys in groups.items():
            past = _prefix_cache(model, prefix) if prefix else None
            keys = sorted(keys, key=len, reverse=True)
            start = 0
            while start < len(keys):
                width = len(keys[start]) - len(prefix)
                n = max(1, batch_tokens // max(width, 1))
                batch = keys[start:start + n]
                start += len(batch)
                logp = _log_probs(model, [k[len(prefix):] for k in batch], past)
                for row, key in enumerate(batch):
                    for i in inputs[key]:
                        cont = list(pairs[i][1])
                        end = len(key) - len(prefix)
                        lp = logp[row, end - len(cont):end]
                        target = torch.tensor(cont, device=lp.device)
                        ll = lp.gather(-1, target[:, None]).sum().item()
                        greedy = bool((lp.argmax(-1) == target).all())
                        results[i] = (ll, greedy)
                bar.update(len(batch))
    bar.close()
    return results  # type: ignore[return-value]


def _log_probs(model, seqs: list[tuple[int, ...]], past) -> torch.Tensor:
    """log-softmax of the logits of right-padded ``seqs`` (after ``past``, if given)."""
    longest = max(len(s) for s in seqs)
    device = _device_of(model)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
    ids = ids.to(device)
    if past is None:
        out = model(ids)
    else:
        cache = copy.deepcopy(past)
        cache.batch_repeat_interleave(len(seqs))
        out = model(input_ids=ids, use_cache=True, **{_cache_arg(model): cache})
    logits = getattr(out, "logits", out)
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"model returned logits {tuple(logits.shape)} for input "
                         f"{tuple(ids.shape)}; expected [b, L, V]")
    return torch.log_softmax(logits.float(), dim=-1)


def _prefix_groups(inputs, first_read, min_prefix: int) -> dict[tuple[int, ...], list]:
    """Inputs grouped by a shared leading run of at least ``min_prefix`` tokens.

    Inputs are sorted; each run of neighbours whose common prefix stays >= ``min_prefix``
    forms a group keyed by that prefix, cut to end before the first position any member
    reads logits at (``first_read``; answers that start alike must not fall into the
    cached part). The rest go to the group ``()``.
    """
    keys = sorted(inputs)
    groups: dict[tuple[int, ...], list] = defaultdict(list)
    run: list = []
    common = 0

    def close():
        n = min(common, *(first_read[k] for k in run))
        if len(run) > 1 and n >= min_prefix:
            groups[run[0][:n]].extend(run)
        else:
            groups[()].extend(run)

    for key in keys:
        if run:
            c = _common_len(run[0], key, common if len(run) > 1 else None)
            if c >= min_prefix:
                run.append(key)
                common = c
                continue
            close()
        run, common = [key], len(key)
    if run:
        close()
    return groups


def _common_len(a, b, bound) -> int:
    n = min(len(a), len(b)) if bound is None else min(len(a), len(b), bound)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prefix_cache(model, prefix: tuple[int, ...]):
    ids = torch.tensor([prefix], dtype=torch.long, device=_device_of(model))
    out = model(input_ids=ids, use_cache=True)
    return getattr(out, "cache", None) or out.past_key_values


def _cache_arg(model) -> str:
    """transformers 5 names the cache argument ``cache``; 4.x ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _is_hf_causal(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model, "generate")

