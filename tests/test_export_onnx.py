"""ONNX export of fixed sub-networks: onnxruntime against PyTorch, and nothing half-written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import calibration, output
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import ExportError, OutputError, WidthError
from flextron_fx.export import to_elastic_onnx, to_onnx

ort = pytest.importorskip("onnxruntime")

FAST = ["llama", "bert"]  # a decoder with GQA and SwiGLU, an encoder; the rest: make test-slow


def _convert(arch: str):
    return flextron_fx.flextronize(ZOO[arch](), sample_inputs(arch), calibration(),
                                   progress=False)


def _check_file(em, path, widths):
    """The file's outputs on new shapes equal the materialized sub-network's (1e-4)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dense = em.materialize(widths)
    for batch, seq in ((1, 3), (4, 11)):
        ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seq))
        (got, *_) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
        want = output(dense, ids).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    return got


@pytest.mark.parametrize("arch", FAST)
def test_onnx_equals_pytorch_at_two_budgets(arch, tmp_path):
    em = _convert(arch)
    last = {w: _check_file(em, to_onnx(em, tmp_path / f"{w}.onnx", w), w) for w in (1.0, 0.5)}
    assert not np.allclose(last[1.0], last[0.5], atol=1e-3)  # the budget is in the file
    full, half = (tmp_path / "1.0.onnx").stat().st_size, (tmp_path / "0.5.onnx").stat().st_size
    assert half < full  # sliced weights, not the full ones plus Slice ops


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(set(ZOO) - set(FAST)))
def test_onnx_equals_pytorch_on_the_whole_zoo(arch, tmp_path):
    em = _convert(arch)
    for widths in (1.0, 0.75, 0.5):
        _check_file(em, to_onnx(em, tmp_path / f"{widths}.onnx", widths), widths)


def test_bad_exports_leave_nothing_behind(tmp_path):
    em = _convert("llama")
    target = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        to_onnx(em, target, 0.5, tol=-1.0)  # no file can pass: the check must refuse
    assert list(tmp_path.iterdir()) == []
    name = next(iter(em.ops))
    with pytest.raises(WidthError, match="per-token"):
        to_onnx(em, target, {name: torch.zeros((2, 8), dtype=torch.long)})
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(OutputError, match="folder"):
        to_onnx(em, tmp_path / "d.onnx", 0.5)
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="overwrite"):
        to_onnx(em, target, 0.5)
    assert target.read_bytes() == b"old"
    to_onnx(em, target, 0.5, overwrite=True)
    assert target.stat().st_size > 1000


# ---- one file for every budget ------------------------------------------------------------
def _elastic_file_matches(em, path, settings):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[-1] == "setting"
    outs = []
    for k, widths in enumerate(settings):
        dense = em.materialize(widths)
        for batch, seq in ((1, 3), (3, 10)):
            ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(k))
            (got, *_) = session.run(None, {names[0]: ids.numpy(),
                                           "setting": np.array(k, dtype=np.int64)})
            np.testing.assert_allclose(got, output(dense, ids).numpy(), atol=1e-4, rtol=1e-4)
        outs.append(got)
    return outs


@pytest.mark.parametrize("arch,head_mode,rank", [
    ("llama", "group", 0),
    ("llama", "query", 2),  # least-squares compensation: factors of every width in the file
    pytest.param("phi3", "query", 0, marks=pytest.mark.slow),  # fused qkv, query heads: ~30 s
])
def test_one_elastic_onnx_serves_every_budget(arch, head_mode, rank, tmp_path):
    comp = {"compensate": "all", "compensation_rank": rank} if rank else {}
    em = flextron_fx.flextronize(ZOO[arch](), sample_inputs(arch), calibration(),
                                 config=flextron_fx.FlextronConfig(head_mode=head_mode, **comp),
                                 progress=False)
    name = next(n for n, op in em.ops.items() if op.kind == "mlp")
    mixed = {**em.static_widths(0.75), name: em.ops[name].candidates[0]}  # per-op widths
    settings = [1.0, 0.5, mixed]
    path = to_elastic_onnx(em, tmp_path / "all.onnx", settings)
    outs = _elastic_file_matches(em, path, settings)
    assert not np.allclose(outs[0], outs[1], atol=1e-3)
    single = to_onnx(em, tmp_path / "full.onnx", 1.0).stat().st_size
    assert path.stat().st_size < 1.5 * single  # the full weights once (plus index tables)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(set(ZOO) - {"llama"}))
def test_one_elastic_onnx_on_the_whole_zoo(arch, tmp_path):
    em = _convert(arch)
    settings = [1.0, 0.75, 0.5]
    _elastic_file_matches(em, to_elastic_onnx(em, tmp_path / "all.onnx", settings), settings)


def test_elastic_onnx_refuses_per_token_widths(tmp_path):
    em = _convert("llama")
    name = next(iter(em.ops))
    with pytest.raises(WidthError, match="per-token"):
        to_elastic_onnx(em, tmp_path / "a.onnx", [{name: torch.zeros((2, 8), dtype=torch.long)}])
    with pytest.raises(WidthError, match="at least one"):
        to_elastic_onnx(em, tmp_path / "a.onnx", [])
    assert not (tmp_path / "a.onnx").exists()


def test_the_export_check_feeds_ids_from_the_whole_vocabulary(zoo_converted):
    # ids 0 and 1 alone are special tokens in real tokenizers; a check on nothing else
    # refused a correct SmolLM2 export (2e-4 of the logits' scale apart)
    from flextron_fx.export.onnx import example_inputs

    _, em = zoo_converted("llama")
    (ids,), _ = example_inputs(em, 4, 16)
    assert ids.shape == (4, 16)
    assert 1 < int(ids.max()) < 128 and ids.unique().numel() > 16  # the zoo's vocabulary: 128
