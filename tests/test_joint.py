"""Joint tuning of routers and backbone (route/joint.py) on tiny zoo models."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    calibration,
    output,
    perturb_routers,
    self_sampled_tokens,
    width_share_costs,
)
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx.errors import TrainingError
from flextron_fx.passes.inject_routers import (
    budget_source,
    inject_routers,
    remove_routers,
    set_budget,
)
from flextron_fx.route import CostTable, load_routers
from flextron_fx.route.joint import Gates, JointConfig, last_regions, save_tuned, tune_jointly
from flextron_fx.route.train import RouterConfig, _Sampling, evaluate_routers, train_routers
from flextron_fx.train.loop import _logits, lm_loss, read_metrics


def _fresh(arch: str = "llama"):
    torch.manual_seed(0)
    return flextron_fx.flextronize(ZOO[arch](), sample_inputs(arch), calibration(),
                                   progress=False)


def _tokens(n: int = 16, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _routed(arch: str, mode: str, seed: int = 3):
    em = _fresh(arch)
    table = CostTable.coerce(em, width_share_costs(em))
    perturb_routers(inject_routers(em, mode, cost=table, seed=seed))
    return em, table


def _sampled_loss(em, ids, budget, seed, gates: bool) -> torch.Tensor:
    set_budget(em, budget)
    with _Sampling(em, torch.Generator().manual_seed(seed), 1.0):
        if gates:
            with Gates(em):
                return lm_loss(_logits(em(ids)), ids)
        return lm_loss(_logits(em(ids)), ids)


@pytest.mark.parametrize("arch, mode", [("llama", "static"), ("gpt2", "dynamic")])
def test_gates_keep_the_forward_pass_and_give_routers_the_real_losss_gradient(arch, mode):
    em, _ = _routed(arch, mode)
    ids = _tokens(4, 10)
    budget = torch.tensor([0.55, 0.7, 0.85, 1.0])
    routers = [p for n, p in em.graph_module.named_parameters() if "router" in n]
    backbone = [p for n, p in em.graph_module.named_parameters() if "router" not in n]
    for p in em.parameters():
        p.requires_grad_(True)
    grads = {}
    for gates in (False, True):
        em.zero_grad(set_to_none=True)
        loss = _sampled_loss(em, ids, budget, seed=7, gates=gates)
        loss.backward()
        grads[gates] = (float(loss.detach()), [p.grad for p in routers], [p.grad for p in backbone])
    # the same sampled sub-networks, bit for bit the same loss
    assert grads[True][0] == grads[False][0]
    # without gates no gradient reaches the routers; with them, every router gets some
    assert all(g is None or not g.any() for g in grads[False][1])
    assert sum(g is not None and bool(g.any()) for g in grads[True][1]) >= len(routers) // 2
    assert any(g is not None and g.any() for g in grads[True][2])  # and the backbone too
    assert len(last_regions(em)) == len(em.ops)


def test_joint_tuning_lowers_the_routed_loss_within_the_budget_and_resumes_exactly(tmp_path):
    em, table = _routed("llama", "static")
    # text the full model samples, measured on itself: 16 sequences are too few for a tiny
    # random model to generalise from, so this checks that tuning fits what it is given
    tokens = self_sampled_tokens(em, n=16, seq=12)
    heldout = tokens[:8]
    before = evaluate_routers(em, heldout, table, (0.6, 0.8), batch=4)
    config = JointConfig(steps=24, batch=4, budget_range=(0.55, 0.9), lr=3e-3,
                         router_lr=1e-2, warmup=2, checkpoint_every=8)
    weights0 = {k: v.clone() for k, v in em.graph_module.state_dict().items()}
    summary = tune_jointly(em, tokens, tmp_path / "a", config, table, heldout=heldout,
                           eval_budgets=(0.6, 0.8), progress=False)
    assert summary["status"] == "done" and summary["budget_range"] == [0.55, 0.9]
    for b in ("0.6", "0.8"):
        assert summary["eval"][b]["loss"] < before[b]["loss"] - 0.3, (b, before, summary)
        # the argmax (not `select`) may overshoot by one candidate of one op (1/24 here)
        step = max(c[1] - c[0] for c in table.costs.values()) / table.full
        assert summary["eval"][b]["cost"] <= float(b) + step + 1e-6
    after = em.graph_module.state_dict()
    changed = {k for k in weights0 if not torch.equal(weights0[k], after[k])}
    assert any("router" in k for k in changed) and any("router" not in k for k in changed)
    rows = read_metrics(tmp_path / "a")
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all(r["router_grad_norm"] > 0 for r in rows)
    assert (tmp_path / "a" / "curves.png").is_file()

    # stopped after one step and resumed in a new process: the same run
    twin, _ = _routed("llama", "static")
    stopped = tune_jointly(twin, tokens, tmp_path / "b", config, table, progress=False,
                           max_seconds=0.0)
    assert stopped["status"] == "stopped" and stopped["step"] == 1
    twin, _ = _routed("llama", "static")
    done = tune_jointly(twin, tokens, tmp_path / "b", config, table, progress=False,
                        resume=True)
    assert done["step"] == 24
    for k, v in twin.graph_module.state_dict().items():
        assert torch.equal(v, after[k]), k
    assert read_metrics(tmp_path / "b") == [
        {**r, "elapsed_s": s["elapsed_s"], "tok_per_s": s["tok_per_s"]}
        for r, s in zip(rows, read_metrics(tmp_path / "b"))]


def test_a_tuned_model_and_its_routers_load_from_one_folder(tmp_path):
    em, table = _routed("llama", "dynamic")
    config = JointConfig(steps=2, batch=4, budget_range=(0.6, 0.9), lr=1e-3, warmup=1)
    tune_jointly(em, _tokens(8, 12), tmp_path / "run", config, table, progress=False)
    save_tuned(em, tmp_path / "final", table)
    ids = _tokens(2, 10, seed=5)
    set_budget(em, 0.7)
    want = output(em, ids)
    again = flextron_fx.load(tmp_path / "final")
    _, loaded, meta = load_routers(again, tmp_path / "final")
    assert meta["extra"]["elastic"] == str(tmp_path / "final") and loaded.full == table.full
    set_budget(again, 0.7)
    assert torch.equal(output(again, ids), want)
    remove_routers(again)
    remove_routers(em)  # and without routers, the tuned backbone itself
    assert torch.equal(output(again, ids), output(em, ids))


def test_joint_tuning_refuses_a_model_without_routers_or_with_capacity_routers(tmp_path):
    em = _fresh("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    with pytest.raises(TrainingError, match="load them first"):
        tune_jointly(em, _tokens(8), tmp_path / "r", JointConfig(steps=1), table,
                     progress=False)
    inject_routers(em, "capacity", cost=table)
    with pytest.raises(TrainingError, match="as dynamic routers"):
        tune_jointly(em, _tokens(8), tmp_path / "r", JointConfig(steps=1), table,
                     progress=False)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_router_training_and_joint_tuning_refuse_a_folder_in_use(tmp_path):
    """Another holder of the run's lock (here this process, through a second open file) is
    training in the folder: both refuse, and leave it as it was."""
    from flextron_fx.train.state import run_lock

    em = _fresh("llama")
    table = CostTable.coerce(em, width_share_costs(em))
    run = tmp_path / "run"
    with run_lock(run):
        with pytest.raises(TrainingError, match=rf"{run} is in use: process {os.getpid()}"):
            train_routers(em, _tokens(8), run, RouterConfig(steps=1), table, progress=False)
        inject_routers(em, "static", cost=table)
        with pytest.raises(TrainingError, match="is in use"):
            tune_jointly(em, _tokens(8), run, JointConfig(steps=1), table, progress=False)
        assert [p.name for p in run.iterdir()] == [".lock"]
    assert not run.exists()  # the holder made it and wrote nothing: gone with the lock


@pytest.mark.parametrize("arch, head_mode", [("llama", "query"), ("llama", "group"),
                                             ("gpt2", "query")])
def test_each_candidates_output_is_the_blocks_output_at_that_width(zoo_converted, arch,
                                                                   head_mode):
    """What joint tuning's gates mix in for candidate k (`ElasticRegion.uniform`, from the
    region's input at the widest width) is the block's output with the block at width k."""
    _, em = zoo_converted(arch, head_mode=head_mode)
    ids = _tokens(2, 9, seed=4)
    regions = last_regions(em)
    seen = {}

    def keep(name):
        def hook(mod, args, out):
            seen[name] = (args, out)
        return hook

    hooks = [r.register_forward_hook(keep(n)) for n, r in regions.items()]
    try:
        output(em, ids)  # full width: every region's input holds every head
        at_full = dict(seen)
        for name, region in regions.items():
            (x, _width, *params), _ = at_full[name]
            widest = len(region.candidates) - 1
            for k, cand in enumerate(region.candidates):
                with em.at({name: cand}):
                    output(em, ids)
                with torch.no_grad():
                    mine = region.uniform(x, k, widest, params)
                torch.testing.assert_close(mine, seen[name][1], rtol=1e-5, atol=1e-5)
    finally:
        for h in hooks:
            h.remove()


def test_freezing_the_backbone_tunes_only_the_routers_on_the_real_loss(tmp_path):
    """`freeze_backbone`: routers learn from the real loss's gradient alone (no surrogate),
    every backbone weight stays bit for bit. Without the latency loss, the real loss of
    text the full model samples is lowest at the widest candidates, so per-token routers
    that get its gradient through the frozen blocks grow wider and the loss falls."""
    em, table = _routed("llama", "dynamic")
    tokens = self_sampled_tokens(em, n=16, seq=12)
    heldout = tokens[:8]
    before = evaluate_routers(em, heldout, table, (0.6,), batch=4)["0.6"]
    weights0 = {k: v.clone() for k, v in em.graph_module.state_dict().items()}
    config = JointConfig(steps=24, batch=4, budget_range=(0.55, 0.9), router_lr=1e-2,
                         latency_weight=0.0, warmup=2, checkpoint_every=8,
                         freeze_backbone=True)
    summary = tune_jointly(em, tokens, tmp_path / "a", config, table, heldout=heldout,
                           eval_budgets=(0.6,), progress=False)
    after = em.graph_module.state_dict()
    changed = {k for k in weights0 if not torch.equal(weights0[k], after[k])}
    assert changed and all("router" in k for k in changed), changed
    rows = read_metrics(tmp_path / "a")
    assert all(r["router_grad_norm"] > 0 for r in rows)
    first, last = (sum(r["expected_cost"] for r in part) / 4 for part in (rows[:4], rows[-4:]))
    assert last > first + 0.05, (first, last)
    assert summary["eval"]["0.6"]["cost"] > before["cost"] + 0.05
    # the same router input as before tuning (the end-of-run budget calibration maps 0.6
    # to whichever input its grid spent least at, as no input spends as little as 0.6)
    budget_source(em).calibration = None
    tuned = evaluate_routers(em, heldout, table, (0.6,), batch=4)["0.6"]
    assert tuned["cost"] > before["cost"] + 0.05 and tuned["loss"] < before["loss"], \
        (before, tuned)
