"""Dynamic routers taught by measured per-token excess (route/measured.py) on tiny models."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, replace

import pytest
import torch
from conftest import saved_real_vocab_llama, self_sampled_tokens, width_share_costs
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx.errors import TrainingError
from flextron_fx.passes.inject_routers import (
    inject_routers,
    remove_routers,
    routers_of,
    set_budget,
)
from flextron_fx.route import CostTable
from flextron_fx.route import measured as M
from flextron_fx.route.routers import DynamicRouter
from flextron_fx.route.train import RouterConfig, token_losses, train_routers
from flextron_fx.train.loop import check_resume, data_fingerprint, read_metrics


def _nll(em, tokens, widths) -> torch.Tensor:
    with torch.no_grad(), em.at(widths):
        out = em(tokens)
    return token_losses(getattr(out, "logits", out), tokens).flatten()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measured_excess_is_each_ops_own_narrowed_loss_minus_full(tmp_path, zoo_converted,
                                                                   arch):
    _, em = zoo_converted(arch)
    tokens = self_sampled_tokens(em, n=6, seq=9)
    excess = M.measure_excess(em, tokens, None, batch=4, progress=False)
    assert excess.keys() == em.ops.keys()
    full = _nll(em, tokens, 1.0)
    for name, e in excess.items():
        cands = em.ops[name].candidates
        assert e.shape == (6 * 8, len(cands))
        assert torch.equal(e[:, -1], torch.zeros(48))
        for k, width in enumerate(cands[:-1]):  # this op at k, every other at full width
            want = _nll(em, tokens, {**{n: em.ops[n].full for n in em.ops}, name: width})
            torch.testing.assert_close(e[:, k], want - full, atol=1e-5, rtol=1e-4)
    assert em.widths == {n: op.full for n, op in em.ops.items()}  # widths restored


def test_an_interrupted_measurement_measures_only_what_is_missing(tmp_path, zoo_converted,
                                                                  monkeypatch):
    _, em = zoo_converted("llama")
    tokens = self_sampled_tokens(em, n=6, seq=7)
    data, path = data_fingerprint(tokens), tmp_path / "measured.pt"
    whole = M.measure_excess(em, tokens, None, batch=2, progress=False)
    mlp = M.measure_excess(em, tokens, path, kinds=("mlp",), batch=2, data=data,
                           progress=False)
    assert set(mlp) == {n for n, op in em.ops.items() if op.kind == "mlp"}
    passes = {"full": 0, "narrowed": 0}
    real_full, real_nll = M.Rerun.full, M.Rerun.nll

    def full(self, ids):
        passes["full"] += 1
        return real_full(self, ids)

    def crash_in_third_batch(self, name, width):
        passes["narrowed"] += 1
        if passes["full"] == 3:
            raise KeyboardInterrupt
        return real_nll(self, name, width)

    monkeypatch.setattr(M.Rerun, "full", full)
    monkeypatch.setattr(M.Rerun, "nll", crash_in_third_batch)
    with pytest.raises(KeyboardInterrupt):
        M.measure_excess(em, tokens, path, batch=2, data=data, progress=False)
    attention = [n for n, op in em.ops.items() if op.kind == "attention"]
    per_batch = sum(len(em.ops[n].candidates) - 1 for n in attention)
    assert passes == {"full": 3, "narrowed": 2 * per_batch + 1}  # none for the MLPs
    # the first two batches were saved; the rest is measured on resuming, nothing twice
    passes.update(full=0, narrowed=0)
    monkeypatch.setattr(M.Rerun, "nll", lambda self, *a: passes.update(
        narrowed=passes["narrowed"] + 1) or real_nll(self, *a))
    both = M.measure_excess(em, tokens, path, batch=2, data=data, progress=False)
    assert passes == {"full": 1, "narrowed": per_batch}
    for n in whole:
        torch.testing.assert_close(both[n], whole[n])
    with pytest.raises(TrainingError, match="other text"):
        M.measure_excess(em, tokens[:2], path, data=data_fingerprint(tokens[:2]),
                         progress=False)


def test_measuring_stops_after_an_op_when_its_time_is_up_and_resumes(tmp_path,
                                                                      zoo_converted):
    _, em = zoo_converted("gpt2")
    tokens = self_sampled_tokens(em, n=4, seq=7)
    data, path = data_fingerprint(tokens), tmp_path / "measured.pt"
    whole = M.measure_excess(em, tokens, None, batch=2, progress=False)
    first, *rest = list(em.ops)
    for _ in range(len(em.ops)):  # one op a call: its rows of one batch, then the next's
        assert M.measure_excess(em, tokens, path, batch=2, data=data, progress=False,
                                max_seconds=0) is None
    saved = torch.load(path, weights_only=True)["excess"]
    assert {n: e.shape[0] for n, e in saved.items()} == {n: 12 for n in em.ops}
    assert M.measure_excess(em, tokens, path, batch=2, data=data, progress=False,
                            max_seconds=0) is None
    saved = torch.load(path, weights_only=True)["excess"]
    assert saved[first].shape[0] == 24 and all(saved[n].shape[0] == 12 for n in rest)
    got = M.measure_excess(em, tokens, path, batch=2, data=data, progress=False)
    for n in whole:
        torch.testing.assert_close(got[n], whole[n])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_narrowed_op_reruns_only_the_graph_downstream_of_its_width(zoo_converted, arch):
    _, em = zoo_converted(arch)
    tokens = self_sampled_tokens(em, n=2, seq=9)
    names = list(em.ops)
    rerun = M.Rerun(em, names)
    ran = []
    real = rerun.interpreter.run_node
    rerun.interpreter.run_node = lambda node: ran.append(node) or real(node)
    with torch.no_grad():
        full = rerun.full(tokens)
        torch.testing.assert_close(full, _nll(em, tokens, 1.0))
        counts = {}
        for name in names:
            ran.clear()
            width = em.ops[name].candidates[0]
            got = rerun.nll(name, width)
            torch.testing.assert_close(got, _nll(em, tokens, {name: width}), atol=1e-6,
                                       rtol=1e-5)
            counts[name] = len(ran)
    graph = len(em.graph_module.graph.nodes)
    assert counts[names[0]] < graph and counts[names[-1]] < graph / 2
    assert [counts[n] for n in names] == sorted((counts[n] for n in names), reverse=True)
    # nothing of the model before the narrowed op runs again: not even the embedding
    assert not any(n.op == "placeholder" for n in ran)


def _teacher(em, n=400, seed=0, others=None, budget_range=(0.45, 0.95), token_weight=1.0):
    """A teacher on random excesses (last column 0) and candidates' width-share costs."""
    g = torch.Generator().manual_seed(seed)
    table = CostTable.coerce(em, width_share_costs(em))
    excess = {}
    for name, op in em.ops.items():
        if others and name in others:
            continue
        e = torch.rand(n, len(op.candidates), generator=g) * torch.rand(n, 1, generator=g)
        e[:, -1] = 0
        excess[name] = e.flip(-1).cumsum(-1).flip(-1)  # narrower costs more
    hidden = {name: torch.randn(n, 8, generator=g) for name in em.ops}
    return M.Teacher(excess, hidden, table, others or {}, budget_range,
                     token_weight=token_weight), table


