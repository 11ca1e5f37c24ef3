"""Stage 1: capture a user's model as a torch.fx GraphModule (torch.export, non-strict)."""

from __future__ import annotations

import collections
import copy
import inspect
import logging
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputShapeError, TraceError

log = logging.getLogger(__name__)


class LogitsOnly(nn.Module):
    """Calls a Hugging Face model without a KV cache and returns one tensor.

    Causal LMs and classifiers (text or vision) give their logits, encoders their last
    hidden state. Inputs are passed positionally (`input_ids`, `pixel_values`, ...);
    `use_cache=False` only goes to models whose forward takes it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
            params = {}
        self.no_cache = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs, **self.no_cache)
        if getattr(out, "logits", None) is not None:
            return out.logits
        return out.last_hidden_state


@dataclass
class Traced:
    """A traced model: the graph, the prefix of parameter names added by the wrapper.

    `shapes` describes every tensor input the graph accepts (see `InputShapes`);
    `notes` says why a dimension ended up static or bounded, when it did.
    """

    graph_module: torch.fx.GraphModule
    param_prefix: str
    is_hf: bool
    sample_inputs: tuple
    shapes: InputShapes | None = None
    notes: tuple[str, ...] = ()


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return False
    return isinstance(model, PreTrainedModel)


_NOT_SEQUENCE = ("pixel_values", "input_features", "input_values")


def _check_inputs(sample_inputs, seq_axes: dict[int, int] | None) -> tuple:
    if isinstance(sample_inputs, torch.Tensor):
        sample_inputs = (sample_inputs,)
    if not isinstance(sample_inputs, tuple) or not sample_inputs:
        raise TraceError("sample_inputs must be a tensor or a non-empty tuple of tensors, "
                         f"got {type(sample_inputs).__name__}")
    first = sample_inputs[0]
    if not isinstance(first, torch.Tensor) or first.dim() < 2:
        raise TraceError(
            "the first sample input must be a tensor with the batch axis first: [batch, seq] "
            "token ids, [batch, seq, ...] features or [batch, channels, height, width] "
            f"images; got {getattr(first, 'shape', type(first).__name__)}")
    short = seq_axes and any(sample_inputs[i].shape[d] < 2 for i, d in seq_axes.items())
    if first.shape[0] < 2 or short:
        raise TraceError(f"sample inputs of shape {tuple(first.shape)} would specialise the "
                         "graph to batch or sequence 1; pass at least 2 sequences of 2+ tokens")
    # a strided view (e.g. ids[:2, :16]) would put its parent's stride into the guards
    return tuple(t.contiguous().clone() if isinstance(t, torch.Tensor) else t
                 for t in sample_inputs)


def _seq_axes(model: nn.Module, inputs: tuple) -> dict[int, int]:
    """{input index: its sequence dim}, inferred from dtypes, ranks and the model.

    Integer or boolean [batch, seq, ...] tensors (token ids, masks) and float
    [batch, seq, features] tensors have a sequence axis at dim 1; images
    [batch, channels, height, width], [batch, features] vectors and a Hugging Face
    model's pixel / audio inputs have none.
    """
    if getattr(model, "main_input_name", None) in _NOT_SEQUENCE:
        return {}
    out = {}
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            continue
        if not t.is_floating_point() and not t.is_complex() or t.dim() == 3:
            out[i] = 1
    return out


def _dynamic_shapes(inputs: tuple, seq_axes: dict[int, int], bounds: dict[str, tuple],
                    static: set[str]) -> tuple:
    """torch.export dynamic_shapes: one batch Dim for dim 0 of every tensor that has the
    first input's batch size, one seq Dim for every sequence axis of the first one's length."""
    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in bounds.items()
            if name not in static}
    b0 = inputs[0].shape[0]
    t0 = next((inputs[i].shape[d] for i, d in seq_axes.items()), None)
    spec = []
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            spec.append(None)
            continue
        entry = {}
        if t.dim() >= 1 and t.shape[0] == b0 and "batch" in dims:
            entry[0] = dims["batch"]
        if i in seq_axes and t.shape[seq_axes[i]] == t0 and "seq" in dims:
            entry[seq_axes[i]] = dims["seq"]
        spec.append(entry or None)
    return tuple(spec)


def _own_weights(gm: nn.Module) -> None:
    """Give the graph its own parameter objects (tied ones stay tied).

    The exported module holds the user's very Parameter objects; passes rewrite weights
    in place and must not change the user's model.
    """
    copies: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in copies:
                    copies[id(p)] = nn.Parameter(p.detach().clone(), p.requires_grad)
                mod._parameters[name] = copies[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None:
                copies.setdefault(id(b), b.detach().clone())
                mod._buffers[name] = copies[id(b)]


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of user code named in an export error, as 'file:line in fn'."""
    frames = []
    while exc is not None:
        frames += re.findall(r'File "([^"]+)", line (\d+), in (\w+)', str(exc))
        exc = exc.__cause__
    user = [f for f in frames if "site-packages" not in f[0] and "/torch/" not in f[0]]
    if not (user or frames):
        return ""
    file, line, fn = (user or frames)[-1]
    return f"{file}:{line} in {fn}()"


