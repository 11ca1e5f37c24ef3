"""A Hugging Face model whose elastic ops switch between dense variants, one per width.

The profiler and its validation run sub-networks with a key/value cache (decode needs
one; the traced graph has none) and switch between many of them. `LayerwiseModel` builds
the source's own Hugging Face class once at full width (`export.hf.to_hf`, checked against
the graph), then, for every elastic op and candidate width, a dense copy of that op's
module holding the weights the elastic graph slices (`WeightSlice`, so head orders inside
KV groups are the graph's). `set(widths)` swaps modules in place: any per-layer mix of
widths runs as a plain dense model, no masks, nothing re-sliced.

Only models that `to_hf` can rebuild (Llama-style Hugging Face classes) are supported.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..elastic.model import ElasticModel
from ..errors import UnsupportedModelError


class LayerwiseModel:
    """The source Hugging Face model with per-op switchable widths.

    Example:
        >>> rt = LayerwiseModel(em)                                  # doctest: +SKIP
        >>> rt.set({**em.full_widths(), "model.layers.0.mlp#1": 384})  # doctest: +SKIP
        >>> rt.model(input_ids=ids).logits                          # doctest: +SKIP
    """

    def __init__(self, em: ElasticModel, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", check: bool = True):
        from ..export.hf import to_hf

        self.em = em
        with em.at(em.full_widths()):
            try:
                model = to_hf(em, em.full_widths(), check=check)
            except UnsupportedModelError as exc:
                raise UnsupportedModelError(
                    "the profiler runs sub-networks in their source Hugging Face class (for "
                    f"a key/value cache), and this model has none that fits: {exc}. Latency "
                    "tables of plain graphs are not supported yet; CostModel(em).params() and "
                    ".memory() need no table") from exc
            self.model = model.to(device=device, dtype=dtype).eval()
            self.variants: dict[str, dict[int, nn.Module]] = {}
            self._parents: dict[str, tuple[nn.Module, str]] = {}
            slicers = em.weight_slices()
            for name, op in em.ops.items():
                if not op.module:
                    raise UnsupportedModelError(
                        f"elastic op {name} has no module path, so its Hugging Face module "
                        "cannot be found; profile a model converted from a Hugging Face class")
                full_mod = self.model.get_submodule(op.module)
                parent_path, _, leaf = op.module.rpartition(".")
                self._parents[name] = (self.model.get_submodule(parent_path), leaf)
                self.variants[name] = {op.full: full_mod}
                for w in op.candidates:
                    if w != op.full:
                        self.variants[name][w] = self._variant(name, w, full_mod, slicers,
                                                               dtype, device)
        self.widths = em.full_widths()
        if check:
            self._check_random()

    def _variant(self, name, width, full_mod, slicers, dtype, device) -> nn.Module:
        em, op = self.em, self.em.ops[name]
        prefix = em.param_prefix + op.module + "."
        shared = {id(p): p for p in full_mod.parameters()}  # the memo shares, then we replace
        mod = copy.deepcopy(full_mod, memo=dict(shared))
        graph = em.graph_module
        block = em.block(name)
        comp = _compensations(em).get(name)
        for proj in block.projections:
            for path in (proj.weight, proj.bias):
                if path is None:
                    continue
                if not path.startswith(prefix) or path not in slicers:
                    raise UnsupportedModelError(
                        f"the weight {path} of elastic op {name} is not inside its module "
                        f"{op.module}; the profiler needs each op to be one module")
                with torch.no_grad():
                    value = slicers[path](graph.get_parameter(path), width).detach().clone()
                    if comp is not None and proj is block.out_proj:
                        value = _compensated(comp, width, value, path == proj.bias,
                                             proj.axis)
                _set_param(mod, path[len(prefix):],
                           value.to(device=device, dtype=dtype).contiguous())
            row = None if comp is None else comp.row(width)
            if proj is block.out_proj and proj.bias is None and row is not None:
                # no bias in the graph's view of it (or one it adds by addmm, as GPT-2's
                # Conv1D): the module's own bias, if any, plus the row
                path = proj.weight[len(prefix):].removesuffix("weight") + "bias"
                owner_path, _, leaf = path.rpartition(".")
                own = getattr(mod.get_submodule(owner_path) if owner_path else mod, leaf, None)
                value = row.detach().clone() if own is None else \
                    own.detach() + row.detach().to(own.dtype)
                _set_param(mod, path, value.to(device=device, dtype=dtype))
        if op.kind == "attention":
            kv = em.kv_heads(name, width)
            for attr, value in (("num_key_value_groups", width // kv), ("num_heads", width),
                                ("num_attention_heads", width), ("num_key_value_heads", kv)):
                if isinstance(getattr(mod, attr, None), int):
                    setattr(mod, attr, value)
        return mod

    def set(self, widths: dict[str, int]) -> None:
        """Run the ops at these widths from now on (a full {op: width} dict, validated)."""
        widths = self.em.static_widths(widths)
        for name, w in widths.items():
            if self.widths.get(name) != w:
                parent, leaf = self._parents[name]
                setattr(parent, leaf, self.variants[name][w])
        self.widths = widths

    def modules_of(self, name: str) -> dict[int, nn.Module]:
        return self.variants[name]

    def _check_random(self) -> None:
        """The swapped model reproduces the elastic graph at a random per-op mix."""
        g = torch.Generator().manual_seed(0)
        widths = {n: op.candidates[int(torch.randint(len(op.candidates), (1,), generator=g))]
                  for n, op in self.em.ops.items()}
        vocab = min(int(getattr(self.model.config, "vocab_size", 100)), 1000)
        ids = torch.randint(0, vocab, (1, 8), generator=g)
        try:
            self.set(widths)
            device = next(self.model.parameters()).device
            with torch.inference_mode(), self.em.at(widths):
                ref = self.em(ids)
                got = self.model(input_ids=ids.to(device)).logits.float().cpu()
        finally:
            self.set(self.em.full_widths())
        ref = getattr(ref, "logits", ref[0] if isinstance(ref, (tuple, list)) else ref).float()
        err = (ref - got).abs().max().item()
        dtype = next(self.model.parameters()).dtype
        tol = (1e-3 if dtype == torch.float32 else 5e-2) * max(1.0, ref.abs().max().item())
        if err > tol:
            raise UnsupportedModelError(
                f"the per-layer {type(self.model).__name__} does not reproduce the elastic "
                f"model at mixed widths (max logit difference {err:.3g}); its attention "
                "class may keep head counts in attributes the profiler does not know")


def _compensations(em: ElasticModel) -> dict:
    """{op name: its Compensation module} (passes/compensate.py)."""
    from ..passes.compensate import compensation_modules

    return {m.block: m for m in compensation_modules(em.graph_module).values()}


def _compensated(comp, width: int, value: torch.Tensor, is_bias: bool, axis: int):
    """An output projection's sliced weight or bias at `width` with the op's compensation:
    the bias row added, the low-rank correction U_k V_k^T folded into the weight."""
    if width == comp.candidates[-1]:
        return value
    if is_bias:
        return value + comp.row(width).to(value.dtype)
    if not comp.rank:
        return value
    k = comp.candidates.index(width)
    delta = comp.u[k] @ comp.v[k].t()  # [out, kept]
    return value + (delta if axis == 1 else delta.t()).to(value.dtype)


def _set_param(root: nn.Module, path: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
    if isinstance(owner, nn.Linear) and leaf == "weight":
        owner.out_features, owner.in_features = value.shape

def fixed_modules(rt: LayerwiseModel) -> list[tuple[str, nn.Module, str]]:
    """Leaf modules with weights outside every elastic op, with the fixed part they are."""
    op_paths = [op.module for op in rt.em.ops.values()]
    head = rt.model.get_output_embeddings()
    out = []
    for path, mod in rt.model.named_modules():
        if any(path == p or path.startswith(p + ".") for p in op_paths):
            continue
        if next(mod.children(), None) is not None or next(mod.parameters(False), None) is None:
            continue
        part = ("head" if mod is head else "embedding" if isinstance(mod, nn.Embedding)
                else "dense" if isinstance(mod, nn.Linear) else "norms")
        out.append((path, mod, part))
    return out

class Runner:
    """Runs one forward of the current sub-network at one mode and shape, and times it."""

    def __init__(self, rt: LayerwiseModel, clock, mode: str, shape, seed: int = 0):
        self.rt, self.mode, self.clock = rt, mode, clock
        b, n = shape
        device = next(rt.model.parameters()).device
        vocab = int(getattr(rt.model.config, "vocab_size", 100))
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (b, n if mode == "prefill" else 1), generator=g)
        self.ids = self.ids.to(device)
        if mode == "decode":
            self.prompt = torch.randint(0, vocab, (b, n), generator=g).to(device)
            self.pos = torch.full((b, 1), n, dtype=torch.long, device=device)
        self._kv: dict = {}

    def prepare(self, key) -> None:
        """Decode: fill (once per sub-network `key`) the KV cache the timed steps start from."""
        if self.mode == "decode" and key not in self._kv:
            with torch.inference_mode():
                out = self.rt.model(input_ids=self.prompt, use_cache=True)
            cache = out.cache if "cache" in out else out.past_key_values
            self._kv[key] = [(layer.keys, layer.values) for layer in cache.layers]

    def cache(self, key) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Decode: the (keys, values) per layer that `prepare(key)` filled."""
        return self._kv[key]

    def run_parts(self, key=None) -> None:
        """The forward whose module hooks time the parts (here the same as `run`)."""
        self.run(key)

    def run(self, key=None) -> float:
        """One forward (prefill) or one decode step; returns milliseconds."""
        with torch.inference_mode():
            if self.mode == "prefill":
                kwargs = {"input_ids": self.ids}
            else:
                from transformers import DynamicCache

                kwargs = {"input_ids": self.ids, "use_cache": True, "position_ids": self.pos,
                          "cache": DynamicCache(ddp_cache_data=self.cache(key))}
            start = self.clock.mark()
            self.rt.model(**kwargs)
            end = self.clock.mark()
        self.clock.sync()
        return self.clock.ms(start, end)


def decode_unavailable(em: ElasticModel) -> str | None:
    """Why decode cannot be measured for `em` (None: its Hugging Face class looks fit; the
    full check happens when LayerwiseModel is built). Decode needs a key/value cache, and
    the traced graph has none: the profiler runs decode in the source Hugging Face class,
    which it can rebuild for Llama-style classes only."""
    from ..export import hf

    if em.source.get("kind") != "hf":
        return (f"the model came from {em.source.get('kind', 'a plain module')!r}, not a "
                "Hugging Face class, so there is no class with a key/value cache to run")
    try:
        import transformers

        _, fields = hf._config(getattr(transformers, em.source["class"], None), em.source)
    except UnsupportedModelError as exc:
        return str(exc)
    if fields.heads is None:  # GPT-2, GPT-NeoX, OPT: head size = hidden size / heads
        return (f"{em.source['class']}'s attention derives its head size from the hidden "
                "size and head count of its config, so a copy of it cannot run fewer heads")
    return None