@pytest.mark.parametrize("budget", [0.5, 0.63, 0.8, 0.95])
def test_targets_spend_the_budget_and_no_choice_within_it_has_less_excess(zoo_converted,
                                                                          budget):
    _, em = zoo_converted("llama")
    teacher, table = _teacher(em)
    rows = torch.arange(400)
    want = teacher.targets(torch.full((400,), budget), rows)
    fixed = table.fixed / table.full
    spent = fixed + teacher.mean_cost(want)
    assert spent <= budget + 1e-6
    assert spent > budget - 0.02  # the budget is spent, not left over
    best = float(teacher.excess_of(want, rows).sum())
    g = torch.Generator().manual_seed(int(budget * 100))
    for _ in range(200):  # random changes of the targets that stay within their cost
        other = {}
        for n, k in want.items():
            shift = torch.randint(-1, 2, k.shape, generator=g)
            other[n] = (k + shift).clamp(0, len(em.ops[n].candidates) - 1)
        if fixed + teacher.mean_cost(other) <= spent + 1e-9:
            assert float(teacher.excess_of(other, rows).sum()) >= best - 1e-4


def test_token_weight_shrinks_targets_toward_one_width_per_op(zoo_converted):
    _, em = zoo_converted("llama")
    rows, budget = torch.arange(400), torch.full((400,), 0.7)
    measured = _teacher(em)[0].targets(budget, rows)
    flat = _teacher(em, token_weight=0.0)[0]
    same = flat.targets(budget, rows)
    for n, k in same.items():  # every position its op's choice for the mean excess
        assert torch.equal(k, k[:1].expand(400)), n
    assert any(not torch.equal(measured[n], k) for n, k in same.items())
    half = _teacher(em, token_weight=0.5)[0]
    for n, e in half.excess.items():  # the mean kept, deviations halved
        torch.testing.assert_close(e.mean(0), flat.excess[n][0])
        torch.testing.assert_close(e - e.mean(0), 0.5 * (_teacher(em)[0].excess[n]
                                                         - flat.excess[n]))
    with pytest.raises(TrainingError, match="token_weight"):
        RouterConfig(steps=1, mode="dynamic", signal="measured", token_weight=1.5).validate()