def vocab_size(gm: torch.fx.GraphModule) -> int | None:
    """Rows of the smallest embedding table the graph's first input indexes directly."""
    first = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    sizes = [n.args[0].meta["val"].shape[0] if "val" in n.args[0].meta
             else _attr(gm, n.args[0].target).shape[0]
             for n in gm.graph.nodes
             if n.op == "call_function" and n.target == torch.ops.aten.embedding.default
             and n.args[1] is first and getattr(n.args[0], "op", None) == "get_attr"]
    return int(min(sizes)) if sizes else None


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def check_token_ids(gm: torch.fx.GraphModule, ids, what: str, error: type) -> None:
    """Raise `error` when integer inputs index outside the model's embedding table."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.numel() == 0 \
            or ids.device.type == "meta":
        return
    vocab = vocab_size(gm)
    if vocab is None:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise error(f"{what} holds token ids in [{lo}, {hi}], but the model's vocabulary has "
                    f"{vocab} entries (ids 0 to {vocab - 1}); tokenize with the model's own "
                    "tokenizer, or map ids out of range (e.g. padding -100) to a valid id")


class InputShapes:
    """The tensor input shapes a traced graph accepts; called before every forward.

    Each dim is an int (static) or (name, low, high). A call with another shape raises
    `InputShapeError` that names the input, the dim, what the graph accepts and why,
    instead of torch.export's own guard failure.
    """

    def __init__(self, dims: list[list], notes: tuple[str, ...] = ()):
        self.dims, self.notes = dims, tuple(notes)

    @classmethod
    def of(cls, program, gm: torch.fx.GraphModule, names: dict, notes=()) -> InputShapes:
        ranges = program.range_constraints
        dims = []
        for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            row = []
            for d, size in enumerate(val.shape):
                if isinstance(size, int):
                    row.append(int(size))
                    continue
                r = ranges.get(size.node.expr)
                row.append((names.get((len(dims), d), f"dim {d}"),
                            _finite(r.lower) or 0 if r is not None else 0,
                            _finite(r.upper) if r is not None else None))
            dims.append(row)
        return cls(dims, notes)

    def dynamic(self, i: int, d: int) -> bool:
        return i < len(self.dims) and d < len(self.dims[i]) and \
            not isinstance(self.dims[i][d], int)

    def check(self, inputs: tuple) -> None:
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        if len(tensors) != len(self.dims):
            raise InputShapeError(f"the model takes {len(self.dims)} tensor input(s), got "
                                  f"{len(tensors)}")
        for i, (t, row) in enumerate(zip(tensors, self.dims)):
            if t.dim() != len(row):
                raise InputShapeError(
                    f"input {i} has shape {tuple(t.shape)}; the model was traced with "
                    f"{len(row)}-d inputs of shape {self._describe(row)}")
            for d, (size, want) in enumerate(zip(t.shape, row)):
                if isinstance(want, int):
                    bad = size != want
                    allowed = f"exactly {want}"
                else:
                    _, lo, hi = want
                    bad = size < lo or (hi is not None and size > hi)
                    allowed = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
                if bad:
                    why = "; ".join(self.notes)
                    raise InputShapeError(
                        f"input {i} has shape {tuple(t.shape)}, but the traced graph accepts "
                        f"{self._describe(row)}: dim {d} must be {allowed}"
                        + (f" ({why})" if why else "")
                        + ". Pad or crop the inputs to a size the graph accepts.")

    def __call__(self, module, args):  # a forward pre-hook
        self.check(args)

    def install(self, gm: torch.fx.GraphModule) -> None:
        """Check every call of `gm` and of its deep copies (which drop forward hooks)."""
        gm.register_forward_pre_hook(self, prepend=True)
        gm._register_deepcopy_hook(_Reinstall(self))

    @staticmethod
    def _describe(row) -> str:
        return "[" + ", ".join(str(w) if isinstance(w, int) else w[0] for w in row) + "]"


def _finite(v) -> int | None:
    """A range bound as an int; None for torch's symbolic infinity."""
    try:
        return int(v) if abs(int(v)) < 1 << 62 else None
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


