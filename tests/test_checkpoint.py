"""save / load of elastic models, and determinism of the conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close, calibration, output, token_ids
from safetensors.torch import load_file
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import CheckpointError, FlextronConfig, OutputError
from flextron_fx.export import checkpoint


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
                                     config=FlextronConfig(head_mode="query"), progress=False)
    a, b = first.graph_module.state_dict(), second.graph_module.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    original = model.state_dict()
    assert any(not torch.equal(a[k], original[k.removeprefix(first.param_prefix)])
               for k in a)  # the permutation did something


# ---- no lost files: refusal of foreign folders, atomic replacement, crash recovery -------

def _dead_pid() -> int:
    """The PID of a process that has exited (so its leftovers count as abandoned)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _load_nano(path):
    return flextron_fx.load(path, model=ZOO["nanogpt"](), sample_inputs=sample_inputs("nanogpt"))


def _two_states(zoo_converted):
    """The nanogpt elastic model at half width (saved first) and at full width."""
    _, em = zoo_converted("nanogpt")
    em.set_widths(0.5)
    half = dict(em.widths)
    em.set_full()
    assert half != em.widths
    return em, half


def test_a_foreign_folder_is_refused_and_kept(zoo_converted, tmp_path):
    _, em = zoo_converted("nanogpt")
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    (mine / "sub" / "data.bin").write_bytes(b"\0" * 10)
    with pytest.raises(OutputError, match=r"notes.txt.*not a flextron checkpoint.*overwrite"):
        flextron_fx.save(em, mine)
    assert (mine / "notes.txt").read_text() == "precious"
    assert (mine / "sub" / "data.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder left
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        flextron_fx.save(em, a_file)
    assert a_file.read_text() == "x"
    flextron_fx.save(em, mine, overwrite=True)  # told to: replaced by the checkpoint
    assert sorted(p.name for p in mine.iterdir()) == ["compensation.safetensors",
                                                     "flextron.json", "model.safetensors"]
    (tmp_path / "empty").mkdir()
    flextron_fx.save(em, tmp_path / "empty")  # an empty folder is fine
    assert _load_nano(tmp_path / "empty").widths == em.widths


def test_crash_while_writing_keeps_the_old_checkpoint(zoo_converted, tmp_path, monkeypatch):
    em, half = _two_states(zoo_converted)
    ckpt = tmp_path / "ckpt"
    em.set_widths(half)
    flextron_fx.save(em, ckpt)
    em.set_full()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        flextron_fx.save(em, ckpt)
    monkeypatch.undo()
    assert _load_nano(ckpt).widths == half
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_crash_during_the_swap_keeps_the_old_checkpoint(zoo_converted, tmp_path, monkeypatch):
    """Where the atomic exchange is not available, the old folder is renamed aside first;
    a failure renaming the new one in must put the old one back."""
    em, half = _two_states(zoo_converted)
    ckpt = tmp_path / "ckpt"
    em.set_widths(half)
    flextron_fx.save(em, ckpt)
    em.set_full()
    try:
        from flextron_fx import _atomic

        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    except ImportError:
        pass
    real_rename, failed = os.rename, []

    def crash_once(src, dst, *a, **kw):
        if Path(dst) == ckpt and not failed:
            failed.append(src)
            raise OSError(5, "Input/output error")
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", crash_once)
    with pytest.raises(OSError, match="Input/output"):
        flextron_fx.save(em, ckpt)
    monkeypatch.undo()
    assert failed, "the new folder was renamed in"
    assert _load_nano(ckpt).widths == half
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_leftovers_of_a_killed_save_are_recovered(zoo_converted, tmp_path):
    """A save killed between moving the old folder aside and renaming the new one in left
    the old one aside and a temporary folder: the next save puts the old one back before
    deciding, and removes the rest."""
    em, half = _two_states(zoo_converted)
    ckpt = tmp_path / "ckpt"
    em.set_widths(half)
    flextron_fx.save(em, ckpt)
    pid = _dead_pid()
    aside = tmp_path / f".ckpt.old-{pid}-abc123"
    aside.mkdir()
    os.rename(ckpt, aside / "x")
    partial = tmp_path / f".ckpt.tmp-{pid}-def456"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    alive = tmp_path / f".ckpt.tmp-{os.getppid()}-ghi789"  # a live writer's: left alone
    alive.mkdir()
    checkpoint.check_target(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", alive.name])
    assert _load_nano(ckpt).widths == half
    em.set_full()
    aside.mkdir()
    os.rename(ckpt, aside / "x")  # killed again, at the same moment
    flextron_fx.save(em, ckpt)  # recovers the old one, then replaces it: nothing refused
    assert _load_nano(ckpt).widths == em.widths
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", alive.name])


def test_replace_folder_swaps_a_checkpoint_in_one_step(tmp_path):
    """On Linux the new folder takes the old one's place with one exchange: no moment
    without a folder under the name, and the old contents are gone afterwards."""
    from flextron_fx import _atomic

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    calls = []
    real = _atomic._exchange

    def spy(a, b):
        calls.append((Path(a).name, Path(b).name, sorted(os.listdir(b))))
        return real(a, b)

    _atomic._exchange = spy
    try:
        with _atomic.replace_folder(target) as tmp:
            (tmp / "new.txt").write_text("new")
    finally:
        _atomic._exchange = real
    assert calls and calls[0][1:] == ("out", ["old.txt"])
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- damaged checkpoints: a CheckpointError that names the file and the way out --------

def _saved_nano(zoo_converted, tmp_path):
    _, em = zoo_converted("nanogpt")
    return flextron_fx.save(em, tmp_path / "nano")


def test_truncated_weights_are_reported(zoo_converted, tmp_path):
    path = _saved_nano(zoo_converted, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    for size in (len(data) // 2, 4):
        weights.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=r"model.safetensors is damaged.*cut short.*"
                                                  r"[Ss]ave the model again"):
            _load_nano(path)


@pytest.mark.parametrize("damage", ["not json", "list", "no ops", "no source", "no widths",
                                    "ops type", "op lacks full", "no aliases", "bad config",
                                    "alias target", "source lacks kind"])
def test_damaged_metadata_is_reported(zoo_converted, tmp_path, damage):
    path = _saved_nano(zoo_converted, tmp_path)
    meta_file = path / "flextron.json"
    meta = json.loads(meta_file.read_text())
    expect = {"not json": "not valid JSON", "list": "holds a list", "no ops": "'ops' is missing",
              "no source": "'source' is missing", "no widths": "'widths' is missing",
              "ops type": "'ops' is a str", "op lacks full": r"op 0 of 'ops' lacks \['full'\]",
              "no aliases": "'aliases' is missing", "bad config": "config does not load",
              "alias target": "names 'nowhere'", "source lacks kind": "'source' lacks 'kind'"}
    if damage == "not json":
        text = meta_file.read_text()[:200]
    elif damage == "list":
        text = "[1, 2]"
    else:
        if damage.startswith("no "):
            del meta[damage.removeprefix("no ")]
        elif damage == "ops type":
            meta["ops"] = "mlp"
        elif damage == "op lacks full":
            del meta["ops"][0]["full"]
        elif damage == "bad config":
            meta["config"]["no_such_field"] = 1
        elif damage == "alias target":
            meta["aliases"] = {"x": "nowhere"}
        else:
            del meta["source"]["kind"]
        text = json.dumps(meta)
    meta_file.write_text(text)
    with pytest.raises(CheckpointError, match=rf"flextron.json is damaged: .*{expect[damage]}"
                                              r".*[Ss]ave the model again"):
        _load_nano(path)


def test_write_atomic_keeps_the_old_file_until_the_new_one_is_complete(tmp_path, monkeypatch):
    from flextron_fx import _atomic

    out = tmp_path / "r.json"
    _atomic.write_atomic(out, "old")

    def fail(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        _atomic.write_atomic(out, "new")
    monkeypatch.undo()
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left
    _atomic.write_atomic(out, b"new")
    assert out.read_text() == "new"
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        _atomic.write_atomic(tmp_path, "x")