def test_excess_predicted_from_the_hidden_state_denoises_and_is_cross_fitted():
    """Excess = a linear read of the hidden state + noise as large as the signal: the
    prediction is nearer the noiseless excess than the measurement, a position's own
    measurement does not move its prediction, and the share explained is the signal's."""
    g = torch.Generator().manual_seed(0)
    blocks, per, dim = 6, 200, 12
    n = blocks * per
    h = torch.randn(n, dim, generator=g)
    true = torch.stack([h[:, 0] + 0.5 * h[:, 1] + 2.0, 0.3 * h[:, 0] + 0.5,
                        torch.zeros(n)], -1)
    noise = torch.randn(n, 3, generator=g) * torch.tensor([1.1, 0.33, 0.0])
    excess, hidden = {"op": true + noise}, {"op": h}
    predicted, explained = M.predicted_excess(excess, hidden, blocks)
    got = predicted["op"]
    assert got.shape == (n, 3) and torch.equal(got[:, -1], torch.zeros(n))
    assert ((got - true) ** 2).mean() < 0.1 * ((excess["op"] - true) ** 2).mean()
    assert 0.4 < explained["op"] < 0.6  # signal and noise carry equal variance
    # one position's measurement does not move its own prediction (at a fixed strength:
    # the strength is chosen on every fold's held-out error), only the other folds'
    one = M.predicted_excess(excess, hidden, blocks, alphas=(1.0,))[0]["op"]
    spiked = excess["op"].clone()
    spiked[5] += 100.0
    again = M.predicted_excess({"op": spiked}, hidden, blocks, alphas=(1.0,))[0]["op"]
    torch.testing.assert_close(again[5], one[5], atol=1e-6, rtol=0.0)
    assert (again[per + 7] - one[per + 7]).abs().max() > 0.01
    # one block: folds of parts of it; too few positions: a clear error
    single = M.predicted_excess({"op": excess["op"][:per]}, {"op": h[:per]}, 1)[1]["op"]
    assert 0.3 < single < 0.7
    with pytest.raises(TrainingError, match="--shrink-toward mean"):
        M.predicted_excess({"op": excess["op"][:4]}, {"op": h[:4]}, 1)


def test_targets_shrunk_toward_a_prediction(zoo_converted):
    """With a center per position the targets see center + token_weight x deviation."""
    _, em = zoo_converted("llama")
    base = _teacher(em)[0]
    center = {n: e.flip(0) for n, e in base.excess.items()}  # any per-position center
    table = CostTable.coerce(em, width_share_costs(em))
    for w in (0.0, 0.25):
        t = M.Teacher(base.excess, base.hidden, table, {}, (0.5, 0.9), token_weight=w,
                      center=center)
        for n, e in t.excess.items():
            torch.testing.assert_close(e, center[n] + w * (base.excess[n] - center[n]))
    hidden = RouterConfig(steps=1, mode="dynamic", signal="measured")
    mean = RouterConfig(steps=1, mode="dynamic", signal="measured", shrink_toward="mean")
    assert (hidden.shrink_toward, hidden.token_weight, mean.token_weight) == ("hidden", 0, 0.3)
    with pytest.raises(TrainingError, match="shrink_toward"):
        RouterConfig(steps=1, mode="dynamic", signal="measured",
                     shrink_toward="median").validate()