class _Reinstall:
    def __init__(self, shapes: InputShapes):
        self.shapes = shapes

    def __call__(self, gm: torch.fx.GraphModule) -> None:
        gm.register_forward_pre_hook(self.shapes, prepend=True)


def _export(root, inputs, dynamic, oblivious: bool = False):
    if isinstance(root, LogitsOnly) and dynamic is not None:
        if isinstance(dynamic, dict):  # by the wrapped model's argument names
            names = list(inspect.signature(root.model.forward).parameters)
            dynamic = tuple(dynamic.get(n) for n in names[:len(inputs)])
        dynamic = (tuple(dynamic),)  # forward(*inputs) takes one varargs tuple
    with warnings.catch_warnings():  # torch's own pytree deprecation, nothing to act on
        warnings.filterwarnings("ignore", category=FutureWarning)
        with torch.fx.experimental._config.patch(backed_size_oblivious=oblivious):
            return torch.export.export(root, inputs, dynamic_shapes=dynamic, strict=False)


_FIX_DIM = re.compile(r"^\s*(\w+) = Dim\('\w+'(?:, min=(\d+))?(?:, max=(\d+))?\)\s*$", re.MULTILINE)
_FIX_CONST = re.compile(r"^\s*(\w+) = (\d+)\s*$", re.MULTILINE)


def _suggested_fixes(exc: BaseException) -> tuple[dict[str, tuple], dict[str, int]]:
    """(new bounds, specialised constants) that a constraint violation suggests, by Dim name."""
    text = str(exc)
    if "Suggested fixes" not in text:
        return {}, {}
    text = text.split("Suggested fixes", 1)[1]
    bounds = {m[1]: (int(m[2]) if m[2] else None, int(m[3]) if m[3] else None)
              for m in _FIX_DIM.finditer(text)}
    consts = {m[1]: int(m[2]) for m in _FIX_CONST.finditer(text)}
    return bounds, consts


def _trace_error(model, exc: BaseException, extra: str = "") -> TraceError:
    where = _user_frame(exc)
    return TraceError(
        f"torch.export could not trace {type(model).__name__}"
        f"{' at ' + where if where else ''}: {type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}\n{extra}"
        "What to do: make forward() traceable by torch.export: replace Python `if` on "
        "tensor values with torch.where or torch.cond, do not call .item(), print or "
        "numpy() on tensors inside forward; the first sample input must have the batch axis "
        "first and forward must return a tensor (or a Hugging Face model output). "
        "flextronize(..., dynamic_shapes=...) sets which input dims may vary.")


