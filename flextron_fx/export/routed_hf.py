"""A Hugging Face model whose blocks run at the widths dynamic routers choose per token,
with a key/value cache.

`routed_hf(em)` builds the source class at full width on `em`'s own weights (`full_hf`)
and replaces each elastic block's module with one that asks the block's router (from
`em`'s graph) for
every token's width and then runs the elastic graph's own nodes for it: the MLP region
(`elastic_mlp(x, width)`), the attention output region and any compensation node. So a
token's output is what the routed elastic graph computes for it (DESIGN.md, routed
attention), token by token with a cache instead of the whole sequence at every step:

- MLP: each token on the weight prefix of its width (tokens grouped by width).
- Attention: queries for the heads of the widest width among the new tokens; keys and
  values for every head, kept in the cache, because a later token may use heads that an
  earlier one did not; each query head attends over its key/value head; each token's
  output projection reads only its own heads' columns.

This needs an attention module with a layer index and either separate q/k/v projections
(Llama, Mistral, Qwen2, Qwen3, Gemma, ...) or a fused one (GPT-2's `c_attn`: queries,
then keys, then values; GPT-NeoX's `query_key_value`: per head its query, key and value;
`fused_layout`), with the rotary embeddings, partial or whole, that the model hands it
(GPT-2: none), and each MLP in a module of its own or laid out as OPT's (`fc1`,
`activation_fn`, `fc2` of the decoder layer: `fc1` runs the routed MLP). The model is
checked against the routed elastic graph on a short input; any other family (Phi-3's
fused `qkv_proj`, Gemma 2's capped logits, ...) raises `UnsupportedModelError`, and
generation falls back to recomputing the sequence in the elastic graph (`RoutedDecoder`).
"""

from __future__ import annotations

import sys
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import nn

from ..elastic.compensation import Compensation
from ..elastic.model import ElasticModel
from ..elastic.ops import ElasticRegion
from ..errors import UnsupportedModelError


class _Elastic(nn.Module):
    """What a block takes from the elastic graph: its router, the region that consumes the
    width (with the parameters the graph gives it) and its compensation node, if any."""

    def __init__(self, em: ElasticModel, name: str, router, budget):
        super().__init__()
        gm = em.graph_module
        node = next(n for n in gm.graph.nodes if n.op == "call_module"
                    and n.target.startswith("flextron_router_")
                    and n.meta.get("flextron_block") == name)
        users = [u for u in node.users if u.op == "call_module"]
        regions = [u for u in users if isinstance(gm.get_submodule(u.target), ElasticRegion)]
        if len(regions) != 1:
            raise UnsupportedModelError(f"{name} has no single token-wise node to route")
        region = regions[0]
        seen = region.args[0].meta.get("val")  # GPT-2's Conv1D: the graph flattens tokens
        self.flat = seen is not None and seen.dim() == 2
        self.router, self.budget = router, budget
        self.region = gm.get_submodule(region.target)
        self.params = [attrgetter(a.target)(gm) for a in region.args[2:]]
        comp = [u for u in region.users if u.op == "call_module"
                and isinstance(gm.get_submodule(u.target), Compensation)]
        self.comp = gm.get_submodule(comp[0].target) if comp else None

    def width(self, h: torch.Tensor):
        """Each token's candidate index ([batch, seq]), or one width for all of them."""
        return self.router(self.budget(), h, h[..., 0])

    def output(self, x: torch.Tensor, width) -> torch.Tensor:
        shape = x.shape
        if self.flat:  # the region takes [tokens, features], as in the graph
            x = x.reshape(-1, shape[-1])
        y = self.region(x, width, *self.params)
        y = y if self.comp is None else self.comp(y, width)
        return y.reshape(*shape[:-1], y.shape[-1])


class RoutedMLP(nn.Module):
    """An MLP module of the source class, run by the graph's `elastic_mlp` region. Given
    tokens already flattened ([tokens, features], OPT), `shape` is the [batch, seq, ...]
    shape they came from (set by a hook on the module that flattened them)."""

    def __init__(self, elastic: _Elastic):
        super().__init__()
        self.elastic = elastic
        self.shape: torch.Size | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = hidden_states
        if h.dim() == 2 and self.shape is not None:
            h = h.reshape(*self.shape[:-1], h.shape[-1])
        return self.elastic.output(h, self.elastic.width(h)).reshape(
            *hidden_states.shape[:-1], -1)