def test_unmeasured_routers_cost_counts_against_the_budget(zoo_converted):
    _, em = zoo_converted("llama")
    attention = [n for n, op in em.ops.items() if op.kind == "attention"]
    wide = {}
    for n in attention:  # routers that always give the widest candidate
        r = DynamicRouter(n, em.ops[n].candidates, dim=8)
        with torch.no_grad():
            r.w_out.bias[-1] = 10.0
        wide[n] = r
    teacher, table = _teacher(em, others=wide)
    rows = torch.arange(400)
    for budget in (0.7, 0.9):
        want = teacher.targets(torch.full((400,), budget), rows)
        assert set(want) == set(em.ops) - set(attention)
        spent = (table.fixed + sum(table.costs[n][-1] for n in attention)) / table.full \
            + teacher.mean_cost(want)
        assert budget - 0.03 < spent <= budget + 1e-6


def test_fitting_teaches_routers_which_tokens_need_width(zoo_converted):
    """Excess that grows with one direction of the hidden state: fitted routers give the
    tokens along it more width and hit most targets."""
    _, em = zoo_converted("llama")
    g = torch.Generator().manual_seed(0)
    n, dim = 2000, 16
    table = CostTable.coerce(em, width_share_costs(em))
    hidden, excess, routers = {}, {}, {}
    for name, op in em.ops.items():
        h = torch.randn(n, dim, generator=g)
        need = torch.relu(h[:, 0]) * 2 + 0.05  # what narrowing costs this token
        k = len(op.candidates)
        excess[name] = need[:, None] * torch.linspace(1, 0, k)  # narrower costs more
        hidden[name] = h
        routers[name] = DynamicRouter(name, op.candidates, dim=dim, units=32)
    teacher = M.Teacher(excess, hidden, table, {}, (0.5, 0.9))
    params = [p for r in routers.values() for p in r.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    first = None
    for step in range(300):
        rows = torch.randint(0, n, (256,), generator=gen)
        row, grads = M.measured_step(teacher, routers, rows, (0.5, 0.9), gen)
        first = first or row
        for p in params:
            p.grad = grads[p]
        opt.step()
    assert row["agree"] > 0.85 and row["agree"] > first["agree"] + 0.2
    assert row["router_excess"] < first["router_excess"]
    name = next(iter(em.ops))
    h = hidden[name][:, None, :]
    width = routers[name].logits(torch.full((n,), 0.7), h).argmax(-1)[:, 0]
    needy = hidden[name][:, 0] > 0.5
    assert width[needy].float().mean() > width[~needy].float().mean() + 0.5
    # calibrated on the same positions: the input each budget reads spends at most it
    from flextron_fx.route.routers import BudgetSource

    source = BudgetSource()
    source.calibration = teacher.calibration(routers, [x / 100 for x in range(30, 101)])
    costs = dict(zip(source.calibration["inputs"], source.calibration["costs"]))
    for budget in (0.55, 0.7, 0.85):
        spent = costs[source.router_input(budget)]
        assert budget - 0.05 < spent <= budget


def test_router_inputs_are_what_the_routers_read(zoo_converted):
    _, em = zoo_converted("llama")
    tokens = self_sampled_tokens(em, n=3, seq=7)
    routers = inject_routers(em, "dynamic", cost=width_share_costs(em), seed=0)
    try:
        torch.manual_seed(0)
        for r in routers.values():
            with torch.no_grad():
                r.w_hidden.weight.normal_()
                r.w_out.weight.normal_()
        hidden = M.router_inputs(em, routers, tokens, batch=2)
        first = next(iter(routers))  # its input, the embeddings, does not depend on widths
        set_budget(em, 0.6)
        with torch.no_grad():
            em(tokens)
        got = routers[first].last_index[:, :-1].flatten()
        want = routers[first].logits(torch.full((hidden[first].shape[0],), 0.6),
                                     hidden[first][:, None, :]).argmax(-1)[:, 0]
        assert torch.equal(got, want)
        assert all(not r.full for r in routers.values())
    finally:
        remove_routers(em)


def _tiny():
    torch.manual_seed(0)
    model = ZOO["llama"]()
    return flextron_fx.flextronize(model, sample_inputs("llama"), progress=False)


def test_train_routers_with_the_measured_signal_resumes_exactly(tmp_path):
    config = RouterConfig(steps=6, mode="dynamic", batch=2, budget_range=(0.5, 0.9),
                          signal="measured", checkpoint_every=3, lr=1e-2)
    em = _tiny()
    tokens = self_sampled_tokens(em, n=6, seq=8)
    cost = width_share_costs(em)
    done = train_routers(em, tokens, tmp_path / "a", config, cost, progress=False,
                         heldout=tokens[:2], eval_budgets=(0.6,))
    assert done["status"] == "done" and (tmp_path / "a" / "measured.pt").is_file()
    assert (tmp_path / "a" / "curves.png").is_file() and done["eval"]["0.6"]["loss"] > 0
    whole = {k: v.clone() for k, v in em.graph_module.state_dict().items() if "router" in k}
    rows = read_metrics(tmp_path / "a")
    assert len(rows) == 6 and rows[-1]["ce"] < rows[0]["ce"]

    em = _tiny()  # a new process
    stopped = train_routers(em, tokens, tmp_path / "b", config, cost, progress=False,
                            max_seconds=0.0)
    assert stopped["status"] == "stopped"
    em = _tiny()
    again = train_routers(em, tokens, tmp_path / "b", config, cost, progress=False,
                          resume=True)
    assert again["status"] == "done"
    resumed = {k: v for k, v in em.graph_module.state_dict().items() if "router" in k}
    assert whole.keys() == resumed.keys() and whole
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), k
    assert [r["ce"] for r in read_metrics(tmp_path / "b")] == [r["ce"] for r in rows]


