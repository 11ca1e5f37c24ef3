"""Token-by-token generation with a key/value cache, in PyTorch or onnxruntime.

Both runtimes go through the same loop (`generate`): a decoder's `step(ids)` takes the new
tokens, appends their keys and values to its cache and returns the last position's logits;
`Sampling` picks the next token from them (greedy, or temperature and top-p with a seed).

- `TorchDecoder(model)`: a Hugging Face causal LM (as `sliced_hf` / `to_hf` build) with a
  `DynamicCache`, whose tensors have the key/value heads each layer keeps.
- `OrtDecoder(path)`: an ONNX decoder written by `to_onnx_decoder` (past keys and values in,
  present ones out).
- `RoutedDecoder(em, table, budget)`: dynamic routers, every token at the widths its
  routers choose; with a cache for Llama-style families, GPT-2 and GPT-NeoX (`routed_hf`),
  otherwise by running the whole sequence at each step.

Example:
    >>> model = sliced_hf(em, 0.5)                                    # doctest: +SKIP
    >>> out = generate(TorchDecoder(model), ids, 32, Sampling(greedy=True))  # doctest: +SKIP
    >>> out.tokens, out.tokens_per_s                                  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: the most likely one (`greedy`), or a draw from the
    softmax at `temperature` restricted to the smallest set of tokens whose probability
    reaches `top_p` (nucleus sampling), reproducible through `seed`."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0
                and math.isfinite(self.temperature)):
            raise InputError(f"temperature must be a positive number, got {self.temperature!r}"
                             "; use greedy decoding for the most likely tokens")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[batch, vocab] logits -> [batch, 1] token ids."""
        if self.greedy:
            return logits.argmax(-1, keepdim=True)
        probs = torch.softmax(logits.float() / self.temperature, -1)
        ranked, order = probs.sort(-1, descending=True)
        # keep a token while the mass before it is below top_p (the first one always stays)
        ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= self.top_p, 0.0)
        choice = torch.multinomial(ranked, 1, generator=generator)
        return order.gather(-1, choice)


@dataclass
class Generated:
    """Generated token ids (prompt excluded) and the time spent on them."""

    tokens: torch.Tensor  # [batch, new tokens]
    prefill_s: float  # the prompt's forward pass, giving the first new token
    decode_s: float  # every later step

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, prompt processing included (as users wait for them)."""
        return self.tokens.shape[1] / max(self.prefill_s + self.decode_s, 1e-9)


def generate(decoder, ids: torch.Tensor, max_new_tokens: int,
             sampling: Sampling | None = None, *, eos: int | None = None) -> Generated:
    """Run `decoder` on the prompt `ids` ([batch, seq] token ids) and then once per new
    token, for `max_new_tokens` tokens or until every row has produced `eos`."""
    sampling = sampling or Sampling()
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 1:
        raise InputError(f"the prompt must be a [batch, seq] tensor of token ids with seq >= 1, "
                         f"got {getattr(ids, 'shape', type(ids).__name__)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    generator = torch.Generator().manual_seed(sampling.seed)
    decoder.reset()
    out, done = [], torch.zeros(ids.shape[0], dtype=torch.bool)
    t0 = time.perf_counter()
    nxt = sampling.pick(decoder.step(ids), generator)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        out.append(nxt)
        if eos is not None:
            done |= nxt[:, 0] == eos
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            nxt = sampling.pick(decoder.step(nxt), generator)
    return Generated(torch.cat(out, 1), prefill, time.perf_counter() - t0)


class TorchDecoder:
    """`step` for a Hugging Face causal LM, with a `DynamicCache`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        params = inspect.signature(model.forward).parameters  # newer transformers: `cache`
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache = None

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: self.cache})
        return out.logits[:, -1]


class RoutedDecoder:
    """`step` for an elastic model whose dynamic routers choose each token's widths
    (`inject_routers(em, "dynamic")` or `load_routers(em, run, "dynamic")`) at `budget`, a
    fraction of the full model's cost in the metric of `table`.

    With `cache` (the default) it runs `routed_hf(em)`: the source class with a key/value
    cache, whose blocks ask `em`'s routers for every token's width and run the elastic
    graph's own nodes for it. For families that `routed_hf` cannot run (`why` says why),
    or without `cache`, every step runs the whole sequence again in the elastic graph, and
    generation slows with its length. Both give every token the widths and logits of one
    routed forward of the elastic graph over the sequence (tokens are causal).
    `costs` (one fraction of the full model's cost per generated token, from the routers'
    choices for it and a `CostTable`) says what routing spent.
    """

    def __init__(self, em, table, budget: float, *, cache: bool = True):
        from ..errors import UnsupportedModelError
        from ..passes.inject_routers import routers_of, set_budget
        from .routed_hf import routed_hf

        self.em, self.table, self.budget = em, table, budget
        self.routers = routers_of(em)
        if not self.routers or any(r.kind == "static" for r in self.routers.values()):
            raise InputError("RoutedDecoder needs dynamic routers in the graph; for a static "
                             "budget, generate with the widths `flextron select` chose")
        set_budget(em, budget)
        self.rows = {name: table.tensor(name) for name in self.routers}
        self.cached: TorchDecoder | None = None
        self.why = "cache=False"
        if cache:
            try:
                self.cached = TorchDecoder(routed_hf(em))
            except UnsupportedModelError as exc:
                self.why = str(exc)
        self.ids: torch.Tensor | None = None
        self.costs: list[float] = []

    def reset(self) -> None:
        self.ids, self.costs = None, []
        if self.cached is not None:
            self.cached.reset()

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            logits = self.cached.step(ids)
        else:
            self.ids = ids if self.ids is None else torch.cat([self.ids, ids], 1)
            out = self.em(self.ids)
            logits = getattr(out, "logits", out)[:, -1]
        self.costs.append(self._cost_of_last(ids.shape[0]))
        return logits

    def _cost_of_last(self, batch: int) -> float:
        chosen = {name: r.last_index[:, -1].cpu() if isinstance(r.last_index, torch.Tensor)
                  else r.last_index for name, r in self.routers.items()}
        return token_cost(self.table, self.rows, chosen, batch)