def _export_inferred(model, root, inputs, seq_axes, max_seq) -> tuple:
    """Export with batch and sequence dynamic, narrowing what the code does not allow.

    A bound the code asserts (`assert t <= block_size`) becomes the sequence Dim's range;
    a sequence length the code specialises on makes the sequence static (with a note); a
    batch size it specialises on is an error. Returns (program, notes).
    """
    bounds = {"batch": (1, 1 << 16)}
    if seq_axes:
        bounds["seq"] = (2, max(int(max_seq), 3))
    static: set[str] = set()
    notes: list[str] = []
    first_exc, oblivious = None, False
    for _ in range(6):
        try:
            program = _export(root, inputs, _dynamic_shapes(inputs, seq_axes, bounds, static),
                              oblivious)
        except Exception as exc:  # export raises many unrelated types; all mean the same here
            first_exc = first_exc or exc
            fixes, consts = _suggested_fixes(exc)
            if "batch" in consts:
                raise _trace_error(model, exc, (
                    f"forward() fixes the batch size to {consts['batch']} (the sample "
                    "inputs' batch); flextron_fx runs calibration and inference at other "
                    "batch sizes, so the code must read it from the input's shape.\n")) from exc
            changed = False
            for name, (lo, hi) in fixes.items():
                if name in bounds and name not in static:
                    old = bounds[name]
                    new = (lo if lo is not None else old[0], hi if hi is not None else old[1])
                    if new != old:
                        bounds[name], changed = new, True
                        notes.append(f"forward() bounds {name} to {new[0]}..{new[1]}")
            hi = bounds.get("seq", (0, None))[1]
            if not changed and "seq" not in static and hi is not None and \
                    re.search(rf"Constraints violated \(seq\).*!= {hi}\b", str(exc), re.DOTALL):
                # `mask[:, :, :T, :T]` of a [block_size]^2 mask is the whole mask at
                # T == block_size, a case export splits off; size-oblivious tracing merges
                # it (checked below at length block_size), else the bound drops by one
                if not oblivious:
                    oblivious = True
                else:
                    bounds["seq"] = (bounds["seq"][0], hi - 1)
                    notes.append(f"forward() treats length {hi} specially, so seq is "
                                 f"bounded to {bounds['seq'][0]}..{hi - 1}")
                changed = True
            if "seq" in consts and "seq" not in static:
                static.add("seq")
                changed = True
                notes.append(f"forward() specialises on the sequence length, so the graph was "
                             f"traced for length {consts['seq']} only")
            if not changed and "seq" in bounds and "seq" not in static:
                static.add("seq")  # code that export cannot follow at a symbolic length
                changed = True
                notes.append("torch.export could not trace forward() at a symbolic sequence "
                             f"length ({type(exc).__name__}), so the graph was traced for "
                             "the sample's length only")
            if not changed:
                raise _trace_error(model, first_exc) from first_exc
            continue
        return program, notes
    raise _trace_error(model, first_exc) from first_exc


# Exported programs of Hugging Face models traced in this process, without their weights:
# loading a saved elastic model, training and exporting each trace the same class at the
# same config again (~20 s for SmolLM2 on a 2-core CPU), and only the weights differ.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_REMEMBERED = 2


