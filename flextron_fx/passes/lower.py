"""Lower: replace each elastic MLP region by a call of the custom ops of codegen/ops.py.

    lowered = lower(em, "inductor")                 # any widths, set later with set_widths
    lowered = lower(em, "triton", widths=0.5)       # widths baked in

Requires: `em` is an ElasticModel; its MLPs are `ElasticRegion` nodes (elasticize).
Ensures: a copy of `em` (em itself is not changed) in which every MLP region whose
reference subgraph is a recognised MLP (gate/up -> named activation (x gate multiply) ->
down, prefix slices, optional biases, an optional per-width low-rank correction of the
down weight) is a `LoweredMLP`: the same node, the same parameters, the same `ref` (so
materialize, num_params and routing still work), whose forward calls
`torch.ops.flextron.elastic_mlp` for an int width and `torch.ops.flextron.routed_mlp` for
per-token widths, with `backend`'s kernels. A corrected MLP hands the kernel its width's
corrected down weight, and runs per-token widths as one fixed-width call per group. Each
recognised region is checked numerically against its reference at lowering time; a region
that is not recognised, or does not match, keeps its reference and the log says why.
With `widths`, the copy is set to them and each lowered MLP accepts only its baked width
(another raises WidthError: lower again). Backend "inductor" with `widths` also compiles the
whole specialised sub-network (`em.materialize(widths)`, attention included) with
torch.compile; the copy's forward runs it while its widths are the baked ones. That compiled
sub-network holds sliced copies of the weights, taken at lowering time (like `materialize`):
lower again after changing the weights.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import fx

from ..codegen.mlp import grouped
from ..elastic.compensation import LowRankDelta
from ..elastic.model import ElasticModel, check_call
from ..elastic.ops import ElasticRegion, WeightSlice, check_routed
from ..errors import CodegenError, WidthError

log = logging.getLogger(__name__)

_LINEAR = torch.ops.aten.linear.default
_ADDMM = torch.ops.aten.addmm.default
_MM = {torch.ops.aten.mm.default, torch.ops.aten.matmul.default}
_TRANSPOSES = {torch.ops.aten.t.default, torch.ops.aten.transpose.int,
               torch.ops.aten.permute.default}
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default,
          torch.ops.aten._unsafe_view.default}
# GPT-2's "new GELU" written out: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
_GELU_TANH_OPS = ["add", "add", "mul", "mul", "mul", "mul", "pow", "tanh"]


@dataclass(frozen=True)
class MLPSpec:
    """Where each canonical operand of an MLP region comes from.

    Each entry is (parameter position after x and width, transposed?) or None.
    Canonical: gate/up [F, D], down [D, F], biases [F], [F], [D].
    """

    act: str
    gate: tuple[int, bool] | None
    up: tuple[int, bool]
    down: tuple[int, bool]
    b_gate: int | None
    b_up: int | None
    b_down: int | None
    # the down weight's low-rank compensation: the LowRankDelta's name in the region's
    # reference and the positions of its factors (u0, v0, u1, v1, ...), or None
    delta: str | None = None
    factors: tuple[int, ...] = ()

    def operands(self, params, width: int | None = None, region=None) -> list:
        """The canonical operands; with a `delta`, `width` and the `region`, the down
        weight is that width's corrected [D, width] weight (full buffers otherwise)."""
        def w(entry):
            if entry is None:
                return None
            p = params[entry[0]]
            return p.t() if entry[1] else p
        b = lambda i: None if i is None else params[i]
        down = w(self.down)
        if self.delta is not None and width is not None:
            stored, transposed = params[self.down[0]], self.down[1]
            kept = stored.narrow(0 if transposed else 1, 0, width)
            fixed = region.ref.get_submodule(self.delta)(
                kept, width, *(params[i] for i in self.factors))
            down = fixed.t() if transposed else fixed
        return [w(self.gate), w(self.up), down, b(self.b_gate), b(self.b_up),
                b(self.b_down)]


class LoweredModel(ElasticModel):
    """An ElasticModel whose MLPs are lowered (made by `lower`, which sets the fields)."""

    def forward(self, *inputs):
        net = self.__dict__.get("_subnetwork")  # not a submodule: its weights are copies
        if net is not None and not torch.compiler.is_compiling():
            baked = self.__dict__["_baked_widths"]
            now = self.widths
            if all(isinstance(now[n], int) and now[n] == w for n, w in baked.items()):
                check_call(inputs, self.sample_shape)
                return net(*inputs)
        return super().forward(*inputs)

    def __getstate__(self):  # compiled code is not copied or pickled; lower again for it
        return {**super().__getstate__(), "_subnetwork": None}