def token_cost(table, rows: dict[str, torch.Tensor], chosen: dict, batch: int) -> float:
    """Mean over the batch of one token's cost as a fraction of the full model: `chosen`
    gives each op's candidate index per row (a [batch] tensor) or for the whole batch (an
    int); `rows` each op's costs as a tensor (`CostTable.tensor`)."""
    total = torch.full((batch,), float(table.fixed))
    for name, index in chosen.items():
        total += rows[name][index]
    return float(total.mean()) / table.full


class OrtRoutedDecoder:
    """`step` for an ONNX decoder of `to_routed_onnx`, whose dynamic routers choose every
    token's widths inside the graph, at `budget` (a fraction of the full model's cost in
    the metric of `table`). `costs` as in `RoutedDecoder`."""

    def __init__(self, path, table, budget: float, threads: int | None = None):
        import json

        from ..route.routers import BudgetSource
        from .routed_onnx import CALIBRATION_KEY, OPS_KEY

        self.decoder = OrtDecoder(path, threads)
        self.table, self.budget = table, budget
        meta = self.decoder.session.get_modelmeta().custom_metadata_map
        if OPS_KEY not in meta:
            raise InputError(f"{path} is no routed decoder (`to_routed_onnx`): its metadata "
                             f"lists no {OPS_KEY}")
        source = BudgetSource()  # the routers' input for the budget, as set_budget gives it
        source.calibration = json.loads(meta[CALIBRATION_KEY]) if CALIBRATION_KEY in meta \
            else None
        self.router_input = source.router_input(float(budget))
        self.ops = json.loads(meta[OPS_KEY])
        if sorted(self.ops) != sorted(table.costs):
            raise InputError(f"the cost table does not fit {path}: it has costs for "
                             f"{len(table.costs)} ops, the decoder routes {len(self.ops)}; use "
                             "the table the routers were trained with")
        self.rows = {name: table.tensor(name) for name in self.ops}
        self.reset()

    def reset(self) -> None:
        self.caches: list[list[np.ndarray]] | None = None  # one cache per sequence
        self.costs = []

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """The file runs one token of one sequence per call, so the rows of a batch (each
        with its own widths and cache) and the tokens of a prompt go in one at a time."""
        if self.caches is None:
            self.caches = [[] for _ in range(ids.shape[0])]
        if len(self.caches) != ids.shape[0]:
            raise InputError(f"this generation has {len(self.caches)} sequences, the step "
                             f"got {ids.shape[0]}; reset() to start another")
        budget = np.array(self.router_input, dtype=np.float32)
        last, chosen = [], []
        for row, cache in enumerate(self.caches):
            self.decoder.cache = cache
            for i in range(ids.shape[1]):
                logits, (widths,) = self.decoder.run(ids[row:row + 1, i:i + 1],
                                                     budget=budget)
            self.caches[row] = self.decoder.cache
            last.append(logits)
            chosen.append(torch.from_numpy(widths))
        index = torch.stack(chosen)  # [batch, ops]
        self.costs.append(token_cost(self.table, self.rows, {
            name: index[:, j] for j, name in enumerate(self.ops)}, len(chosen)))
        return torch.cat(last)


class OrtDecoder:
    """`step` for an ONNX decoder of `to_onnx_decoder`, in onnxruntime on the CPU."""

    def __init__(self, path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.names = [o.name for o in self.session.get_outputs()]
        self.presents = sum(n.startswith("present_") for n in self.names)
        self.cache: list[np.ndarray] = []

    def reset(self) -> None:
        self.cache = []

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run(ids)[0]

    def run(self, ids: torch.Tensor, **extra: np.ndarray) -> tuple[torch.Tensor, list]:
        """(the last position's logits, the outputs after the cache: the routed decoder's
        widths); `extra` feeds the inputs besides the ids and the cache."""
        batch = ids.shape[0]
        if not self.cache:  # no past yet: length 0, heads and head size as exported
            self.cache = [np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32)
                          for i in self.past]
        feed = {"input_ids": ids.numpy().astype(np.int64), **extra}
        feed.update({i.name: c for i, c in zip(self.past, self.cache)})
        logits, *rest = self.session.run(self.names, feed)
        self.cache = rest[:self.presents]
        return torch.from_numpy(logits[:, -1]), rest[self.presents:]


__all__ = ["Generated", "OrtDecoder", "OrtRoutedDecoder", "RoutedDecoder", "Sampling",
           "TorchDecoder", "generate", "token_cost"]
