"""Every error a user can hit names what is wrong and what is allowed."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import flextron_fx
from flextron_fx import (
    CalibrationDataError,
    FlextronError,
    TraceError,
    UnsupportedModelError,
    WidthError,
)

SAMPLE = (torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0)),)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))


@pytest.fixture(scope="module")
def em():
    return flextron_fx.flextronize(_mlp(), SAMPLE, progress=False)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.down(torch.relu(self.up(x)))


def test_data_dependent_control_flow_is_a_trace_error():
    with pytest.raises(TraceError, match="DataDependent") as e:
        flextron_fx.flextronize(DataDependent(), SAMPLE, progress=False)
    msg = str(e.value)
    assert "What to do" in msg and "torch.where or torch.cond" in msg
    # the message points at the line of user code that export could not handle
    line = DataDependent.forward.__code__.co_firstlineno + 1
    assert f"test_errors.py:{line} in forward()" in msg, msg
    assert isinstance(e.value, FlextronError)


@pytest.mark.parametrize("model, x", [
    (nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8)), torch.randint(0, 10, (2, 4))),
    (nn.Linear(8, 8), torch.randn(2, 4, 8)),
], ids=["embedding-norm", "one-linear"])
def test_model_without_blocks_is_unsupported(model, x):
    with pytest.raises(UnsupportedModelError, match="found no MLP or attention block") as e:
        flextron_fx.flextronize(model, (x,), progress=False)
    msg = str(e.value)
    assert type(model).__name__ in msg
    assert "linear -> element-wise -> linear" in msg  # says what would be supported


@pytest.mark.parametrize("frac", [1.5, 0, 0.0, -0.5])
def test_fraction_out_of_range(em, frac):
    with pytest.raises(WidthError, match=r"fraction in \(0, 1\]"):
        em.set_widths(frac)
    assert em.widths == {"block#0": 32}  # unchanged


def test_fraction_picks_smallest_candidate_at_least_that_share(em):
    assert em.ops["block#0"].candidates == (8, 16, 24, 32)
    for frac, width in [(0.2, 8), (0.25, 8), (0.26, 16), (0.5, 16), (0.7, 24), (1.0, 32)]:
        em.set_widths(frac)
        assert em.widths == {"block#0": width}, frac
    em.set_full()


@pytest.mark.parametrize("width", [7, 33, 0, 16.0])
def test_width_not_a_candidate_lists_the_candidates(em, width):
    with pytest.raises(WidthError, match=r"allowed: \[8, 16, 24, 32\]"):
        em.set_widths({"block#0": width})
    with pytest.raises(WidthError, match=r"allowed: \[8, 16, 24, 32\]"):
        em.set_widths([width])
    assert em.widths == {"block#0": 32}


def test_unknown_op_name_suggests_close_names(em):
    with pytest.raises(WidthError, match=r"no elastic op named 'block#7'.*'block#0'"):
        em.set_widths({"block#7": 8})


def test_unknown_op_name_lists_the_allowed_names(em):
    with pytest.raises(WidthError, match="block#0"):
        em.set_widths({"mlp": 8})


def test_wrong_length_list(em):
    with pytest.raises(WidthError, match="got 2 widths for 1 elastic ops"):
        em.set_widths([8, 8])
    with pytest.raises(WidthError, match="got 0 widths for 1 elastic ops"):
        em.set_widths([])


def test_wrong_width_type(em):
    with pytest.raises(WidthError, match="got str"):
        em.set_widths("half")


def test_nan_calibration():
    calib = torch.randn(6, 4, 8)
    calib[1, 2, 3] = float("nan")
    with pytest.raises(CalibrationDataError, match=r"NaN or Inf \(first at index \[1, 2, 3\]\)"):
        flextron_fx.flextronize(_mlp(), SAMPLE, calib, progress=False)


def test_nan_in_a_later_batch_is_found():
    calib = torch.randn(20, 4, 8)
    calib[17, 0, 0] = float("inf")  # batch 3 of batch_size 8 (index within it: 1)
    with pytest.raises(CalibrationDataError, match="NaN or Inf"):
        flextron_fx.flextronize(_mlp(), SAMPLE, calib, progress=False)


@pytest.mark.parametrize("calib, fact", [
    (torch.randn(6, 8), "3-d"),
    (torch.randn(6, 4, 8, 1), "3-d"),
    (torch.randint(0, 4, (6, 4, 8)), "torch.int64"),
    (torch.randn(6, 4, 8, dtype=torch.float64), "torch.float64"),
], ids=["rank2", "rank4", "int", "float64"])
def test_calibration_of_wrong_rank_or_dtype(calib, fact):
    with pytest.raises(CalibrationDataError, match="calibration batch") as e:
        flextron_fx.flextronize(_mlp(), SAMPLE, calib, progress=False)
    msg = str(e.value)
    assert fact in msg and "torch.float32" in msg  # what was given and what is expected


def test_empty_calibration():
    with pytest.raises(CalibrationDataError, match="empty"):
        flextron_fx.flextronize(_mlp(), SAMPLE, torch.randn(0, 4, 8), progress=False)
    with pytest.raises(CalibrationDataError, match="empty"):
        flextron_fx.flextronize(_mlp(), SAMPLE, [], progress=False)


@pytest.mark.parametrize("shape", [(1, 4, 8), (2, 1, 8)])
def test_sample_of_batch_or_seq_one_is_a_trace_error(shape):
    with pytest.raises(TraceError, match=re.escape(f"shape {shape}") + ".*at least 2 sequences"):
        flextron_fx.flextronize(_mlp(), (torch.randn(*shape),), progress=False)


def test_sample_without_batch_axis_is_a_trace_error():
    with pytest.raises(TraceError, match=r"\[batch, seq, \.\.\.\]"):
        flextron_fx.flextronize(_mlp(), (torch.randn(8),), progress=False)
