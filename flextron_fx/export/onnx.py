"""A fixed sub-network as an ONNX file, for any architecture flextronize supports.

`to_onnx(em, path, widths)` materializes the sub-network (sliced weights, plain dense
graph: no Slice ops and no unused weights end up in the file), exports it with torch's
dynamo exporter, keeps the traced graph's dynamic axes (batch and sequence) dynamic, and
checks onnxruntime's outputs against PyTorch's on two input shapes before the file is
written. A failed check or an interrupted export leaves no file behind.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .._atomic import write_atomic
from ..elastic.model import ElasticModel
from ..errors import ExportError, OutputError
from ..trace import vocab_size

log = logging.getLogger(__name__)

_LIMIT = 2 ** 31 - 1  # protobuf's limit on one serialized ONNX model


def to_onnx(em: ElasticModel, path: str | os.PathLike, widths=None, *, check: bool = True,
            tol: float = 1e-4, overwrite: bool = False) -> Path:
    """Write the sub-network at `widths` (default: the current ones) to `path` as ONNX.

    Inputs and outputs are named `input_0`, ... and `output_0`, ...; axes that were dynamic
    when the model was traced (batch, sequence) are dynamic in the file. With `check`,
    onnxruntime's outputs must equal PyTorch's to `tol` times their largest magnitude (at
    least 1; fp32 logits of a 30-layer model differ by ~1e-5 of their scale) on two input
    shapes, or nothing is written.

    Example:
        >>> to_onnx(em, "small.onnx", 0.5)                         # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name ending in .onnx")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    dense = em.materialize(widths)
    inputs, dynamic = example_inputs(em)
    proto = export_program(dense, inputs, dynamic)
    blob = proto.SerializeToString()
    if check:
        _check(dense, blob, em, tol)
    return write_atomic(path, blob)


def example_inputs(em: ElasticModel, batch: int | None = None, seq: int | None = None):
    """(inputs, dynamic shapes) for exporting `em`: one tensor per graph input, shaped as
    traced (dynamic axes at `batch` and `seq` if given). Token ids are drawn from the whole
    table the first input indexes (ids 0 and 1 only, where no table is found): SmolLM2's
    ids 0 and 1 are special tokens, and a sequence of nothing else drives its activations to
    where fp32 kernels differ by 2e-4 of the logits' scale instead of ~2e-6 on text."""
    inputs, dynamic = [], []
    gen = torch.Generator().manual_seed(0)
    vocab = vocab_size(em.graph_module) or 2
    for node in em.graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ExportError(f"graph input {node.name} is not a tensor ({type(val).__name__}); "
                              "only tensor inputs can be exported")
        shape, dims = [], {}
        for d, size in enumerate(val.shape):
            if isinstance(size, int):
                shape.append(size)
                continue
            dims[d] = torch.export.Dim.AUTO
            wanted = batch if d == 0 else seq
            traced = em.sample_shape[d] if d < len(em.sample_shape) else 2
            shape.append(wanted or traced)
        if val.dtype.is_floating_point:
            inputs.append(torch.randn(shape, dtype=val.dtype, generator=gen))
        else:
            high = vocab if not inputs else 2
            inputs.append(torch.randint(0, high, shape, dtype=val.dtype, generator=gen))
        dynamic.append(dims or None)
    return tuple(inputs), tuple(dynamic)


def export_program(module: torch.nn.Module, inputs: tuple, dynamic: tuple | None = None,
                   names: list[str] | None = None, *, optimize: bool = False):
    """`module` at `inputs` as an ONNX ModelProto, by torch's dynamo exporter; the axes in
    `dynamic` (torch.export dynamic shapes) stay dynamic. Every ONNX file of the library
    (sub-networks, the KV-cache decoder, the elastic file, the profiler's timed
    sub-networks) is made here.

    The exporter's own graph optimisation (`optimize`) is off by default: on a SmolLM2
    sub-network it doubled the export time (145 s instead of 68 s on this 2-core CPU) while
    onnxruntime, which optimises the graph when it loads it, ran both files equally fast
    (prefill 1 x 256: 0.541 s and 0.528 s). The elastic file keeps it (docs/RESULTS.md)."""
    chatter = logging.getLogger("torch.onnx")
    level = chatter.level
    with warnings.catch_warnings():  # the exporter's own deprecation chatter
        warnings.simplefilter("ignore")
        chatter.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                module, inputs, dynamo=True, dynamic_shapes=dynamic, optimize=optimize,
                verbose=False, input_names=names or [f"input_{i}" for i in range(len(inputs))])
        except Exception as exc:  # the exporter raises many types; keep its message
            raise ExportError(f"torch.onnx.export failed on {type(module).__name__}: "
                              f"{type(exc).__name__}: {str(exc)[:800]}") from exc
        finally:
            chatter.setLevel(level)  # the caller's logging as it was
    proto = program.model_proto
    if proto.ByteSize() > _LIMIT:
        raise ExportError(f"the model needs {proto.ByteSize() / 2**30:.1f} GiB, over the 2 "
                          "GiB a single ONNX file can hold; export a smaller budget")
    return proto


def _outputs(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict) or hasattr(result, "to_tuple"):
        result = result.to_tuple() if hasattr(result, "to_tuple") else tuple(result.values())
    return [t for t in torch.utils._pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]


def mismatch(got: np.ndarray, want: np.ndarray, tol: float) -> tuple[float, float]:
    """(largest difference, allowed difference): `tol` of the larger of 1 and the largest
    magnitude of `want`."""
    if not want.size:
        return 0.0, tol
    return float(np.max(np.abs(got - want))), tol * max(1.0, float(np.max(np.abs(want))))


def compare(got: list[np.ndarray], want: list[torch.Tensor], tol: float, where: str) -> None:
    """Raise ExportError unless each onnxruntime output has PyTorch's shape and is within
    `tol` of its scale; `where` names the inputs in the message."""
    for i, (g, w) in enumerate(zip(got, want)):
        w = w.detach().numpy()
        if g.shape != w.shape:
            raise ExportError(f"output {i} has shape {g.shape} in onnxruntime but {w.shape} in "
                              f"PyTorch {where}; the file was not written")
        err, allowed = mismatch(g, w, tol)
        if err > allowed:
            raise ExportError(
                f"onnxruntime differs from PyTorch by {err:.2e} in output {i} (allowed "
                f"{allowed:.1e}: {tol:g} of its scale) {where}; the file was not written")


def _check(dense, blob: bytes, em: ElasticModel, tol: float) -> None:
    """onnxruntime against PyTorch on the traced shape and on one more (other batch/seq)."""
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    b, s = em.sample_shape[0], em.sample_shape[1] if len(em.sample_shape) > 1 else None
    for shape in ((b, s), (b + 1, (s + 3) if s else None)):
        inputs, _ = example_inputs(em, *shape)
        with torch.no_grad():
            want = _outputs(dense(*inputs))
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        if len(got) != len(want):
            raise ExportError(f"onnxruntime gives {len(got)} outputs, PyTorch {len(want)}")
        compare(got, want, tol, f"on inputs {[tuple(t.shape) for t in inputs]}")
    log.info("onnxruntime matches PyTorch on %d outputs", len(names))


__all__ = ["example_inputs", "export_program", "to_onnx"]