class LoweredMLP(ElasticRegion):
    """An MLP region whose forward runs a lowered kernel; `ref` stays the reference."""

    def __init__(self, region: ElasticRegion, spec: MLPSpec, backend: str,
                 baked: int | None = None):
        super().__init__(region.kind, region.block, region.ref, region.candidates,
                         region.rule, in_layout=region.in_layout, groups=region.groups,
                         pattern=region.pattern)
        self.spec, self.backend, self.baked = spec, backend, baked

    def extra_repr(self) -> str:
        baked = "" if self.baked is None else f", width={self.baked}"
        return f"{super().extra_repr()}, lowered={self.backend}{baked}"

    def forward(self, x: torch.Tensor, width, *params):
        from ..codegen import ops  # registers the custom ops

        spec = self.spec
        if isinstance(width, torch.Tensor):
            if self.baked is not None:
                raise WidthError(f"{self.block} was lowered for width {self.baked}; lower "
                                 "again without widths= to run per-token widths")
            if not torch.compiler.is_compiling():
                check_routed(width, x, self.candidates, self.block)
            if spec.delta is None:  # nested weights: one routed call over all groups
                return ops.routed_mlp(x, width, *spec.operands(params),
                                      list(self.candidates), spec.act, self.backend)
            # each width corrects its own down weight: one fixed-width call per group
            return grouped(x, width, self.candidates, lambda w, part: ops.elastic_mlp(
                part, *spec.operands(params, w, self), w, spec.act, self.backend))
        if self.baked is not None and width != self.baked:
            raise WidthError(f"{self.block} was lowered for width {self.baked}, got {width}; "
                             "lower again with the new widths (or without widths=)")
        width = int(width)
        return ops.elastic_mlp(x, *spec.operands(params, width, self), width, spec.act,
                               self.backend)


def lower(em, backend: str, widths=None):
    """A copy of `em` whose MLPs run `backend`'s kernels (see the module doc).

    Example:
        >>> lowered = lower(em, "torch", widths=0.5)   # doctest: +SKIP
        >>> lowered(ids)                               # doctest: +SKIP
    """
    from ..codegen.ops import BACKENDS

    if backend not in BACKENDS:
        raise CodegenError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    chosen = em.resolve(widths) if widths is not None else None
    out = _share(em)
    if chosen is not None:
        out.set_widths(chosen)
    gm = out.graph_module
    for node in gm.graph.nodes:
        region = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(region, ElasticRegion) or region.kind != "mlp":
            continue
        spec = match_mlp(region)
        if isinstance(spec, str):
            log.info("%s keeps its reference (not lowered): %s", region.block, spec)
            continue
        params = [_param(gm, a) for a in node.args[2:]]
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        why = _verify(region, spec, params, 3 if val is None else val.dim())
        if why:
            log.warning("%s keeps its reference (not lowered): %s", region.block, why)
            continue
        width = None if chosen is None else chosen[region.block]
        baked = width if isinstance(width, int) else None
        gm.add_submodule(node.target, LoweredMLP(region, spec, backend, baked))
    out.__class__ = LoweredModel
    out.__dict__["_subnetwork"] = None
    if backend == "inductor" and chosen is not None and \
            all(isinstance(w, int) for w in chosen.values()):
        out.__dict__["_baked_widths"] = dict(chosen)
        out.__dict__["_subnetwork"] = torch.compile(em.materialize(chosen), backend="inductor")
    return out


def _share(em):
    """A copy of `em` that shares its graph, parameters and slices but has its own width
    nodes and regions (so lowering and set_widths on it leave `em` alone)."""
    from ..elastic.ops import WidthSource

    gm = copy.copy(em.graph_module)  # same generated class, same graph, same forward
    em.graph_module.graph.owning_module = em.graph_module  # copying took the graph over
    gm._modules = dict(gm._modules)
    for name, mod in list(gm._modules.items()):
        if isinstance(mod, (WidthSource, ElasticRegion)):
            gm._modules[name] = copy.copy(mod)
    out = copy.copy(em)
    out._modules = dict(em._modules)
    out.graph_module = gm
    out._programs, out._programs_of, out._last_key, out._width_targets = {}, None, None, []
    return out


