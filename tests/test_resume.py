"""An interrupted calibration resumes where it stopped and gives the same permutation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import FlextronConfig
from flextron_fx.passes import rank as rank_mod


def _convert(resume=None, n=12):
    calib = torch.randint(0, 128, (12, 8), generator=torch.Generator().manual_seed(5))[:n]
    return flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), calib,
                                   config=FlextronConfig(calibration_batch_size=2),
                                   progress=False, resume=resume)


def _interrupt_in_batch_four(state, monkeypatch):
    """Run _convert(state) and stop it with Ctrl-C inside its fourth batch."""
    calls = {"n": 0}
    real_observer_forward = rank_mod._Observer.forward

    def interrupt(self, x):
        calls["n"] += 1
        if calls["n"] > 3 * 4 + 1:  # 4 blocks observe each batch: stop inside batch 4
            raise KeyboardInterrupt
        return real_observer_forward(self, x)

    monkeypatch.setattr(rank_mod._Observer, "forward", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _convert(state)
    monkeypatch.setattr(rank_mod._Observer, "forward", real_observer_forward)


def test_interrupted_calibration_resumes(tmp_path, monkeypatch):
    reference = _convert()
    state = tmp_path / "calib.safetensors"
    real_observer_forward = rank_mod._Observer.forward
    _interrupt_in_batch_four(state, monkeypatch)
    assert state.is_file(), "progress must be saved when the run is interrupted"
    # what was saved is exactly the sums over the 3 whole batches, nothing of batch 4
    three = tmp_path / "three.safetensors"
    _convert(three, n=6)
    saved, expected = load_file(str(state)), load_file(str(three))
    assert saved.keys() == expected.keys()
    for k in saved:
        assert torch.equal(saved[k], expected[k]), k

    seen = {"n": 0}

    def counting(self, x):
        seen["n"] += 1
        return real_observer_forward(self, x)

    monkeypatch.setattr(rank_mod._Observer, "forward", counting)
    resumed = _convert(state)
    assert seen["n"] == 3 * 4, "only the 3 batches not yet measured run again"
    assert resumed.orders == reference.orders
    for (k, a), (_, b) in zip(reference.graph_module.state_dict().items(),
                              resumed.graph_module.state_dict().items()):
        assert torch.equal(a, b), k


def test_large_sums_are_copied_and_saved_only_when_a_checkpoint_is_due(tmp_path, monkeypatch):
    """Sums over SNAPSHOT_BYTES (Gram matrices) are not copied after every batch: a crash
    keeps the last checkpoint (here none: the interval never passed), and the rerun
    measures everything again and gives the same model."""
    reference = _convert()
    monkeypatch.setattr(rank_mod, "SNAPSHOT_BYTES", 0)
    monkeypatch.setattr(rank_mod, "CHECKPOINT_SECONDS", 1e9)
    copies = {"n": 0}
    real_sums = rank_mod._sums

    def counting_sums(observers):
        copies["n"] += 1
        return real_sums(observers)

    monkeypatch.setattr(rank_mod, "_sums", counting_sums)
    state = tmp_path / "calib.safetensors"
    _interrupt_in_batch_four(state, monkeypatch)
    assert copies["n"] == 0 and not state.is_file()
    resumed = _convert(state)  # 6 batches, one copy: the final checkpoint
    assert copies["n"] == 1 and load_file(str(state))  # the finished sums are kept
    assert resumed.orders == reference.orders


def test_the_checkpoint_interval_grows_with_the_sums_and_slow_writes():
    gb = 2**30
    assert rank_mod.checkpoint_interval(1024) == rank_mod.CHECKPOINT_SECONDS
    assert rank_mod.checkpoint_interval(2 * gb) == 2 * rank_mod.SECONDS_PER_GB
    assert rank_mod.checkpoint_interval(1024, write_seconds=10.0) == 200.0


def test_progress_for_other_data_is_ignored(tmp_path):
    state = tmp_path / "calib.safetensors"
    _convert(state)
    other = torch.randint(0, 128, (12, 8), generator=torch.Generator().manual_seed(6))
    em = flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), other,
                                 config=FlextronConfig(calibration_batch_size=2),
                                 progress=False, resume=state)
    fresh = flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), other,
                                    config=FlextronConfig(calibration_batch_size=2),
                                    progress=False)
    assert em.orders == fresh.orders
