"""`flextron export`: budgets to widths, ONNX and Hugging Face outputs, clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import calibration, output
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import cli
from flextron_fx.export.commands import uniform_for_budget


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    em = flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), calibration(),
                                 progress=False)
    path = tmp_path_factory.mktemp("elastic") / "llama"
    flextron_fx.save(em, path)
    return em, path


def test_a_params_budget_picks_the_largest_uniform_widths_within_it(saved):
    em, _ = saved
    full = em.num_params(1.0, non_embedding=True)
    widths = uniform_for_budget(em, "params=0.6")
    used = em.num_params(widths, non_embedding=True)
    assert used <= 0.6 * full
    fractions = sorted({c / op.full for op in em.ops.values() for c in op.candidates})
    bigger = [f for f in fractions if em.num_params(f, non_embedding=True) > used]
    assert bigger and em.num_params(bigger[0], non_embedding=True) > 0.6 * full
    with pytest.raises(flextron_fx.ProfileError, match="smallest costs"):
        uniform_for_budget(em, "params=0.01")
    with pytest.raises(flextron_fx.ProfileError, match="--lut"):
        uniform_for_budget(em, "latency=0.5")


def test_export_onnx_from_the_command_line(saved, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    em, path = saved
    (tmp_path / "w.json").write_text(json.dumps({"budget": 0.5, "metric": "params",
                                                 "widths": em.static_widths(0.5)}))
    out = tmp_path / "half.onnx"
    assert cli.main(["export", str(path), "--widths", str(tmp_path / "w.json"),
                     "--out", str(out)]) == 0
    assert "checked in onnxruntime" in capsys.readouterr().out
    ids = torch.randint(0, 128, (2, 9))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    np.testing.assert_allclose(got, output(em.materialize(0.5), ids).numpy(), atol=1e-4,
                               rtol=1e-4)
    assert cli.main(["export", str(path), "--fraction", "0.5", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "nothing"), "--fraction", "0.5",
                     "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert cli.main(["export", str(path), "--widths", str(tmp_path / "bad.json"),
                     "--out", str(tmp_path / "x.onnx")]) == 2
    assert "JSON object" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_export_hf_loads_in_plain_transformers(saved, tmp_path):
    em, path = saved
    out = tmp_path / "hf"
    assert cli.main(["export", str(path), "--fraction", "0.5", "--format", "hf",
                     "--out", str(out)]) == 0
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import sys, torch, transformers\n"
              f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
              f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
              "with torch.no_grad(): logits = m(ids).logits\n"
              f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
              "assert 'flextron_fx' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    got = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(got, output(em.materialize(0.5), ids), atol=1e-5, rtol=1e-5)


def test_widths_files_plain_or_from_select(saved, tmp_path):
    import argparse

    from flextron_fx.export.commands import _widths

    em, _ = saved
    half = em.static_widths(0.5)
    for i, content in enumerate((half, {"budget": 0.5, "metric": "params", "widths": half})):
        (tmp_path / f"{i}.json").write_text(json.dumps(content))
        args = argparse.Namespace(fraction=None, widths=str(tmp_path / f"{i}.json"))
        assert _widths(em, args) == half
