"""An ONNX decoder with a key/value cache, for generating token by token in onnxruntime.

`to_onnx_decoder(model, path)` exports a Hugging Face causal LM (the sub-network of
`sliced_hf` or `to_hf`) as one graph:

    inputs   input_ids [batch, seq], past_key_i / past_value_i [batch, kv_i, past, head_dim]
    outputs  logits [batch, seq, vocab], present_key_i / present_value_i
             [batch, kv_i, past + seq, head_dim]

for every layer i, with kv_i the key/value heads that layer keeps (they may differ between
layers). Batch, sequence and past length are dynamic; the first step passes a past of
length 0. Before the file is written, onnxruntime's outputs are checked against PyTorch's on
a prompt (empty past) and on a step with a past; a failed check or an interrupted export
leaves no file behind. `OrtDecoder` (export/generate.py) runs it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._atomic import write_atomic
from ..errors import ExportError, OutputError
from .onnx import compare, export_program


class _Step(nn.Module):
    """forward(input_ids, past) -> (logits, *presents), past and presents flat (k0, v0, k1, ...)."""

    def __init__(self, model: nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_arg: cache})
        return (out.logits, *present(out))


def present(out) -> list[torch.Tensor]:
    """The cache of a Hugging Face output as flat [k0, v0, k1, v1, ...]."""
    cache = getattr(out, "cache", None)  # transformers 5; 4.x: past_key_values
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ExportError(f"{type(out).__name__} holds no DynamicCache (got "
                          f"{type(cache).__name__}); the ONNX decoder needs a class that "
                          "returns one with use_cache=True")
    return [t for layer in layers for t in (layer.keys, layer.values)]


def cache_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(key/value heads, head size) of each layer's cache, read off a one-token forward."""
    with torch.inference_mode():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    flat = present(out)
    return [(int(k.shape[1]), int(k.shape[3])) for k in flat[::2]]


def to_onnx_decoder(model: nn.Module, path: str | os.PathLike, *, check: bool = True,
                    tol: float = 1e-4, overwrite: bool = False) -> Path:
    """Write `model` (a Hugging Face causal LM) to `path` as an ONNX decoder with past and
    present keys and values per layer (see the module's docstring).

    Example:
        >>> to_onnx_decoder(sliced_hf(em, 0.5), "decoder.onnx")   # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name ending in .onnx")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    model = model.eval()
    shapes = cache_shapes(model)
    step = _Step(model, len(shapes)).eval()
    inputs = _inputs(model, shapes, batch=1, seq=2, past=3)
    batch, seq, past = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
    dynamic = ({0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in range(2 * len(shapes))))
    names = ["input_ids"] + [f"past_{kv}_{i}" for i in range(len(shapes))
                             for kv in ("key", "value")]
    outputs = ["logits"] + [f"present_{kv}_{i}" for i in range(len(shapes))
                            for kv in ("key", "value")]
    proto = export_program(step, inputs, dynamic, names=names)
    if [o.name for o in proto.graph.output] != outputs:  # names follow the order of outputs
        for o, name in zip(proto.graph.output, outputs):
            _rename(proto.graph, o.name, name)
    blob = proto.SerializeToString()
    if check:
        _check(step, blob, model, shapes, tol)
    return write_atomic(path, blob)


def _rename(graph, old: str, new: str) -> None:
    """Rename value `old` to `new` in `graph` and in the subgraphs of its nodes (an `If`'s
    branches read outer values by name)."""
    for node in graph.node:
        node.output[:] = [new if n == old else n for n in node.output]
        node.input[:] = [new if n == old else n for n in node.input]
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                _rename(sub, old, new)
    for o in (*graph.output, *graph.value_info):
        if o.name == old:
            o.name = new


def _inputs(model, shapes, batch: int, seq: int, past: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    vocab = min(int(getattr(model.config, "vocab_size", 2)), 1000)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    cache = tuple(torch.randn(batch, kv, past, hd, generator=gen) for kv, hd in shapes
                  for _ in range(2))
    return ids, cache


def _check(step, blob: bytes, model, shapes, tol: float) -> None:
    """onnxruntime against PyTorch on a prompt with an empty past, and on a step of two
    rows with a past."""
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch, seq, past in ((1, 5, 0), (2, 1, 4)):
        ids, cache = _inputs(model, shapes, batch, seq, past, seed=1)
        with torch.inference_mode():
            want = step(ids, cache)
        got = session.run(None, dict(zip(names, [t.numpy() for t in (ids, *cache)])))
        compare(got, want, tol, f"(decoder at batch {batch}, seq {seq}, past {past})")
    if np.isnan(got[0]).any():
        raise ExportError("the decoder gives NaN logits in onnxruntime; the file was not written")


__all__ = ["cache_shapes", "to_onnx_decoder"]
