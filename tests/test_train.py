"""Elastic training: sampling, slice-only gradients, losses, checkpoints and exact resume
(in-process SIGTERM and subprocess SIGKILL), and DDP / FSDP equivalence under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_script import tiny_elastic, tokens

from flextron_fx.elastic.ops import WeightSlice
from flextron_fx.errors import FlextronError, TrainingError
from flextron_fx.train import TrainConfig, make_sampler, read_metrics, train_elastic
from flextron_fx.train.loop import accumulate, batch_rows, kd_loss, lm_loss, make_optimizer
from flextron_fx.train.sampling import budget

HERE = Path(__file__).parent
SCRIPT = HERE / "train_script.py"


@pytest.fixture()
def em():
    return tiny_elastic()


def _valid(em, widths) -> bool:
    return set(widths) == set(em.ops) and all(w in em.ops[n].candidates
                                              for n, w in widths.items())


def test_samplers_give_valid_candidates(em):
    gen = torch.Generator().manual_seed(0)
    uni = make_sampler(em, "uniform")
    draws = uni(gen, 200)
    assert all(_valid(em, w) for w in draws)
    for name, op in em.ops.items():  # every candidate of every op shows up
        assert {w[name] for w in draws} == set(op.candidates)
    sand = make_sampler(em, "sandwich")
    first, *rest = sand(gen, 20)
    assert first == {n: op.candidates[0] for n, op in em.ops.items()}
    assert len(rest) == 19 and all(_valid(em, w) for w in rest)
    mat = make_sampler(em, "matformer")
    below_full = min(len(op.candidates) for op in em.ops.values()) - 1
    picks = set()
    for _ in range(20):  # one granularity for every op, never the full network
        step = mat(gen, below_full)
        indices = []
        for w in step:
            assert _valid(em, w) and w != em.full_widths()
            index = {em.ops[n].candidates.index(v) for n, v in w.items()}
            assert len(index) == 1
            indices += index
        assert sorted(indices) == list(range(below_full))  # distinct within a step
        picks.add(indices[0])
    assert picks == set(range(below_full))  # in a random order
    longer = mat(gen, 2 * below_full + 1)  # more samples than granularities: each twice+
    assert len(longer) == 2 * below_full + 1
    assert len({tuple(sorted(w.items())) for w in longer}) == below_full
    full = em.num_params(em.full_widths(), non_embedding=True)
    draw = budget(em, 0.55, 0.75)
    for _ in range(30):
        w = draw(gen)
        assert _valid(em, w)
        assert 0.55 <= em.num_params(w, non_embedding=True) / full <= 0.75


def test_matformer_within_a_budget_range_draws_only_granularities_inside_it(em):
    gen = torch.Generator().manual_seed(0)
    full = em.num_params(em.full_widths(), non_embedding=True)
    below_full = min(len(op.candidates) for op in em.ops.values() if op.kind == "mlp") - 1
    mat, firsts = make_sampler(em, "matformer", kind="mlp"), set()
    for _ in range(20):  # a step of `below_full` samples holds every granularity once
        fractions = [em.num_params(w, non_embedding=True) / full for w in mat(gen, below_full)]
        assert len(set(fractions)) == below_full >= 2
        firsts.add(fractions[0])
    assert len(firsts) == below_full  # in a random order
    fractions = sorted(fractions)
    low, high = fractions[0] - 1e-6, fractions[-2] + 1e-6  # all but the largest
    draws = make_sampler(em, "matformer", (low, high), "mlp")(gen, 3 * (below_full - 1))
    assert sorted({em.num_params(w, non_embedding=True) / full for w in draws}) \
        == fractions[:-1]
    with pytest.raises(FlextronError, match="no granularity below full"):
        make_sampler(em, "matformer", (fractions[-1] + 0.01, 1.0), "mlp")
    with pytest.raises(FlextronError, match="budget range"):
        make_sampler(em, "matformer", (0.9, 0.5), "mlp")
    with pytest.raises(TrainingError, match="would ignore it"):
        train_elastic(em, tokens(), Path("unused"),
                      TrainConfig(steps=1, sampler="uniform", budget_range=(0.4, 0.7)))


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_vary_samples_one_kind_and_keeps_the_other_full(em, kind):
    gen = torch.Generator().manual_seed(0)
    for name in ("uniform", "sandwich", "budget", "matformer"):
        draw = make_sampler(em, name, (0.5, 0.9) if kind == "mlp" else (0.7, 1.0), kind)
        draws = draw(gen, 40)
        assert all(_valid(em, w) for w in draws)
        for n, op in em.ops.items():
            seen = {w[n] for w in draws}
            if op.kind != kind:
                assert seen == {op.full}, (name, n, seen)
            else:
                assert seen == set(op.candidates[:-1]) if name == "matformer" \
                    else len(seen) > 1, (name, n, seen)
    with pytest.raises(TrainingError, match="vary"):
        train_elastic(em, tokens(), Path("unused"), TrainConfig(steps=1, vary="heads"))


def test_same_seed_same_samples_on_every_rank(em):
    a, b = make_sampler(em, "uniform"), make_sampler(em, "uniform")
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert a(ga, 10) == b(gb, 10)


def _slices(em):
    """(parameter, WeightSlice) pairs of the graph."""
    gm = em.graph_module
    return [(gm.get_parameter(path), s) for path, s in em.weight_slices().items()]


def _outside(param: torch.Tensor, slicer: WeightSlice, widths: dict) -> torch.Tensor:
    """Entries of `param` that the slicer drops at `widths`."""
    plan = slicer.plan(widths[slicer.block])
    n = param.shape[slicer.axis]
    keep = torch.zeros(n, dtype=torch.bool)
    if plan is None:
        keep[:] = True
    elif isinstance(plan, int):
        keep[:plan] = True
    else:
        keep[plan] = True
    return param.detach().index_select(slicer.axis, (~keep).nonzero().flatten())


def test_subnetwork_step_touches_only_its_slice(em):
    sub = {n: op.candidates[0] for n, op in em.ops.items()}
    config = TrainConfig(steps=1, loss="lm")
    opt = make_optimizer(em, TrainConfig(steps=1, lr=1e-2))
    for p in em.parameters():
        p.requires_grad_(True)
    accumulate(em, em, tokens(4), [sub], config)
    em.set_widths(sub)
    pairs = _slices(em)
    assert len(pairs) >= 8
    before = [(_outside(p, s, sub).clone(), p) for p, s in pairs]
    for p, s in pairs:
        dropped = _outside(p.grad, s, sub)
        assert dropped.numel() > 0 and torch.count_nonzero(dropped) == 0
        assert torch.count_nonzero(p.grad) > 0  # the kept slice did learn
    opt.step()
    em.set_widths(sub)
    for (old, p), (_, s) in zip(before, pairs):
        assert torch.equal(_outside(p, s, sub), old)
    assert any(not torch.equal(p.detach(), q) for p, q in
               zip(em.parameters(), tiny_elastic().parameters()))


def test_losses_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    direct = torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert torch.allclose(lm_loss(logits, ids), direct)
    t = 2.0
    p = F.softmax(teacher[:, :-1] / t, -1)
    q = F.softmax(logits[:, :-1] / t, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean() * t * t
    assert torch.allclose(kd_loss(logits, teacher, t), kl, atol=1e-6)
    assert kd_loss(teacher, teacher, t).abs() < 1e-6


def test_data_order_is_a_function_of_the_step():
    rows = [batch_rows(s, 4, 10, seed=1) for s in range(10)]
    flat = torch.cat(rows[:5]).tolist()  # 20 rows = two epochs of 10
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert torch.equal(batch_rows(3, 4, 10, seed=1), rows[3])


def test_bad_settings_are_refused(em, tmp_path):
    with pytest.raises(TrainingError, match="sampler"):
        train_elastic(em, tokens(), tmp_path / "a", TrainConfig(steps=1, sampler="nope"))
    with pytest.raises(TrainingError, match="loss"):
        train_elastic(em, tokens(), tmp_path / "a", TrainConfig(steps=1, loss="mse"))
    with pytest.raises(TrainingError, match="fewer than one batch"):
        train_elastic(em, tokens(2), tmp_path / "a", TrainConfig(steps=1, batch=4))
    with pytest.raises(TrainingError, match="LongTensor"):
        train_elastic(em, tokens().float(), tmp_path / "a", TrainConfig(steps=1))
    run = tmp_path / "b"
    train_elastic(em, tokens(), run, TrainConfig(steps=2, checkpoint_every=1), progress=False)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train_elastic(em, tokens(), run, TrainConfig(steps=3), progress=False)
    with pytest.raises(TrainingError, match="different settings"):
        train_elastic(em, tokens(), run, TrainConfig(steps=3, lr=1.0), resume=True,
                      progress=False)


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch=4, samples=2, loss="lm+kd", lr=1e-3, warmup=2,
                       checkpoint_every=2, eval_every=3)


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    whole = tmp_path / "whole"
    train_elastic(tiny_elastic(), tokens(), whole, _cfg(8), heldout=tokens(8, seed=1),
                  progress=False)
    em = tiny_elastic()
    calls = []

    def hook(*_):  # 3 training passes per step; SIGTERM in the middle of step 4
        if torch.is_grad_enabled():  # not the validation forwards
            calls.append(1)
            if len(calls) == 3 * 3 + 2:
                os.kill(os.getpid(), signal.SIGTERM)
    handle = em.register_forward_pre_hook(hook)
    part = tmp_path / "part"
    out = train_elastic(em, tokens(), part, _cfg(8), heldout=tokens(8, seed=1), progress=False)
    handle.remove()
    assert out["status"] == "stopped" and out["step"] == 4
    assert (part / "checkpoints" / "step-0000004").is_dir()
    out = train_elastic(tiny_elastic(), tokens(), part, _cfg(8), heldout=tokens(8, seed=1),
                        resume=True, progress=False)
    assert out["status"] == "done" and out["step"] == 8
    a, b = read_metrics(whole), read_metrics(part)
    assert [r["step"] for r in b] == list(range(9))
    for ra, rb in zip(a, b):
        assert ra.get("loss") == rb.get("loss") and ra.get("val") == rb.get("val")
    assert (part / "curves.png").stat().st_size > 10_000


def _script(*args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1",
               **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_between_checkpoints_then_resume_repeats_every_step(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    ref = _script(whole, 10)
    killed = _script(part, 10, "--sleep", 0.05)
    metrics = part / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill during step 6, after checkpoint 4 (every 2 steps)
        rows = read_metrics(part) if metrics.exists() else []
        if rows and rows[-1]["step"] >= 5:
            break
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert ref.wait(timeout=120) == 0, ref.stdout.read()
    latest = (part / "checkpoints" / "latest").read_text()
    assert latest in ("step-0000004", "step-0000006"), latest
    done_before = read_metrics(part)[-1]["step"]
    assert int(latest.removeprefix("step-")) < done_before < 10  # logged steps were lost
    resumed = _script(part, 10, "--resume")
    assert resumed.wait(timeout=120) == 0, resumed.stdout.read()
    a, b = read_metrics(whole), read_metrics(part)
    assert [r["step"] for r in b] == list(range(11))
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert [r.get("val") for r in a] == [r.get("val") for r in b]
    assert [r.get("sub_params") for r in a] == [r.get("sub_params") for r in b]


def _torchrun(run, steps, parallel):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", str(SCRIPT), str(run), str(steps), "--parallel", parallel]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(tmp_path, parallel):
    single = tmp_path / "single"
    ref = _script(single, 6)
    assert ref.wait(timeout=120) == 0, ref.stdout.read()
    _torchrun(tmp_path / parallel, 6, parallel)
    a, b = read_metrics(single), read_metrics(tmp_path / parallel)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(7))
    for ra, rb in zip(a[1:], b[1:]):
        assert ra["sub_params"] == rb["sub_params"]  # the same sub-networks on every rank
        assert abs(ra["loss_full"] - rb["loss_full"]) < 1e-4
        assert max(abs(x - y) for x, y in zip(ra["loss_sub"], rb["loss_sub"])) < 1e-4
    for name, v in a[-1]["val"].items():
        assert abs(v - b[-1]["val"][name]) < 1e-4
    saved = json.loads((tmp_path / parallel / "checkpoints" / "step-0000006" /
                        "state.json").read_text())
    assert saved["world"] == 2
    shutil.rmtree(tmp_path)