class RoutedAttention(nn.Module):
    """An attention module of the source class with per-token query heads (module
    docstring); keeps the source module's q/k/v projections, norms and rotary code."""

    def __init__(self, attn: nn.Module, elastic: _Elastic, q_slice, heads: int, kv_heads: int,
                 head_dim: int):
        super().__init__()
        self.attn, self.elastic, self.q_slice = attn, elastic, q_slice
        self.head_dim, self.per_kv = head_dim, heads // kv_heads
        self.layer_idx = attn.layer_idx
        self.fused = fused_layout(attn)
        self.rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        self._queries: dict[tuple, tuple] = {}

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The query projection's (or the fused projection's) weight [out, in] and bias."""
        if self.fused == "blocks":
            return self.attn.c_attn.weight.t(), self.attn.c_attn.bias
        if self.fused == "heads":
            return self.attn.query_key_value.weight, self.attn.query_key_value.bias
        return self.attn.q_proj.weight, self.attn.q_proj.bias

    def _rows(self, part: int, heads: torch.Tensor, model: int) -> torch.Tensor:
        """Rows of the fused projection that give part `part` (0 queries, 1 keys, 2 values)
        of `heads`; `model` = heads x head size."""
        hd = self.head_dim
        first = (part * model + heads * hd if self.fused == "blocks"
                 else heads * 3 * hd + part * hd)
        return (first[:, None] + torch.arange(hd)).reshape(-1)

    def _query(self, span: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(weight and bias rows of the query heads kept at `span`, n: they read the first n
        key/value heads in turn, as SDPA's grouped attention does; fused: followed by the
        key rows and value rows of every head). Gathered rows are kept until the weights
        change in place."""
        weight, bias = self._weights()
        key = (span, weight._version, None if bias is None else bias._version)
        if key not in self._queries:
            hd = self.head_dim
            if self.fused:  # the plan keeps queries, keys and values of the kept heads
                model = weight.shape[0] // 3
                rows = plan_indices(self.q_slice.plan(span), 3 * model)
                part, head = ((rows // model, rows % model // hd) if self.fused == "blocks"
                              else (rows % (3 * hd) // hd, rows // (3 * hd)))
                kept = head[part == 0].unique_consecutive()
            else:
                rows = plan_indices(self.q_slice.plan(span), weight.shape[0])
                kept = rows.reshape(-1, hd)[:, 0] // hd
            kv_of = kept // self.per_kv
            n = int(kv_of.max()) + 1  # a prefix of n key/value heads, each read by as many
            if len(kv_of) % n or not torch.equal(  # query heads in a row: SDPA's GQA
                    kv_of, torch.arange(n).repeat_interleave(len(kv_of) // n)):
                raise UnsupportedModelError(
                    f"{self.elastic.region.block}: the query heads kept at {span} do not read "
                    "a prefix of key/value heads in turn")
            if self.fused:
                every = torch.arange(model // hd)
                rows = torch.cat([self._rows(0, kept, model), self._rows(1, every, model),
                                  self._rows(2, every, model)])
            rows = rows.to(weight.device)
            self._queries = {k: v for k, v in self._queries.items() if k[0] != span}
            self._queries[key] = (weight.index_select(0, rows),
                                  None if bias is None else bias.index_select(0, rows), n)
        return self._queries[key]

    def project(self, hidden_states: torch.Tensor, weight: torch.Tensor, bias, position_embeddings,
                cache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(queries from the rows `weight` and `bias` of `_query`, keys, values of every
        head), each [batch, heads, seq, head size], normed and rotated as the source module
        does; keys and values appended to `cache` (every head's: later tokens may need
        them) and returned with the past ones."""
        attn, (b, s), hd = self.attn, hidden_states.shape[:2], self.head_dim
        if self.fused:  # one product: the kept query heads, then every key and value head
            out = F.linear(hidden_states, weight, bias)
            e = self._weights()[0].shape[0] // 3  # keys (and values) of every head
            q, k, v = (t.reshape(b, s, -1, hd)
                       for t in out.split([out.shape[-1] - 2 * e, e, e], -1))
        else:
            q = F.linear(hidden_states, weight, bias).view(b, s, -1, hd)
            k = attn.k_proj(hidden_states).view(b, s, -1, hd)
            v = attn.v_proj(hidden_states).view(b, s, -1, hd)
        if hasattr(attn, "q_norm"):  # Qwen3, Gemma 3: a norm over each head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if position_embeddings is not None:  # rotary (GPT-2: positions added to the input)
            if self.rotary is None:
                raise UnsupportedModelError(f"{type(attn).__name__} gets position embeddings "
                                            "but its module has no apply_rotary_pos_emb")
            cos, sin = position_embeddings
            q, k = self.rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return q, k, v

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                attention_mask=None, cache=None, past_key_values=None, layer_past=None,
                **kwargs):
        attn, (b, s) = self.attn, hidden_states.shape[:2]
        cache = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        width = self.elastic.width(hidden_states)
        span = (self.elastic.region.candidates[int(width.max())]
                if isinstance(width, torch.Tensor) else width)
        weight, bias, kv_heads = self._query(span)
        q, k, v = self.project(hidden_states, weight, bias, position_embeddings, cache)
        k, v = k[:, :kv_heads], v[:, :kv_heads]  # each read by query heads in turn
        mask, causal = None, False
        if isinstance(attention_mask, torch.Tensor):
            mask = attention_mask[..., : k.shape[-2]]
        elif s > 1:
            causal = s == k.shape[-2]
            if not causal:  # new tokens after cached ones
                past = k.shape[-2] - s
                mask = (torch.arange(k.shape[-2], device=q.device)[None, :]
                        <= past + torch.arange(s, device=q.device)[:, None])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             scale=attn.scaling, enable_gqa=True)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.elastic.output(out, width), None


def fused_layout(attn: nn.Module) -> str | None:
    """How an attention module fuses its q/k/v projection: "blocks" (GPT-2's `c_attn`:
    all queries, then all keys, then all values), "heads" (GPT-NeoX's `query_key_value`:
    per head its query, key and value), None (separate projections, or unknown)."""
    if hasattr(attn, "q_proj"):
        return None
    if isinstance(getattr(attn, "split_size", None), int) and hasattr(attn, "c_attn"):
        return "blocks"
    if isinstance(getattr(attn, "query_key_value", None), nn.Linear):
        return "heads"
    return None


def plan_indices(plan, full: int) -> torch.Tensor:
    """The indices a `WeightSlice` plan keeps along an axis of length `full`."""
    if plan is None:
        return torch.arange(full)
    return torch.arange(plan) if isinstance(plan, int) else plan


def routed_hf(em: ElasticModel, *, check: bool = True) -> nn.Module:
    """`em`'s source class with every elastic block run at the widths `em`'s dynamic routers
    choose per token, at the budget `set_budget(em, T)` gives them; generate with a
    `DynamicCache` (`TorchDecoder`). The blocks share `em`'s routers and weights.

    Raises `UnsupportedModelError` for a family whose attention this cannot run (see the
    module docstring) and `WidthError` without dynamic routers.

    Example:
        >>> load_routers(em, "runs/routers", "dynamic"); set_budget(em, 0.6)  # doctest: +SKIP
        >>> out = generate(TorchDecoder(routed_hf(em)), ids, 32)              # doctest: +SKIP
    """
    from ..errors import WidthError
    from ..passes.inject_routers import budget_source, routers_of
    from .sliced import full_hf

    routers = routers_of(em)
    if not routers or any(r.kind == "static" for r in routers.values()):
        raise WidthError("routed_hf needs dynamic routers in the graph; a static budget is "
                         "one set of widths (sliced_hf)")
    model = full_hf(em)
    config = model.config
    if getattr(config, "attn_logit_softcapping", None):
        raise UnsupportedModelError(f"{type(model).__name__} caps attention logits, which "
                                    "per-token heads with a cache do not do")
    budget, slices = budget_source(em), em.weight_slices()
    for name, op in em.ops.items():
        block, elastic = em.block(name), _Elastic(em, name, routers[name], budget)
        parent, _, leaf = block.module_path.rpartition(".")
        module = model.get_submodule(block.module_path)
        if op.kind == "mlp":
            inner = [o.name for o in em.ops.values()
                     if em.block(o.name).module_path.startswith(block.module_path + ".")]
            if inner:  # OPT: the MLP's projections are the decoder layer's own
                _route_mlp_in_layer(module, elastic, name, inner[0])
                continue
            new = RoutedMLP(elastic)
        else:
            separate = all(isinstance(getattr(module, p, None), nn.Linear)
                           for p in ("q_proj", "k_proj", "v_proj"))
            fused = fused_layout(module)
            q = f"{em.param_prefix}{block.module_path}." + {
                "blocks": "c_attn", "heads": "query_key_value", None: "q_proj"}[fused] + \
                ".weight"
            if not ((separate or fused) and hasattr(module, "layer_idx")
                    and hasattr(module, "scaling") and q in slices):
                raise UnsupportedModelError(
                    f"{type(module).__name__} is no attention with q/k/v projections (separate, "
                    "or fused as GPT-2's or GPT-NeoX's) and a layer index; per-token heads "
                    "with a cache support Llama-style ones, GPT-2's and GPT-NeoX's")
            new = RoutedAttention(module, elastic, slices[q], block.sizes["heads"],
                                  block.sizes.get("kv_heads", block.sizes["heads"]),
                                  block.sizes["head_dim"])
        setattr(model.get_submodule(parent), leaf, new)
    model.eval()
    if check:
        try:
            _check_routed(em, model)
        except RuntimeError as exc:  # e.g. partial rotary embeddings (StableLM, Phi)
            raise UnsupportedModelError(
                f"{type(model).__name__} does not run with per-token heads and a cache "
                f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    return model


def _route_mlp_in_layer(layer: nn.Module, elastic: _Elastic, name: str, other: str) -> None:
    """An MLP whose projections and activation are attributes of a module that holds
    another block too (OPT's decoder layer: `fc1`, `activation_fn`, `fc2`): `fc1` runs the
    whole routed MLP, the activation and `fc2` pass its output on."""
    if not (isinstance(getattr(layer, "fc1", None), nn.Linear)
            and isinstance(getattr(layer, "fc2", None), nn.Linear)
            and isinstance(getattr(layer, "activation_fn", None), nn.Module)):
        raise UnsupportedModelError(
            f"{name}'s module {type(layer).__name__} holds {other} too, and its MLP is not "
            "fc1 -> activation_fn -> fc2 as OPT's; per-token MLP widths with a cache need "
            "each MLP in a module of its own, or OPT's layout")
    mlp = RoutedMLP(elastic)
    layer.fc1, layer.activation_fn, layer.fc2 = mlp, nn.Identity(), nn.Identity()

    def remember_shape(_, args, kwargs):  # the layer flattens its tokens before fc1
        mlp.shape = (args[0] if args else kwargs["hidden_states"]).shape

    layer.register_forward_pre_hook(remember_shape, with_kwargs=True)


def _check_routed(em: ElasticModel, model: nn.Module, tokens: int = 12) -> None:
    """The routed model, given half of a short input and then one token at a time through
    its cache, gives the logits of the routed elastic graph on the whole input."""
    from .generate import TorchDecoder

    vocab = min(int(getattr(model.config, "vocab_size", 100)), 1000)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    half = tokens // 2
    with torch.inference_mode():
        ref = em(ids)
        ref = getattr(ref, "logits", ref[0] if isinstance(ref, (tuple, list)) else ref)
        decoder = TorchDecoder(model)
        decoder.reset()
        got = [decoder.step(ids[:, :half])]
        got += [decoder.step(ids[:, i:i + 1]) for i in range(half, tokens - 1)]
    got, ref = torch.stack(got, 1), ref[:, half - 1:tokens - 1]
    err = (ref.float() - got.float()).abs().max().item()
    if err > 1e-3 * max(1.0, ref.abs().max().item()):
        raise UnsupportedModelError(
            f"{type(model).__name__} with per-token widths and a cache does not reproduce the "
            f"routed elastic graph (max logit difference {err:.3g})")


__all__ = ["RoutedAttention", "RoutedMLP", "plan_indices", "routed_hf"]
