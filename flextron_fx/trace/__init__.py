"""Stage 1: capture a user's model as a torch.fx GraphModule (torch.export, non-strict)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TraceError

log = logging.getLogger(__name__)


class LogitsOnly(nn.Module):
    """Calls a Hugging Face model without a KV cache and returns one tensor.

    Causal LMs give their logits, encoders their last hidden state.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids, use_cache=False)
        if hasattr(out, "logits") and out.logits is not None:
            return out.logits
        return out.last_hidden_state


@dataclass
class Traced:
    """A traced model: the graph, the prefix of parameter names added by the wrapper."""

    graph_module: torch.fx.GraphModule
    param_prefix: str
    is_hf: bool
    sample_inputs: tuple


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return False
    return isinstance(model, PreTrainedModel)


def _check_inputs(sample_inputs) -> tuple:
    if isinstance(sample_inputs, torch.Tensor):
        sample_inputs = (sample_inputs,)
    if not isinstance(sample_inputs, tuple) or not sample_inputs:
        raise TraceError("sample_inputs must be a tensor or a non-empty tuple of tensors, "
                         f"got {type(sample_inputs).__name__}")
    first = sample_inputs[0]
    if not isinstance(first, torch.Tensor) or first.dim() < 2:
        raise TraceError("the first sample input must be a tensor of shape [batch, seq, ...]; "
                         f"got {getattr(first, 'shape', type(first).__name__)}")
    if first.shape[0] < 2 or first.shape[1] < 2:
        raise TraceError(f"sample inputs of shape {tuple(first.shape)} would specialise the "
                         "graph to batch or sequence 1; pass at least 2 sequences of 2+ tokens")
    # a strided view (e.g. ids[:2, :16]) would put its parent's stride into the guards
    return tuple(t.contiguous().clone() if isinstance(t, torch.Tensor) else t
                 for t in sample_inputs)


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


def trace(model: nn.Module, sample_inputs, *, max_seq: int | None = None) -> Traced:
    """Export `model` to a GraphModule with dynamic batch and sequence length.

    Hugging Face models are wrapped so the graph returns only logits (no cache).
    Parameters keep their module paths (`get_attr` targets), every node keeps its
    `nn_module_stack`, and `node.meta["val"]` holds fake tensors with symbolic shapes.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> trace(m, (torch.randn(2, 3, 4),)).graph_module(torch.randn(5, 7, 4)).shape
        torch.Size([5, 7, 4])
    """
    sample_inputs = _check_inputs(sample_inputs)
    hf = is_hf_model(model)
    root = LogitsOnly(model) if hf else model
    if max_seq is None:
        max_seq = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_seq = max_seq or 1 << 16
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("seq", min=2, max=max(int(max_seq), 3))
    dynamic = tuple({0: batch, 1: seq} if i == 0 else None for i in range(len(sample_inputs)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(root, sample_inputs, dynamic_shapes=dynamic,
                                          strict=False)
    except Exception as exc:  # export raises many unrelated types; all mean the same here
        where = _user_frame(exc)
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}"
            f"{' at ' + where if where else ''}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
            "What to do: make forward() traceable by torch.export: replace Python `if` on "
            "tensor values with torch.where or torch.cond, do not call .item(), print or "
            "numpy() on tensors inside forward; the first sample input must be [batch, seq] "
            "and forward must return a tensor (or a Hugging Face model output)."
        ) from exc
    finally:
        model.train(was_training)
    gm = program.module()
    check_token_ids(gm, sample_inputs[0], "sample input", TraceError)
    _own_weights(gm)
    return Traced(graph_module=gm, param_prefix="model." if hf else "", is_hf=hf,
                  sample_inputs=sample_inputs)