def _program_key(model: nn.Module, root: nn.Module, state: dict, inputs: tuple, seq_axes,
                 max_seq):
    """What decides a Hugging Face model's traced graph, or None (then it is not reused):
    class, config (attention implementation included), every weight's name, shape, dtype
    and device, every module's class (and whether its forward was replaced), the inputs'
    shapes and dtypes, the sequence axes and bound."""
    config = getattr(model, "config", None)
    if not is_hf_model(model) or config is None:
        return None
    try:
        text = config.to_json_string(use_diff=False)
    except (TypeError, ValueError):  # a config that does not serialise: trace every time
        return None
    tensors = [(n, tuple(t.shape), t.dtype, t.device.type) for n, t in state.items()]
    # a module whose class, class-level forward or instance-level forward was swapped
    # traces differently
    modules = [(n, type(m).__module__, type(m).__qualname__, id(type(m).forward),
                "forward" in vars(m)) for n, m in root.named_modules()]
    return (type(model).__module__, type(model).__qualname__, text,
            getattr(config, "_attn_implementation", None), tuple(tensors), tuple(modules),
            tuple((tuple(t.shape), t.dtype) for t in inputs), tuple(sorted(seq_axes.items())),
            max_seq)


def _named_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `root` by name, tied and non-persistent ones included."""
    return {**dict(root.named_parameters(remove_duplicate=False)),
            **dict(root.named_buffers(remove_duplicate=False))}


def _remembered_export(model, root, inputs, seq_axes, max_seq) -> tuple:
    """`_export_inferred`, reusing the graph of an earlier trace of the same Hugging Face
    class and config in this process with `model`'s own weights put in."""
    state = _named_state(root)
    key = _program_key(model, root, state, inputs, seq_axes, max_seq)
    if key is not None and key in _PROGRAMS:
        template, notes = _PROGRAMS[key]
        if all(name in state for name in template.state_dict):
            _PROGRAMS.move_to_end(key)
            program = copy.copy(template)
            program._state_dict = {name: state[name] for name in template.state_dict}
            # non-persistent buffers are constants of the program: take `model`'s too
            program._constants = {name: state.get(name, value)
                                  for name, value in template.constants.items()}
            log.info("trace: reused the graph of an earlier trace of %s",
                     type(model).__name__)
            return program, notes
    program, notes = _export_inferred(model, root, inputs, seq_axes, max_seq)
    if key is not None:
        template = copy.copy(program)  # holds no weights: they stay the user's to free
        template._state_dict = {name: torch.empty_like(t, device="meta")
                                for name, t in program.state_dict.items()}
        _PROGRAMS[key] = (template, notes)
        while len(_PROGRAMS) > _REMEMBERED:
            _PROGRAMS.popitem(last=False)
    return program, notes


def _rows(outputs) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(outputs)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _check_general(model, gm, inputs: tuple, shapes: InputShapes) -> None:
    """Run the graph at a second batch size (and sequence length) before anyone relies on it.

    At batch B+1 (the sample plus a copy of its first row) every output must grow by one
    row and its first B rows must equal the outputs at batch B: a graph that bakes in the
    example's batch size fails here, at trace time, instead of later with a shape error or
    a silently wrong answer.
    """
    b = inputs[0].shape[0]
    bigger = tuple(torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) and t.dim() >= 1
                   and t.shape[0] == b and shapes.dynamic(i, 0) else t
                   for i, t in enumerate(inputs))
    with torch.no_grad():
        ref = _rows(gm(*inputs))
        try:
            out = _rows(gm(*bigger))
            problem = None
            if len(out) != len(ref):
                problem = f"it returns {len(out)} tensors instead of {len(ref)}"
            for r, o in zip(ref, out):
                if problem:
                    break
                if r.dim() == 0 or r.shape[0] != b or o.shape[0] != b + 1 or \
                        o.shape[1:] != r.shape[1:]:
                    problem = (f"an output of shape {tuple(r.shape)} at batch {b} has shape "
                               f"{tuple(o.shape)} at batch {b + 1}")
                elif r.is_floating_point() and not torch.allclose(
                        o[:b], r, rtol=1e-3, atol=1e-4 * max(1.0, r.abs().max().item())):
                    problem = (f"the outputs for the same {b} inputs change with the batch size "
                               f"(max difference {(o[:b] - r).abs().max().item():.3g})")
        except Exception as exc:  # noqa: BLE001 - whatever it raises at the other size
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if problem:
        raise TraceError(
            f"the graph traced from {type(model).__name__} does not run correctly at batch size "
            f"{b + 1} (traced at {b}): {problem}. forward() bakes in the example's batch size "
            "(a constant-size slice, reshape or buffer over the batch axis). What to do: "
            "derive every batch-sized quantity from the input's shape (x.shape[0]).")


