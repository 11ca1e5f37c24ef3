"""Static programs: an elastic graph with its constant widths folded in, run as plain code.

When every width a graph reads is an int, the width nodes, the sizes computed from them
and the weight slices are constants of that forward pass. `specialise` folds them: width
and size nodes become ints, a slice becomes `torch.narrow` (a view of the weight, so
gradients and in-place changes reach the real parameter) or disappears at full width.
Everything else stays: region nodes remain module calls (their own static program is
built per width by `ElasticRegion`), hooks on them still fire, and a node that produces
widths without being a constant (a router) keeps its slices as module calls.

The elastic graph itself is not changed; a static program is a derived artifact, like a
compiled kernel, and runs with the original module as `self`, so it reads the current
parameters on every call. At small batches it saves the Python cost of a few hundred tiny
module calls per forward pass (docs/RESULTS.md, "Forward speed").

A program is also streamlined where torch.export left work that the eager model does not
do, with results that stay equal bit for bit (`streamline`): the export's dtype assertions
are dropped, key/value heads repeated for grouped-query attention go to
`scaled_dot_product_attention` unrepeated with `enable_gqa`, and a boolean attention mask
that turns out to be purely causal at run time becomes `is_causal`.
"""

from __future__ import annotations

import ast
import linecache
from collections.abc import Callable
from itertools import count

import torch
from torch import fx

from .ops import ShapeSize, WeightSlice, WidthSource, WidthSpan

_serial = count()


def specialise(gm: fx.GraphModule, constants: dict[str, int] | None = None
               ) -> Callable | None:
    """`fn(gm, *inputs)` computing `gm(*inputs)` with its constant widths folded in.

    `constants` maps placeholder names to int values (a region's `width` input); width
    nodes (`WidthSource`) are read from `gm` now. Returns None when a width node holds
    per-token widths: routed execution has no static program.
    """
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)
    env: dict[fx.Node, object] = {}
    folded: dict[fx.Node, int] = {}
    constants = constants or {}

    def arg(a):
        return folded.get(a, env.get(a, a)) if isinstance(a, fx.Node) else a

    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op == "placeholder" and node.name in constants:
            folded[node] = constants[node.name]
            env[node] = graph.node_copy(node, arg)  # still an argument, no longer read
            continue
        if isinstance(mod, WidthSource):
            if isinstance(mod.value, torch.Tensor):
                return None
            folded[node] = mod.value
            continue
        if isinstance(mod, (WidthSpan, ShapeSize)) and all(a in folded for a in node.args):
            folded[node] = mod(*(folded[a] for a in node.args))
            continue
        if isinstance(mod, WeightSlice) and node.args[1] in folded:
            plan = mod.plan(folded[node.args[1]])
            weight = arg(node.args[0])
            if plan is None:
                env[node] = weight
                continue
            if isinstance(plan, int):
                env[node] = graph.call_function(torch.narrow, (weight, mod.axis, 0, plan))
                continue
        env[node] = graph.node_copy(node, arg)
    streamline(graph)
    return _compile(graph, type(gm).__name__)


_aten = torch.ops.aten
_SDPA = _aten.scaled_dot_product_attention.default


def streamline(graph: fx.Graph) -> None:
    """Remove what torch.export added to a graph that the eager model does not compute.

    - `_assert_tensor_metadata` checks (one per dtype conversion) are dropped;
    - attention over keys and values repeated per query group (`repeat_kv`: unsqueeze at
      dim 2, expand, reshape) reads the unrepeated tensors with `enable_gqa=True`, which
      maps query head i to key/value head i // n exactly as the repeat does;
    - a boolean attention mask feeding attention is checked once per forward: when it is
      the lower triangle (no padding, no cache), attention runs with `is_causal=True`.
    The result is unchanged bit for bit (tests/test_static_program.py).
    """
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    causal: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA or len(node.args) < 3:
            continue
        kwargs = dict(node.kwargs)
        if kwargs.get("enable_gqa") or kwargs.get("is_causal"):
            continue
        q, k, v, *rest = node.args
        k0, v0 = _unrepeated(k), _unrepeated(v)
        if k0 is not None and v0 is not None:
            k, v, kwargs["enable_gqa"] = k0, v0, True
        mask = rest[0] if rest else kwargs.get("attn_mask")
        if (isinstance(mask, fx.Node) and _is_bool(mask) and len(rest) <= 1
                and not kwargs.get("dropout_p")):
            if mask not in causal:
                with graph.inserting_after(mask):
                    causal[mask] = graph.call_function(causal_or_none, (mask,))
            kwargs.pop("attn_mask", None)
            with graph.inserting_before(node):
                new = graph.call_function(_attention, (q, k, v, causal[mask]), kwargs)
        else:
            with graph.inserting_before(node):
                new = graph.call_function(_SDPA, (q, k, v, *rest), kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    _drop_unused(graph)


def _unrepeated(node) -> fx.Node | None:
    """x when `node` is reshape(expand(unsqueeze(x, 2), [b, h, n, s, d]), [b, h*n, s, d])."""
    if not (isinstance(node, fx.Node) and node.target in (_aten.reshape.default,
                                                          _aten.view.default)):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target is _aten.expand.default):
        return None
    unsq = expand.args[0]
    if not (isinstance(unsq, fx.Node) and unsq.target is _aten.unsqueeze.default
            and unsq.args[1] == 2 and len(expand.args[1]) == 5 and len(node.args[1]) == 4):
        return None
    before, after = _shape(unsq), _shape(expand)
    if before is None or after is None or len(before) != 5:
        return None
    # only the inserted dim may broadcast; every other dim keeps its size
    if any(str(a) != str(b) for i, (a, b) in enumerate(zip(before, after)) if i != 2):
        return None
    return unsq.args[0]


