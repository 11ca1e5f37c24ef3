"""save / load of elastic models, and determinism of the conversion."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, calibration, output, token_ids
from safetensors.torch import load_file
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import CheckpointError


def test_roundtrip_at_half_width(zoo_converted, tmp_path):
    _, em = zoo_converted("llama")
    em.set_widths(0.5)
    assert any(w < em.ops[n].full for n, w in em.widths.items())
    flextron_fx.save(em, tmp_path / "ckpt")
    loaded = flextron_fx.load(tmp_path / "ckpt")
    assert loaded.widths == em.widths
    assert list(loaded.ops) == list(em.ops)
    assert loaded.config == em.config
    ids = token_ids(3, 9)
    assert torch.equal(output(loaded, ids), output(em, ids))
    loaded.set_full()
    em.set_full()
    assert torch.equal(output(loaded, ids), output(em, ids))


def test_saved_weights_are_a_full_width_checkpoint_of_the_original(zoo_converted, tmp_path):
    model, em = zoo_converted("llama")
    flextron_fx.save(em, tmp_path / "ckpt")
    fresh = ZOO["llama"]()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "ckpt/model.safetensors"),
                                                strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied weights are aliased
    ids = token_ids(2, 7)
    assert_close(output(fresh, ids), output(model, ids))


def test_overwrites_an_existing_checkpoint(zoo_converted, tmp_path):
    _, em = zoo_converted("llama")
    em.set_widths(0.5)
    flextron_fx.save(em, tmp_path / "ckpt")
    em.set_full()
    flextron_fx.save(em, tmp_path / "ckpt")
    assert flextron_fx.load(tmp_path / "ckpt").widths == em.widths
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left


def test_plain_module_needs_the_model(zoo_converted, tmp_path):
    _, em = zoo_converted("nanogpt")
    em.set_widths(0.5)
    flextron_fx.save(em, tmp_path / "nano")
    with pytest.raises(CheckpointError, match="NanoGPT .*pass model="):
        flextron_fx.load(tmp_path / "nano")
    with pytest.raises(CheckpointError, match="sample_inputs"):
        flextron_fx.load(tmp_path / "nano", model=ZOO["nanogpt"]())
    loaded = flextron_fx.load(tmp_path / "nano", model=ZOO["nanogpt"](),
                              sample_inputs=sample_inputs("nanogpt"))
    assert loaded.widths == em.widths
    ids = token_ids(2, 6)
    assert torch.equal(output(loaded, ids), output(em, ids))


@pytest.mark.parametrize("remove", ["model.safetensors", "flextron.json", "both"])
def test_incomplete_folder(zoo_converted, tmp_path, remove):
    _, em = zoo_converted("nanogpt")
    path = flextron_fx.save(em, tmp_path / "nano")
    for f in (["model.safetensors", "flextron.json"] if remove == "both" else [remove]):
        (path / f).unlink()
    with pytest.raises(CheckpointError, match="expected flextron.json and model.safetensors"):
        flextron_fx.load(path, model=ZOO["nanogpt"](), sample_inputs=sample_inputs("nanogpt"))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a saved elastic model"):
        flextron_fx.load(tmp_path / "nowhere")


def test_checkpoint_of_another_model_is_rejected(zoo_converted, tmp_path):
    _, em = zoo_converted("nanogpt")
    flextron_fx.save(em, tmp_path / "nano")
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    with pytest.raises(CheckpointError, match="does not match"):
        flextron_fx.load(tmp_path / "nano", model=other, sample_inputs=(torch.randn(2, 4, 8),))


def test_same_calibration_gives_identical_weights(zoo_converted):
    model, first = zoo_converted("llama")
    second = flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), calibration(),
                                     progress=False)
    a, b = first.graph_module.state_dict(), second.graph_module.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    original = model.state_dict()
    assert any(not torch.equal(a[k], original[k.removeprefix(first.param_prefix)])
               for k in a)  # the permutation did something