def test_static_routers_taught_by_measured_excess_pick_each_ops_cheapest_mean(tmp_path):
    """Static routers with the measured signal learn, for every budget, the per-op widths
    that minimise the summed mean excess at that cost (the Lagrangian choice from the
    measured excess), and no per-token option applies to them."""
    config = RouterConfig(steps=150, mode="static", batch=2, budget_range=(0.5, 0.95),
                          signal="measured", lr=3e-2)
    assert (config.shrink_toward, config.token_weight) == ("mean", 0)
    em = _tiny()
    tokens = self_sampled_tokens(em, n=4, seq=8)
    cost = width_share_costs(em)
    # excess as if measured (a random tiny model gains from narrowing): narrower costs more
    g = torch.Generator().manual_seed(0)
    excess = {}
    for name, op in em.ops.items():
        e = torch.rand(4 * 7, len(op.candidates), generator=g) * 4 * torch.rand(1, generator=g)
        e[:, -1] = 0
        excess[name] = e.flip(-1).cumsum(-1).flip(-1)
    M._write(tmp_path / "s" / M.FILE, excess, data_fingerprint(tokens), em)
    done = train_routers(em, tokens, tmp_path / "s", config, cost, progress=False,
                         heldout=tokens[:2], eval_budgets=(0.6, 0.9))
    assert done["status"] == "done" and "hidden_explains" not in done
    teacher = M.Teacher(excess, {}, CostTable.coerce(em, cost), {}, config.budget_range,
                        token_weight=0.0)
    routers, costs = routers_of(em), []
    for budget in (0.55, 0.7, 0.9):
        want = {n: int(k) for n, k in
                teacher.targets(torch.tensor([budget]), torch.tensor([0])).items()}
        got = {n: int(routers[n].logits(torch.tensor([budget])).argmax()) for n in want}
        assert got == want, budget
        costs.append(teacher.mean_cost({n: torch.tensor([k]) for n, k in want.items()}))
    assert costs[0] < costs[1] < costs[2]  # the targets follow the budget
    assert done["eval"]["0.6"]["cost"] < done["eval"]["0.9"]["cost"] <= 0.9
    for bad in ({"shrink_toward": "hidden"}, {"token_weight": 0.3}):
        with pytest.raises(TrainingError, match="one width per op"):
            RouterConfig(steps=1, mode="static", signal="measured", **bad).validate()


def test_a_run_saved_before_shrink_toward_existed_resumes_only_toward_the_mean(tmp_path):
    """Runs that predate `shrink_toward` shrank toward the mean: resuming one with today's
    default (the hidden state) is refused by name, toward the mean it goes on."""
    old = RouterConfig(steps=6, mode="dynamic", signal="measured", shrink_toward="mean")
    saved = json.loads(json.dumps(asdict(old)))
    del saved["shrink_toward"]
    data = {"blocks": 6, "seq": 8, "sha256": "0"}
    state = {"config": saved, "data": data}
    check_resume(tmp_path, state, old, data)
    with pytest.raises(TrainingError, match="shrink_toward"):
        check_resume(tmp_path, state, replace(old, shrink_toward="hidden"), data)


