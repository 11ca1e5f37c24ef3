"""Issue 16, item 7: bad inputs get a clear error (or just work) instead of a traceback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close
from torch import nn

import flextron_fx
from flextron_fx import CalibrationDataError, FlextronConfig, TraceError
from flextron_fx.errors import InputError
from flextron_fx.passes.rank import _fingerprint, _Observer

VOCAB = 50


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 16)
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids):
        x = self.emb(ids)
        return self.head(x + self.down(torch.relu(self.up(x))))


def _ids(*shape, hi=VOCAB, seed=0):
    return torch.randint(0, hi, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def em():
    return flextron_fx.flextronize(TinyLM().eval(), (_ids(2, 6),), _ids(8, 6, seed=1),
                                   progress=False)


@pytest.mark.parametrize("bad, shown", [(VOCAB + 3, f"[0, {VOCAB + 3}]"), (-100, "[-100,")])
def test_calibration_ids_outside_the_vocabulary(bad, shown):
    calib = _ids(8, 6, seed=1)
    calib[5, 2] = bad
    with pytest.raises(CalibrationDataError) as e:
        flextron_fx.flextronize(TinyLM().eval(), (_ids(2, 6),), calib, progress=False)
    msg = str(e.value)
    assert shown in msg and f"vocabulary has {VOCAB} entries" in msg, msg
    assert "calibration batch 0" in msg


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_sample_ids_outside_the_vocabulary(bad):
    sample = _ids(2, 6)
    sample[1, 3] = bad
    with pytest.raises(TraceError, match=f"vocabulary has {VOCAB} entries"):
        flextron_fx.flextronize(TinyLM().eval(), (sample,), progress=False)


def test_one_dimensional_ids_say_how_to_add_the_batch_axis(em):
    with pytest.raises(InputError, match=r"\[batch, seq\].*ids\.unsqueeze\(0\)"):
        em(_ids(6))
    with torch.no_grad():  # the suggested fix works
        assert em(_ids(6).unsqueeze(0)).shape == (1, 6, VOCAB)


def test_numpy_integer_widths_are_accepted(em):
    op = next(iter(em.ops.values()))
    small = op.candidates[0]
    em.set_widths({op.name: np.int64(small)})
    assert em.widths[op.name] == small and type(em.widths[op.name]) is int
    em.set_widths([np.int32(op.full)])
    assert em.widths[op.name] == op.full
    em.set_widths(np.float64(0.5))
    em.set_widths(np.int64(1))  # a uniform fraction of 1
    assert em.widths[op.name] == op.full
    assert em.num_params({op.name: np.int64(small)}) < em.num_params(1.0)


@pytest.mark.parametrize("field, value", [("calibration_batch_size", 8.0),
                                          ("calibration_batch_size", "8"),
                                          ("seed", 1.5), ("seed", None),
                                          ("calibration_batch_size", True)])
def test_config_rejects_non_integer_batch_size_and_seed(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an int, got {value!r}"):
        FlextronConfig(**{field: value})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_calibration_in_half_precision(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    sample = (torch.randn(2, 4, 8, generator=g).to(dtype),)
    calib = torch.randn(16, 4, 8, generator=g).to(dtype)
    em = flextron_fx.flextronize(model, sample, calib, progress=False)
    x = torch.randn(3, 5, 8, generator=g).to(dtype)
    with torch.no_grad():
        assert em(x).dtype == dtype
        assert_close(em(x).float(), model(x).float())
        em.set_widths(0.5)
        assert_close(em(x).float(), em.materialize()(x).float())
    # the resume fingerprint tells half-precision batches apart by value and dtype
    a = _fingerprint([calib], "contribution")
    assert a != _fingerprint([calib.clone().index_fill_(0, torch.tensor([0]), 1)],
                             "contribution")
    assert a != _fingerprint([calib.float()], "contribution")


def test_observer_accumulates_on_the_device_of_its_inputs():
    """The sums follow the activations (CUDA in real use; "meta" here, which no CPU tensor
    can be added to)."""
    w = torch.randn(8, 6)
    lay = ("atom", 0, 6)
    obs = _Observer(lay, lambda: w.to("meta"), 1, {"contribution"})
    obs.set_heads(torch.tensor([0, 0, 0, 1, 1, 1]), (1, 2))
    obs(torch.randn(2, 3, 6, device="meta"))
    assert all(s.device.type == "meta" for s in obs.sums.values())
    assert obs.heads["contribution"].device.type == "meta"
    assert all(c.device.type == "meta" for c in obs._columns("meta"))
