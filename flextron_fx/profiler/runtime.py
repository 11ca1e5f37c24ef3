"""A Hugging Face model whose elastic ops switch between dense variants, one per width.

The profiler and its validation run sub-networks with a key/value cache (decode needs
one; the traced graph has none) and switch between many of them. `LayerwiseModel` builds
the source's own Hugging Face class once at full width (`export.hf.to_hf`, checked against
the graph), then, for every elastic op and candidate width, dense copies of the op's
modules holding the weights the elastic graph slices (`WeightSlice`, so head orders inside
KV groups are the graph's). `set(widths)` swaps modules in place: any per-layer mix of
widths runs as a plain dense model, no masks, nothing re-sliced.

The modules swapped for an op (its "units") are the op's own module, or, where that module
holds another op's (OPT's MLP is its whole decoder layer, attention included), the modules
that own the op's weights (OPT's fc1 and fc2). An attention copy gets the head counts of
its width (`export.sliced.set_head_counts`: GPT-2's fused projection splits by them too).

Models that `to_hf` can rebuild at full width are supported: the Llama family, GPT-2,
GPT-NeoX and OPT. Each is checked at a random per-layer mix of widths when it is built.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..elastic.model import ElasticModel
from ..errors import UnsupportedModelError
from ..export.sliced import set_head_counts, set_parameter


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
            self.units = swap_units(em)
            # variants[op][width] = {unit path: module}
            self.variants: dict[str, dict[int, dict[str, nn.Module]]] = {}
            slicers = em.weight_slices()
            for name, op in em.ops.items():
                full = {path: self.model.get_submodule(path) for path in self.units[name]}
                self.variants[name] = {op.full: full}
                for w in op.candidates:
                    if w != op.full:
                        self.variants[name][w] = {
                            path: self._variant(name, w, path, mod, slicers, dtype, device)
                            for path, mod in full.items()}
        self.widths = em.full_widths()
        if check:
            self._check_random()

    def _variant(self, name, width, unit, full_mod, slicers, dtype, device) -> nn.Module:
        """A copy of the unit module `unit` of op `name` at `width`."""
        em, op = self.em, self.em.ops[name]
        prefix = em.param_prefix + unit + "."
        shared = {id(p): p for p in full_mod.parameters()}  # the memo shares, then we replace
        mod = copy.deepcopy(full_mod, memo=dict(shared))
        graph = em.graph_module
        block = em.block(name)
        comp = _compensations(em).get(name)
        for proj in block.projections:
            for path in (proj.weight, proj.bias):
                if path is None or not path.startswith(prefix):
                    continue  # another unit's (swap_units checked that one holds it)
                if path not in slicers:
                    raise UnsupportedModelError(
                        f"the weight {path} of elastic op {name} is not sliced by the graph; "
                        "the profiler cannot build a dense copy of it")
                with torch.no_grad():
                    value = slicers[path](graph.get_parameter(path), width).detach().clone()
                    if comp is not None and proj is block.out_proj:
                        value = _compensated(comp, width, value, path == proj.bias,
                                             proj.axis)
                set_parameter(mod, path[len(prefix):],
                              value.to(device=device, dtype=dtype).contiguous())
            row = None if comp is None else comp.row(width)
            if proj is block.out_proj and proj.bias is None and row is not None \
                    and proj.weight.startswith(prefix):
                # no bias in the graph's view of it (or one it adds by addmm, as GPT-2's
                # Conv1D): the module's own bias, if any, plus the row
                path = proj.weight[len(prefix):].removesuffix("weight") + "bias"
                owner_path, _, leaf = path.rpartition(".")
                own = getattr(mod.get_submodule(owner_path) if owner_path else mod, leaf, None)
                value = row.detach().clone() if own is None else \
                    own.detach() + row.detach().to(own.dtype)
                set_parameter(mod, path, value.to(device=device, dtype=dtype))
        if op.kind == "attention" and unit == op.module:
            set_head_counts(mod, width, em.kv_heads(name, width), block.sizes["head_dim"])
        return mod

    def set(self, widths: dict[str, int]) -> None:
        """Run the ops at these widths from now on (a full {op: width} dict, validated)."""
        widths = self.em.static_widths(widths)
        for name, w in widths.items():
            if self.widths.get(name) != w:
                for path, mod in self.variants[name][w].items():
                    parent, _, leaf = path.rpartition(".")
                    setattr(self.model.get_submodule(parent), leaf, mod)
        self.widths = widths

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


def swap_units(em: ElasticModel) -> dict[str, list[str]]:
    """{op name: the module paths that `LayerwiseModel` swaps for it}: the op's module, or,
    where that module holds another op's module, the modules owning the op's weights."""
    paths = {name: op.module for name, op in em.ops.items()}
    for name, path in paths.items():
        if not path:
            raise UnsupportedModelError(
                f"elastic op {name} has no module path, so its Hugging Face module cannot be "
                "found; profile a model converted from a Hugging Face class")
    units = {}
    for name, path in paths.items():
        if not any(p.startswith(path + ".") for p in paths.values()):
            units[name] = [path]
            continue
        owners = []
        for proj in em.block(name).projections:
            owner = proj.weight[len(em.param_prefix):].rpartition(".")[0]
            if not owner.startswith(path + ".") or any(
                    owner == p or owner.startswith(p + ".") for p in paths.values()
                    if p != path and p.startswith(path + ".")):
                raise UnsupportedModelError(
                    f"the weight {proj.weight} of elastic op {name} is not in a module of its "
                    f"own inside {path}; the profiler swaps whole modules per op")
            if owner not in owners:
                owners.append(owner)
        units[name] = owners
    return units


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


def fixed_modules(rt: LayerwiseModel) -> list[tuple[str, nn.Module, str]]:
    """Leaf modules with weights outside every elastic op, with the fixed part they are."""
    op_paths = [path for paths in rt.units.values() for path in paths]
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
    which it can rebuild for the classes whose config fields `export.hf` knows."""
    from ..export import hf

    if em.source.get("kind") != "hf":
        return (f"the model came from {em.source.get('kind', 'a plain module')!r}, not a "
                "Hugging Face class, so there is no class with a key/value cache to run")
    try:
        import transformers

        hf._config(getattr(transformers, em.source["class"], None), em.source)
    except UnsupportedModelError as exc:
        return str(exc)
    return None