def test_resuming_compares_only_the_settings_a_runs_signal_reads(tmp_path):
    """A surrogate run saved before the measured signal's fields existed resumes; one that
    differs in a setting it reads is refused, and measured runs ignore surrogate fields."""
    old = RouterConfig(steps=6, mode="dynamic")
    saved = json.loads(json.dumps(asdict(old)))
    for name in ("shrink_toward", "token_weight", "measure"):
        del saved[name]
    data = {"blocks": 6, "seq": 8, "sha256": "0"}
    state = {"config": saved, "data": data}
    check_resume(tmp_path, state, old, data)
    with pytest.raises(TrainingError, match="tau"):
        check_resume(tmp_path, state, replace(old, tau=0.5), data)
    measured = RouterConfig(steps=6, mode="dynamic", signal="measured")
    state = {"config": json.loads(json.dumps(asdict(measured))), "data": data}
    check_resume(tmp_path, state, replace(measured, tau=0.5, memory=64), data)
    with pytest.raises(TrainingError, match="token_weight"):
        check_resume(tmp_path, state, replace(measured, token_weight=0.3), data)


def test_the_measured_signal_refuses_what_it_cannot_teach(zoo_converted):
    with pytest.raises(TrainingError, match="init_from"):
        RouterConfig(steps=1, mode="dynamic", signal="measured", measure=("mlp",)).validate()
    with pytest.raises(TrainingError, match="kinds of ops"):
        RouterConfig(steps=1, mode="dynamic", signal="measured", measure=("ffn",)).validate()
    _, em = zoo_converted("llama")
    inject_routers(em, "dynamic", cost=width_share_costs(em))
    try:
        with pytest.raises(TrainingError, match="has routers"):
            M.measure_excess(em, self_sampled_tokens(em, n=2, seq=5), None, progress=False)
        assert routers_of(em)
    finally:
        remove_routers(em)


def test_cli_train_routers_with_the_measured_signal(tmp_path, capsys):
    """`flextron train-routers --signal measured` on real text of two domains: measured
    excess for every op, a calibration without forward passes, final routers saved."""
    from flextron_fx.cli import main

    em = saved_real_vocab_llama(tmp_path / "elastic")
    run = tmp_path / "routers"
    args = ["train-routers", str(run), "--elastic", str(tmp_path / "elastic"), "--mode",
            "dynamic", "--metric", "params", "--signal", "measured", "--measure-blocks", "3",
            "--domains", "wikipedia", "--steps", "4", "--batch", "2", "--seq", "16",
            "--eval-tokens", "32", "--budget-range", "0.6", "1.0", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args + ["--max-minutes", "0"]) == 0  # stops after measuring one op
        stopped = json.loads((run / "summary.json").read_text())
        assert stopped["status"] == "stopped" and stopped["stage"] == "measuring"
        assert len(torch.load(run / "measured.pt", weights_only=True)["excess"]) == 1
        assert main(args) == 0  # goes on from there
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and len(read_metrics(run)) == 4
    # by default shrunk toward the hidden state's prediction, its share explained reported
    assert set(summary["hidden_explains"]) == set(em.ops)
    assert all(v <= 1 for v in summary["hidden_explains"].values())
    saved = torch.load(run / "measured.pt", weights_only=True)
    assert set(saved["excess"]) == set(em.ops) and saved["data"]["blocks"] == 3
    meta = json.loads((run / "final" / "routers.json").read_text())
    assert meta["mode"] == "dynamic" and meta["extra"]["measure_blocks"] == 3
    calibration = meta["budget_calibration"]
    assert calibration and len(calibration["inputs"]) == len(calibration["costs"]) > 10
    capsys.readouterr()
    assert main(args[:-1] + ["--measure-blocks", "0", "--no-progress"]) == 2
    assert "--measure-blocks" in capsys.readouterr().err
    # static routers from the same measurements (copied: nothing measured again)
    static = tmp_path / "static"
    static.mkdir()
    (static / "measured.pt").write_bytes((run / "measured.pt").read_bytes())
    with_static = [static if a == str(run) else a for a in args]
    with_static[with_static.index("dynamic")] = "static"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(a) for a in with_static]) == 0
    assert json.loads((static / "final" / "routers.json").read_text())["mode"] == "static"
    assert torch.load(static / "measured.pt", weights_only=True)["excess"].keys() == \
        saved["excess"].keys()
    json_out = tmp_path / "select.json"
    assert main(["select", str(static), "--budget", "params=0.8", "--json", str(json_out)]) == 0
    assert json.loads(json_out.read_text())
    assert main([str(a) for a in with_static] + ["--shrink-toward", "hidden"]) == 2
    assert "one width per op" in capsys.readouterr().err