def _shape(node: fx.Node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_bool(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


def causal_or_none(mask: torch.Tensor) -> torch.Tensor | None:
    """`mask` when it is anything but a plain causal mask; None when it is one."""
    q, k = mask.shape[-2], mask.shape[-1]
    if q != k or q < 2:
        return mask
    causal = torch.ones(q, k, dtype=torch.bool, device=mask.device).tril_()
    return None if torch.equal(mask, causal.expand_as(mask)) else mask


def _attention(q, k, v, mask, **kwargs):
    if mask is None:
        return _SDPA(q, k, v, is_causal=True, **kwargs)
    return _SDPA(q, k, v, mask, **kwargs)


_VIEWS = {_aten.reshape.default, _aten.view.default, _aten.expand.default,
          _aten.unsqueeze.default}


def _drop_unused(graph: fx.Graph) -> None:
    """Erase the repeats' views and reshapes that lost their last user."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target in _VIEWS and not node.users:
            graph.erase_node(node)


def _sink_attributes(graph: fx.Graph) -> None:
    """Read each parameter just before its first use instead of all at the top."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        if node.users:
            min(node.users, key=order.__getitem__).prepend(node)


_COMPACT_FROM = 100  # lines; smaller frames are far from a chunk boundary
_SCOPES = (ast.Lambda, ast.FunctionDef, ast.comprehension, ast.NamedExpr, ast.Global,
           ast.Nonlocal)


def compact_locals(src: str) -> str:
    """`src` with the straight-line `forward`'s local names reused once they are dead.

    fx names one local per node, so a whole model's program has about two thousand
    locals: a frame of ~15 KB, close to the 16 KB chunks of CPython's frame stack. At
    some call depths every op then called from it crosses a chunk boundary, which maps
    and unmaps memory for each call (3,445 page faults and +40 % time per SmolLM2 forward
    at 1x8). Reusing the names of dead values keeps the frame to the live set. Code with
    any control flow or nested scope is returned unchanged.
    """
    tree = ast.parse(src)
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef)), None)
    if fn is None or not all(isinstance(s, (ast.Assign, ast.Expr, ast.Return, ast.Pass))
                             for s in fn.body):
        return src
    walked = [list(ast.walk(s)) for s in fn.body]  # one walk: the slow part
    if any(isinstance(n, _SCOPES) for nodes in walked for n in nodes):
        return src
    names = [[n for n in nodes if isinstance(n, ast.Name)] for nodes in walked]
    params = {a.arg for a in (*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs)}
    params |= {a.arg for a in (fn.args.vararg, fn.args.kwarg) if a is not None}
    stored = {n.id for ns in names for n in ns if isinstance(n.ctx, ast.Store)} - params
    dying: dict[int, list[str]] = {}
    for name, i in {n.id: i for i, ns in enumerate(names) for n in ns
                    if n.id in stored}.items():
        dying.setdefault(i, []).append(name)
    taken = params | {n.id for ns in names for n in ns}
    fresh = (f"_v{i}" for i in count() if f"_v{i}" not in taken)
    free: list[str] = []
    rename: dict[str, str] = {}
    for i, ns in enumerate(names):
        ns = [n for n in ns if n.id in stored]
        for n in ns:  # new names take a free one before this statement's dead ones free theirs
            if n.id not in rename:
                rename[n.id] = free.pop() if free else next(fresh)
        for n in ns:
            n.id = rename[n.id]
        free.extend(rename[k] for k in dying.get(i, ()))
    return ast.unparse(tree) + "\n"


def _compile(graph: fx.Graph, name: str) -> Callable:
    _sink_attributes(graph)
    code = graph.python_code(root_module="self")
    src = compact_locals(code.src) if code.src.count("\n") > _COMPACT_FROM else code.src
    filename = f"<flextron static {name} {next(_serial)}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    scope = dict(code.globals)
    exec(compile(src, filename, "exec"), scope)  # noqa: S102  (fx's own generated code)
    return scope["forward"]


__all__ = ["specialise"]