def trace(model: nn.Module, sample_inputs, *, max_seq: int | None = None,
          dynamic_shapes=None) -> Traced:
    """Export `model` to a GraphModule whose batch (and sequence length) may vary.

    Which dims vary is inferred from the inputs and the model: dim 0 of every input is
    the batch; integer [batch, seq] ids (and masks) and float [batch, seq, features]
    tensors also have a dynamic sequence length; images [batch, channels, height, width]
    and a Hugging Face model's `pixel_values` have only the batch. `dynamic_shapes`
    overrides this and goes to `torch.export.export` as it is. A sequence length that
    forward() bounds (`assert t <= block_size`) becomes the graph's bound; one it
    specialises on gives a graph for the sample's length only (with a warning, and a clear
    `InputShapeError` when fed another length). The graph is run at a second batch size
    before it is returned; one that bakes in the sample's batch is a `TraceError`.

    Hugging Face models are wrapped so the graph returns only logits (no cache).
    Parameters keep their module paths (`get_attr` targets), every node keeps its
    `nn_module_stack`, and `node.meta["val"]` holds fake tensors with symbolic shapes.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> trace(m, (torch.randn(2, 3, 4),)).graph_module(torch.randn(5, 7, 4)).shape
        torch.Size([5, 7, 4])
    """
    raw = (sample_inputs,) if isinstance(sample_inputs, torch.Tensor) else sample_inputs
    seq_axes = _seq_axes(model, raw) if dynamic_shapes is None and isinstance(raw, tuple) \
        and raw and isinstance(raw[0], torch.Tensor) and raw[0].dim() >= 2 else {}
    sample_inputs = _check_inputs(sample_inputs, seq_axes)
    hf = is_hf_model(model)
    root = LogitsOnly(model) if hf else model
    if max_seq is None:
        max_seq = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_seq = max_seq or 1 << 16
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if dynamic_shapes is not None:
                try:
                    program, notes = _export(root, sample_inputs, dynamic_shapes), []
                except Exception as exc:
                    raise _trace_error(model, exc, "(with the dynamic_shapes given)\n") from exc
            else:
                program, notes = _remembered_export(model, root, sample_inputs, seq_axes,
                                                    max_seq)
    finally:
        model.train(was_training)
    gm = program.module()
    check_token_ids(gm, sample_inputs[0], "sample input", TraceError)
    _own_weights(gm)
    names = {(i, 0): "batch" for i in range(len(sample_inputs))}
    names.update({(i, d): "seq" for i, d in seq_axes.items()})
    shapes = InputShapes.of(program, gm, names, tuple(notes))
    shapes.install(gm)
    for note in notes:
        if shapes.dynamic(0, 0) and any(not shapes.dynamic(i, d) for i, d in seq_axes.items()):
            warnings.warn(f"flextron_fx trace: {note}", stacklevel=2)
        else:
            log.info("trace: %s", note)
    if shapes.dynamic(0, 0):
        _check_general(model, gm, sample_inputs, shapes)
    else:
        raise TraceError(
            f"the graph traced from {type(model).__name__} has a static batch size "
            f"{sample_inputs[0].shape[0]} (from the dynamic_shapes given); flextron_fx runs "
            "calibration and inference at other batch sizes. What to do: mark dim 0 of the "
            "inputs dynamic (torch.export.Dim('batch')).")
    return Traced(graph_module=gm, param_prefix="model." if hf else "", is_hf=hf,
                  sample_inputs=sample_inputs, shapes=shapes, notes=tuple(notes))