def _param(gm: fx.GraphModule, node) -> torch.Tensor:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise CodegenError(f"an MLP region reads {node} where a parameter was expected")
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def match_mlp(region: ElasticRegion) -> MLPSpec | str:
    """The MLPSpec of a region's reference graph, or why it is not a plain MLP."""
    pattern = region.pattern
    act = pattern.get("activation")
    if act == "composite" and sorted(pattern.get("pointwise", [])) == _GELU_TANH_OPS \
            and not pattern.get("gated"):
        act = "gelu_tanh"  # confirmed (or refuted) numerically by _verify
    from ..codegen.mlp import ACTIVATIONS

    if act not in ACTIVATIONS:
        return f"activation {act!r} has no fused kernel ({list(ACTIVATIONS)})"
    graph = region.ref.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    x, params = placeholders[0], placeholders[2:]
    position = {p: i for i, p in enumerate(params)}
    weights, biases = {}, {}  # matmul node -> (param position, transposed), bias position
    corrected = {}  # matmul node -> the LowRankDelta node its weight goes through
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is _LINEAR:
            w, b, transposed = n.args[1], (n.args[2] if len(n.args) > 2 else None), False
        elif n.target is _ADDMM:
            w, b, transposed = n.args[2], n.args[0], True
        elif n.target in _MM:
            w, b, transposed = n.args[1], None, True
        else:
            continue
        if isinstance(w, fx.Node) and w.op == "call_function" and w.target in _TRANSPOSES:
            w, transposed = w.args[0], not transposed
        if isinstance(w, fx.Node) and w.op == "call_module" and isinstance(
                region.ref.get_submodule(w.target), LowRankDelta):
            corrected[n] = w
            w = w.args[0]
        src = _source(region, w, position)
        if isinstance(src, str):
            return src
        weights[n] = (src, transposed)
        if b is not None:
            bsrc = _source(region, b, position)
            if isinstance(bsrc, str):
                return bsrc
            biases[n] = bsrc
    if len(weights) not in (2, 3):
        return f"{len(weights)} matrix products (an MLP has 2 or 3)"
    reads_x = [n for n in weights if _from(n.args[1] if n.target is _ADDMM else n.args[0], x)]
    outs = [n for n in weights if n not in reads_x]
    if len(outs) != 1 or len(reads_x) != len(weights) - 1:
        return "its products are not input projections on x and one output projection"
    down = outs[0]
    if set(corrected) - {down}:
        return "a low-rank compensation on an input projection"
    delta, factors = corrected.get(down), ()
    if delta is not None:
        if delta.args[1] is not placeholders[1]:
            return "its low-rank compensation does not read the block's width"
        factors = tuple(position.get(f) for f in delta.args[2:])
        if None in factors:
            return "its low-rank compensation's factors are not region inputs"
    gated = len(reads_x) == 2
    if gated != bool(pattern.get("gated")):
        return "its projection count does not match its gating"
    if gated:
        up = next((n for n in reads_x if _feeds_mul(n)), None)
        gate = next((n for n in reads_x if n is not up), None)
        if up is None or gate is None or _feeds_mul(gate):
            return "cannot tell the gate projection from the up projection"
    else:
        up, gate = reads_x[0], None
    return MLPSpec(act=act, gate=None if gate is None else weights[gate], up=weights[up],
                   down=weights[down],
                   b_gate=biases.get(gate), b_up=biases.get(up), b_down=biases.get(down),
                   delta=None if delta is None else delta.target, factors=factors)


def _source(region: ElasticRegion, node, position: dict) -> int | str:
    """The parameter a weight or bias input comes from (through its prefix WeightSlice)."""
    if isinstance(node, fx.Node) and node in position:
        return position[node]
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return f"a weight input {node} is not a parameter or its slice"
    mod = region.ref.get_submodule(node.target)
    if not isinstance(mod, WeightSlice) or node.args[0] not in position:
        return f"a weight input {node.format_node()} is not a parameter or its slice"
    for c in region.candidates:
        if not (mod.plan(c) is None or isinstance(mod.plan(c), int)):
            return f"{node.target} keeps a gathered (non-prefix) set at width {c}"
    return position[node.args[0]]


def _from(node, x: fx.Node) -> bool:
    """Whether `node` is x, through views only."""
    while isinstance(node, fx.Node) and node is not x and node.op == "call_function" \
            and node.target in _VIEWS:
        node = node.args[0]
    return node is x


def _feeds_mul(node: fx.Node) -> bool:
    """Whether `node` goes (through views) straight into the gate multiply."""
    for u in node.users:
        if u.target in _VIEWS and _feeds_mul(u):
            return True
        if u.target == torch.ops.aten.mul.Tensor and all(
                isinstance(a, fx.Node) for a in u.args):
            return True
    return False


def _verify(region: ElasticRegion, spec: MLPSpec, params: list, rank: int) -> str | None:
    """None if the spec's kernel equals the region's reference at the smallest and full
    widths on a few random tokens (so a misread pattern is caught, never run)."""
    from ..codegen.mlp import elastic_mlp_ref

    p0 = params[spec.up[0]]
    d_in = p0.shape[1] if not spec.up[1] else p0.shape[0]
    gen = torch.Generator().manual_seed(0)
    lead = [1] * (rank - 2)
    x = torch.randn(*lead, 3, d_in, generator=gen).to(device=p0.device, dtype=p0.dtype)
    with torch.no_grad():
        for width in (region.candidates[0], region.candidates[-1]):
            expected = region._static(width)(region.ref, x, width, *params)
            got = elastic_mlp_ref(x, width, *spec.operands(params, width, region), spec.act)
            if got.shape != expected.shape:
                return f"lowered output shape {tuple(got.shape)} != {tuple(expected.shape)}"
            scale = float(expected.abs().max()) + 1e-6
            if float((got - expected).abs().max()) > 1e-3 * scale:
                return f"the lowered MLP differs from the reference at width {width}"
    return None


__all__ = ["LoweredMLP", "LoweredModel", "MLPSpec", "lower", "match_mlp"]
