"""FlextronConfig(debug=True) checks the invariants after every pass and names the culprit."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import FlextronConfig, FlextronError, pipeline


def test_debug_run_passes_on_a_correct_pipeline():
    em = flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), calibration(),
                                 config=FlextronConfig(debug=True), progress=False)
    assert em.ops


def test_a_pass_that_changes_outputs_is_named(monkeypatch):
    real = pipeline.permute

    def broken_permute(gm, analysis, blocks, orders):
        real(gm, analysis, blocks, orders)
        with torch.no_grad():  # forget to permute one consumer: outputs change
            gm.get_parameter(blocks[1].out_proj.weight).mul_(2.0)

    monkeypatch.setattr(pipeline, "permute", broken_permute)
    with pytest.raises(FlextronError, match="pass 'permute' changed the full-width outputs"):
        flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), calibration(),
                                config=FlextronConfig(debug=True), progress=False)
    # without the debug switch the same bug goes unnoticed by flextronize itself
    flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), calibration(),
                            progress=False)
