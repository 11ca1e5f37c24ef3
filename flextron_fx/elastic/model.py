"""ElasticModel: a flextronized graph plus its blocks, candidate widths and current widths."""

from __future__ import annotations

import copy
import numbers
import warnings
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import fx, nn

from ..analyze import Block
from ..config import FlextronConfig
from ..errors import InputError, WidthError
from . import layout as L
from .ops import WeightSlice, WidthState


@dataclass(frozen=True)
class ElasticOp:
    """One elastic block as users see it: its name, kind, full width and candidates.

    Widths count MLP neurons or attention query heads.
    """

    name: str
    kind: str
    module: str
    full: int
    candidates: tuple[int, ...]
    sizes: dict


def mlp_candidates(hidden: int, k: int, multiple: int) -> tuple[int, ...]:
    """K nested MLP widths, rounded to a multiple that still leaves K distinct values."""
    step = max(1, min(multiple, hidden))
    while step > 1 and hidden // step < k:
        step //= 2
    out = {hidden}
    for i in range(1, k):
        out.add(min(hidden, max(step, round(hidden * i / k / step) * step)))
    return tuple(sorted(out))


def head_candidates(axis: int, k: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, round(axis * i / k)) for i in range(1, k + 1)}))


class ElasticModel(nn.Module):
    """A model whose MLP and attention blocks run at any of their candidate widths.

    Example:
        >>> em.set_widths(0.5)                        # doctest: +SKIP
        >>> em.set_widths({"model.layers.0.mlp#1": 768})  # doctest: +SKIP
        >>> dense = em.materialize()                  # doctest: +SKIP
    """

    def __init__(self, graph_module: fx.GraphModule, blocks: list[Block], state: WidthState,
                 config: FlextronConfig, *, source: dict | None = None,
                 sample_shape: tuple[int, ...] = (2, 8), param_prefix: str = ""):
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.source = source or {"kind": "module"}
        self.sample_shape = tuple(sample_shape)
        self.param_prefix = param_prefix
        self._state = state
        self._blocks = {b.name: b for b in blocks}
        self.ops: dict[str, ElasticOp] = {}
        for b in blocks:
            cands = (mlp_candidates(b.full_width, config.num_candidates, config.mlp_multiple)
                     if b.kind == "mlp" else self._head_candidates(b))
            self.ops[b.name] = ElasticOp(b.name, b.kind, b.module_path, b.full_width, cands,
                                         dict(b.sizes))
        self._widths = {name: op.full for name, op in self.ops.items()}
        self.skipped: list = []  # blocks left dense, with reasons (analyze.Skipped)
        self.orders: dict = {}  # block -> axis -> stored order of original indices

    # ---- widths ------------------------------------------------------------------------
    def _head_axis(self, b: Block) -> tuple[str, int, int]:
        """(class key that varies, its size, heads per unit of it) under the head mode."""
        g, r = b.classes.get("groups"), b.classes.get("per_group")
        G = b.sizes["kv_heads"] if g is not None else 1
        R = b.sizes["heads"] // G
        if self.config.head_mode == "query":
            return ("per_group", R, G) if r is not None and R > 1 else ("groups", G, R)
        return ("groups", G, R) if g is not None and G > 1 else ("per_group", R, G)

    def _head_candidates(self, b: Block) -> tuple[int, ...]:
        _, size, unit = self._head_axis(b)
        return tuple(c * unit for c in head_candidates(size, self.config.num_candidates))

    @property
    def widths(self) -> dict[str, int]:
        return dict(self._widths)

    def full_widths(self) -> dict[str, int]:
        return {name: op.full for name, op in self.ops.items()}

    def set_full(self) -> None:
        self.set_widths(1.0)

    def set_widths(self, widths, *, kind: str | None = None) -> None:
        """Choose the sub-network: a fraction for every op, {op: width}, or a list in op order.

        A fraction picks, per op, the smallest candidate at least that share of the full
        width; with `kind` ("mlp" or "attention") only ops of that kind change. Ops missing
        from a dict stay at their current width.
        """
        self._widths = self._resolve(widths, kind)
        self._state.set(self._class_widths(self._widths))

    def _resolve(self, widths, kind: str | None = None) -> dict[str, int]:
        """The per-op widths that `set_widths(widths, kind=kind)` would set (validated)."""
        new = dict(self._widths)
        widths = _plain_numbers(widths)
        if kind not in (None, "mlp", "attention"):
            raise WidthError(f"kind must be 'mlp', 'attention' or None, got {kind!r}")
        if isinstance(widths, (int, float)) and not isinstance(widths, bool):
            frac = float(widths)
            if not 0.0 < frac <= 1.0:
                raise WidthError(f"a uniform width is a fraction in (0, 1], got {widths!r}")
            for name, op in self.ops.items():
                if kind is None or op.kind == kind:
                    new[name] = next(c for c in op.candidates if c >= frac * op.full - 1e-9)
        elif isinstance(widths, dict):
            for name, w in widths.items():
                if name not in self.ops:
                    near = [n for n in self.ops if n.split("#")[0] in name or name in n]
                    names = list(self.ops)
                    listing = (f"did you mean {near[:3]}? " if near else "") + \
                        f"the {len(names)} ops are {names[:6]}{' ...' if len(names) > 6 else ''}"
                    raise WidthError(f"no elastic op named {name!r}; {listing} "
                                     "(all in ElasticModel.ops)")
                new[name] = w
        elif isinstance(widths, (list, tuple)):
            if len(widths) != len(self.ops):
                raise WidthError(f"got {len(widths)} widths for {len(self.ops)} elastic ops; "
                                 "pass one per op, in the order of ElasticModel.ops")
            new.update(zip(self.ops, widths))
        else:
            raise WidthError("widths must be a fraction, a dict {op name: width} or a list, "
                             f"got {type(widths).__name__}")
        for name, w in new.items():
            op = self.ops[name]
            if not isinstance(w, int) or isinstance(w, bool) or w not in op.candidates:
                what = "neurons" if op.kind == "mlp" else "query heads"
                raise WidthError(f"width {w!r} for {name} ({op.kind}, {op.full} {what}) is not "
                                 f"a candidate; allowed: {list(op.candidates)}")
        return new

    def kv_heads(self, name: str, width: int) -> int:
        """Key/value heads attention op `name` keeps at `width` query heads: fewer in head
        mode "group" (whole groups go), all of them in mode "query"."""
        block = self._blocks[name]
        groups = block.classes.get("groups")
        full_kv = block.sizes.get("kv_heads", block.sizes["heads"])
        if groups is None:  # no grouped axis: every query head has its own key and value
            return width if full_kv == block.sizes["heads"] else full_kv
        return self._class_widths({name: width}).get(groups, full_kv)

    def _class_widths(self, widths: dict[str, int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for name, w in widths.items():
            b = self._blocks[name]
            if b.kind == "mlp":
                out[b.classes["neurons"]] = w
                continue
            key, _, unit = self._head_axis(b)
            if key in b.classes:
                out[b.classes[key]] = w // unit
        return out

    # ---- running and exporting ----------------------------------------------------------
    def forward(self, *inputs):
        _check_call(inputs, self.sample_shape)
        return self.graph_module(*inputs)

    def materialize(self, widths=None) -> nn.Module:
        """A plain dense copy at `widths` (default: the current ones) with sliced weights.

        The result holds no flextron modules: its parameters have the smaller shapes and
        its shape constants the smaller values.
        """
        from ..passes.elasticize import freeze

        chosen = self._resolve(widths) if widths is not None else self._widths
        with warnings.catch_warnings():  # torch's own pytree deprecation, nothing to act on
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            gm = copy.deepcopy(self.graph_module)
        _find_state(gm).set(self._class_widths(chosen))
        frozen = freeze(gm)
        for p in frozen.parameters():
            p.requires_grad_(False)
        return frozen

    def num_params(self, widths=None, *, non_embedding: bool = False) -> int:
        """Parameters of the sub-network at `widths` (default: current), counted exactly.

        Computed from the weight layouts, without slicing anything; equals the parameter
        count of `materialize(widths)` (parameters the graph reads; unused ones, like a
        pooler an encoder's traced output never reaches, are not counted). `non_embedding` leaves out tables read by
        `embedding` ops (token and position embeddings, and an lm_head tied to them).
        """
        cw = self._class_widths(self._resolve(widths) if widths is not None else self._widths)
        total = sum(p.numel() for p in self._used_parameters())
        for slicer in self.graph_module.modules():
            if isinstance(slicer, WeightSlice):
                full = slicer.layout[2]
                kept = L.extent(slicer.layout, cw)
                total -= (full - kept) * slicer.numel_per_index
        if non_embedding:
            total -= sum(t.numel() for t in self._embedding_tables())
        return total

    def _used_parameters(self) -> list:
        """Parameters the graph reads (an exported model may keep unused ones, e.g. a pooler)."""
        params = dict(self.graph_module.named_parameters(remove_duplicate=False))
        graph = self.graph_module.graph
        live, stack = set(), [n for n in graph.nodes if n.op == "output"]
        while stack:  # what the outputs depend on
            node = stack.pop()
            if node not in live:
                live.add(node)
                stack.extend(node.all_input_nodes)
        seen, out = set(), []
        for node in graph.nodes:
            p = params.get(node.target) if node.op == "get_attr" and node in live else None
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _embedding_tables(self) -> list:
        seen, out = set(), []
        for node in self.graph_module.graph.nodes:
            if node.op == "call_function" and node.target == torch.ops.aten.embedding.default:
                w = node.args[0]
                if w.op == "get_attr" and w.target not in seen:
                    seen.add(w.target)
                    out.append(attrgetter(w.target)(self.graph_module))
        return out

    def summary(self) -> str:
        lines = [f"{'op':<40} {'kind':<10} {'full':>6}  candidates"]
        for op in self.ops.values():
            lines.append(f"{op.name:<40} {op.kind:<10} {op.full:>6}  {list(op.candidates)}")
        return "\n".join(lines)

    def block(self, name: str) -> Block:
        return self._blocks[name]


def _plain_numbers(widths):
    """numpy and other Integral/Real scalars as int/float, in a scalar, dict or list."""
    def plain(w):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            return w
        return int(w) if isinstance(w, numbers.Integral) else float(w)

    if isinstance(widths, dict):
        return {k: plain(w) for k, w in widths.items()}
    if isinstance(widths, (list, tuple)):
        return [plain(w) for w in widths]
    return plain(widths)


def _check_call(inputs: tuple, sample_shape: tuple) -> None:
    """A clear error for an input without the batch axis the graph was traced with."""
    first = inputs[0] if inputs else None
    if not isinstance(first, torch.Tensor) or first.dim() == len(sample_shape):
        return
    axes = ", ".join(["batch", "seq", *("..." for _ in sample_shape[2:])])
    fix = (" For one sequence add the batch axis: ids.unsqueeze(0)."
           if first.dim() == len(sample_shape) - 1 else "")
    raise InputError(f"the elastic model takes inputs shaped [{axes}] (traced with "
                     f"{list(sample_shape)}), got {list(first.shape)}.{fix}")


def _find_state(gm: nn.Module) -> WidthState:
    for m in gm.modules():
        if isinstance(m, WeightSlice):
            return m.state
    raise RuntimeError("no elastic op in this graph")  # pragma: no cover

