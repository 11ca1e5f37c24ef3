"""ElasticModel: a flextronized graph plus its blocks, candidate widths and current widths."""

from __future__ import annotations

import numbers
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from types import MethodType

import torch
from torch import fx, nn

from ..analyze import Block, dataflow
from ..config import FlextronConfig
from ..errors import InputError, WidthError
from .compensation import Compensation
from .ops import ElasticRegion, WeightSlice, WidthSource, check_indices
from .static import specialise
from .widths import candidates, width_rule


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


class ElasticModel(nn.Module):
    """A model whose MLP and attention blocks run at any of their candidate widths.

    Every block reads its width from a node of the graph (`WidthSource`); `set_widths`
    changes those nodes' values, `at` does so for a `with` block.

    Example:
        >>> em.set_widths(0.5)                        # doctest: +SKIP
        >>> em.set_widths({"model.layers.0.mlp#1": 768})  # doctest: +SKIP
        >>> with em.at(0.5, kind="mlp"):              # doctest: +SKIP
        ...     logits = em(ids)
        >>> dense = em.materialize()                  # doctest: +SKIP
    """

    def __init__(self, graph_module: fx.GraphModule, blocks: list[Block],
                 config: FlextronConfig, *, source: dict | None = None,
                 sample_shape: tuple[int, ...] = (2, 8), param_prefix: str = ""):
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.source = source or {"kind": "module"}
        self.sample_shape = tuple(sample_shape)
        self.param_prefix = param_prefix
        self._blocks = {b.name: b for b in blocks}
        self._rules = {b.name: width_rule(b, config.head_mode) for b in blocks}
        self.ops: dict[str, ElasticOp] = {
            b.name: ElasticOp(b.name, b.kind, b.module_path, b.full_width,
                              candidates(b, config), dict(b.sizes)) for b in blocks}
        self.skipped: list = []  # blocks left dense, with reasons (analyze.Skipped)
        self.orders: dict = {}  # block -> axis -> stored order of original indices
        # text domains each stage fitted the widths to, as the CLI records them:
        # {"calibration": [...], "train-elastic": [...]}; empty when not known
        self.domains_seen: dict[str, list[str]] = {}
        self._programs: dict[tuple, object] = {}  # widths -> static program (see forward)
        # How many static programs to keep: the most recently used sets of widths.
        self.programs_kept = 8
        self._warned_train = False  # train(True) warns once that dropout stays off
        self._programs_of = self._last_key = None
        self._width_targets: list[str] = []

    # ---- widths ------------------------------------------------------------------------
    def width_nodes(self) -> dict[str, fx.Node]:
        """The graph node each op reads its width from (a `WidthSource` by default)."""
        return width_nodes(self.graph_module)

    def _sources(self) -> dict[str, WidthSource]:
        return _sources(self.graph_module, self.ops)

    @property
    def widths(self) -> dict[str, int | torch.Tensor]:
        """The current width of every op: an int, or per-token candidate indices."""
        return {name: src.value for name, src in self._sources().items()}

    def full_widths(self) -> dict[str, int]:
        return {name: op.full for name, op in self.ops.items()}

    def note_domains(self, stage: str, domains: list[str]) -> None:
        """Record that `stage` ("calibration", "train-elastic", "joint-tune") fitted the
        widths to text of `domains` (kept in `domains_seen`, saved with the model)."""
        seen = self.domains_seen.setdefault(stage, [])
        seen += [d for d in domains if d not in seen]

    def set_full(self) -> None:
        self.set_widths(1.0)

    def set_widths(self, widths, *, kind: str | None = None) -> None:
        """Choose the sub-network: a fraction for every op, {op: width}, or a list in op order.

        A fraction picks, per op, the smallest candidate at least that share of the full
        width; with `kind` ("mlp" or "attention") only ops of that kind change. Ops missing
        from a dict stay at their current width. A dict value may also be a [batch, seq]
        integer tensor of candidate indices: that op then runs a width per token (routed).
        """
        sources = self._sources()
        for name, w in self.resolve(widths, kind).items():
            sources[name].value = w

    @contextmanager
    def at(self, widths, *, kind: str | None = None):
        """Run a `with` block at `widths` (anything `set_widths` takes); the previous widths
        come back on exit, also on an error.

        Example:
            >>> with em.at(0.5, kind="mlp"):   # doctest: +SKIP
            ...     logits = em(ids)
        """
        before = self.widths
        self.set_widths(widths, kind=kind)
        try:
            yield self
        finally:
            self.set_widths(before)

    def resolve(self, widths, kind: str | None = None) -> dict[str, int | torch.Tensor]:
        """The per-op widths that `set_widths(widths, kind=kind)` would set (validated)."""
        # a dict naming every op needs no current widths (there are none while routers,
        # not width nodes, feed the blocks)
        complete = isinstance(widths, dict) and widths.keys() >= self.ops.keys()
        new = {} if complete else self.widths
        if kind not in (None, "mlp", "attention"):
            raise WidthError(f"kind must be 'mlp', 'attention' or None, got {kind!r}")
        if isinstance(widths, numbers.Real) and not isinstance(widths, (bool, numbers.Integral)):
            frac = float(widths)
            if not 0.0 < frac <= 1.0:
                raise WidthError(f"a uniform width is a fraction in (0, 1], got {widths!r}")
            for name, op in self.ops.items():
                if kind is None or op.kind == kind:
                    new[name] = next(c for c in op.candidates if c >= frac * op.full - 1e-9)
        elif isinstance(widths, numbers.Integral) and not isinstance(widths, bool):
            if int(widths) != 1:
                raise WidthError(f"a uniform width is a fraction in (0, 1], got {widths!r}; "
                                 "pass {op name: width} to choose widths in neurons or heads")
            return self.resolve(1.0, kind)
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
            new[name] = self._check_width(name, w)
        return new

    def _check_width(self, name: str, w):
        op = self.ops[name]
        if isinstance(w, torch.Tensor):
            return self._check_routed(name, w)
        if isinstance(w, numbers.Integral) and not isinstance(w, bool) and int(w) in op.candidates:
            return int(w)
        what = "neurons" if op.kind == "mlp" else "query heads"
        raise WidthError(f"width {w!r} for {name} ({op.kind}, {op.full} {what}) is not "
                         f"a candidate; allowed: {list(op.candidates)} (or a [batch, seq] "
                         "tensor of candidate indices for per-token widths)")

    def _check_routed(self, name: str, w: torch.Tensor) -> torch.Tensor:
        op = self.ops[name]
        if w.dim() != 2:
            raise WidthError(f"per-token widths of {name} must be shaped [batch, seq], got "
                             f"{tuple(w.shape)}")
        device = next(self.graph_module.parameters()).device
        if w.device != device:
            raise WidthError(f"per-token widths of {name} are on {w.device}, the model on "
                             f"{device}; move them with .to({str(device)!r})")
        check_indices(w, op.candidates, name)
        if not self.routable(name):
            raise WidthError(f"{name} cannot run per-token widths: its block could not be "
                             "made one token-wise node (see the log of flextronize)")
        return w

    def routable(self, name: str) -> bool:
        """Whether op `name` can take a width per token (its token-wise part is one node)."""
        node = self.width_nodes().get(name)
        gm = self.graph_module
        return node is not None and any(
            u.op == "call_module" and isinstance(gm.get_submodule(u.target), ElasticRegion)
            for u in node.users)

    def static_widths(self, widths=None) -> dict[str, int]:
        """`resolve(widths)` (default: the current widths), refusing per-token widths."""
        chosen = self.resolve(widths) if widths is not None else self.widths
        routed = [n for n, w in chosen.items() if isinstance(w, torch.Tensor)]
        if routed:
            raise WidthError(f"{routed[:3]} run per-token widths; this needs one width per op "
                             "(pass widths=..., or set_widths with ints)")
        return chosen

    def kv_heads(self, name: str, width: int) -> int:
        """Key/value heads attention op `name` keeps at `width` query heads: fewer in head
        mode "group" (whole groups go), all of them in mode "query"."""
        block = self._blocks[name]
        groups = block.classes.get("groups")
        full_kv = block.sizes.get("kv_heads", block.sizes["heads"])
        if groups is None:  # no grouped axis: every query head has its own key and value
            return width if full_kv == block.sizes["heads"] else full_kv
        return self._rules[name].classes(width).get(groups, full_kv)

    def weight_slices(self) -> dict[str, WeightSlice]:
        """Parameter path -> the WeightSlice the graph reads it through (call it as
        `slice(parameter, width)`)."""
        gm = self.graph_module
        out = {}
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            if isinstance(mod, WeightSlice) and node.args[0].op == "get_attr":
                out[node.args[0].target] = mod
            elif isinstance(mod, ElasticRegion):
                params = [p for p in mod.ref.graph.nodes if p.op == "placeholder"]
                outer = dict(zip(params, node.args))
                for n in mod.ref.graph.nodes:
                    if n.op == "call_module" and n.args[0] in outer:
                        sl = mod.ref.get_submodule(n.target)
                        if isinstance(sl, WeightSlice) and outer[n.args[0]].op == "get_attr":
                            out[outer[n.args[0]].target] = sl
        return out

    # ---- running and exporting ----------------------------------------------------------
    def train(self, mode: bool = True) -> ElasticModel:
        """Set the `training` flag of this model and every submodule; returns self.

        The graph was traced in eval mode, so it holds no dropout and no train-only branch,
        and gradients flow in either mode: the flag changes nothing the graph computes.
        (nn.Module.train would call the exported graph's own train(), which torch.export
        refuses.) `train(True)` warns once that dropout stays off.
        """
        if not isinstance(mode, bool):
            raise TypeError(f"train(mode) takes True or False, got {mode!r}")
        for module in self.modules():
            module.training = mode
        if mode and not self._warned_train:
            self._warned_train = True
            warnings.warn("ElasticModel.train(): the graph was traced in eval mode, so the "
                          "model's dropout (if it had any) stays off; training works as "
                          "usual otherwise", stacklevel=2)
        return self

    def forward(self, *inputs):
        check_call(inputs, self.sample_shape)
        gm = self.graph_module
        program = self._static_program()
        if program is None:
            return gm(*inputs)
        # Run the program as gm's forward for this one call, so that gm's hooks (the traced
        # input checks) run as they always do.
        gm.forward = MethodType(program, gm)
        try:
            return gm(*inputs)
        finally:
            del gm.forward

    def _static_program(self):
        """The graph with the current widths folded in (elastic/static.py), or None.

        None for per-token widths, under torch.compile or export, and the first time a set
        of widths is seen: a program is built on the second forward pass in a row at the
        same widths, so training, which samples new widths every step, never pays for it.
        """
        gm = self.graph_module
        if torch.compiler.is_compiling():
            return None
        if self._programs_of is not gm.code:
            self._programs.clear()
            self._programs_of, self._last_key = gm.code, None
            self._width_targets = [n.target for n in width_nodes(gm).values()]
        key = tuple(gm.get_submodule(t).value for t in self._width_targets)
        if any(isinstance(w, torch.Tensor) for w in key):
            return None
        program = self._programs.pop(key, None)
        if program is None and key == self._last_key:
            program = specialise(gm)
        if program is not None:
            self._programs[key] = program  # now the most recently used
            while len(self._programs) > self.programs_kept:
                self._programs.pop(next(iter(self._programs)))
        self._last_key = key
        return program

    def __getstate__(self):  # generated code is rebuilt on demand, never copied or pickled
        return {**super().__getstate__(), "_programs": {}, "_programs_of": None}

    def materialize(self, widths=None) -> nn.Module:
        """A plain dense copy at `widths` (default: the current ones) with sliced weights.

        The result holds no flextron modules: its parameters have the smaller shapes and
        its shape constants the smaller values.
        """
        from ..export.dense import materialize  # export builds on this module

        return materialize(self, widths)

    def num_params(self, widths=None, *, non_embedding: bool = False) -> int:
        """Parameters of the sub-network at `widths` (default: current), counted exactly.

        Computed from the weight layouts, without slicing anything; equals the parameter
        count of `materialize(widths)` (parameters the graph reads; unused ones, like a
        pooler an encoder's traced output never reaches, are not counted). `non_embedding` leaves out tables read by
        `embedding` ops (token and position embeddings, and an lm_head tied to them).
        """
        chosen = self.static_widths(widths)
        total = sum(p.numel() for p in self._used_parameters())
        for slicer in self.weight_slices().values():
            total -= (slicer.layout[2] - slicer.kept(chosen[slicer.block])) \
                * slicer.numel_per_index
        if non_embedding:
            total -= sum(t.numel() for t in self._embedding_tables())
        return total

    def _used_parameters(self) -> list:
        """Parameters the graph reads (an exported model may keep unused ones, e.g. a pooler),
        but not low-rank compensation factors: a sub-network has them folded into its
        sliced weights (passes/compensate.py), so they add nothing to its count."""
        factors = {id(p) for m in self.graph_module.modules() if isinstance(m, Compensation)
                   for p in (*m.u, *m.v)}
        params = {k: p for k, p in self.graph_module.named_parameters(remove_duplicate=False)
                  if id(p) not in factors}
        graph = self.graph_module.graph
        live = dataflow.live(graph)
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


def check_call(inputs: tuple, sample_shape: tuple) -> None:
    """A clear error for an input without the batch axis the graph was traced with."""
    first = inputs[0] if inputs else None
    if not isinstance(first, torch.Tensor) or first.dim() == len(sample_shape):
        return
    axes = ", ".join(["batch", "seq", *("..." for _ in sample_shape[2:])])
    fix = (" For one sequence add the batch axis: ids.unsqueeze(0)."
           if first.dim() == len(sample_shape) - 1 else "")
    raise InputError(f"the elastic model takes inputs shaped [{axes}] (traced with "
                     f"{list(sample_shape)}), got {list(first.shape)}.{fix}")


def width_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Op name -> the `WidthSource` node of `gm` its block reads its width from."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, WidthSource):
                out[mod.block] = node
    return out


def _sources(gm: fx.GraphModule, ops) -> dict[str, WidthSource]:
    nodes = width_nodes(gm)
    missing = [n for n in ops if n not in nodes]
    if missing:
        raise WidthError(f"the width of {missing[:3]} no longer comes from a width node of "
                         "the graph (another node feeds it); change that node instead")
    return {name: gm.get_submodule(nodes[name].target) for name in ops}
