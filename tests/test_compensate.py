"""Per-width bias compensation (passes/compensate.py) and the importance-score registry
(passes/scores.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, calibration, output
from hypothesis import given, settings
from hypothesis import strategies as st
from tqdm.auto import tqdm
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import FlextronConfig
from flextron_fx.elastic.compensation import Compensation
from flextron_fx.passes import scores as S
from flextron_fx.passes.compensate import compensation_modules

BATCH, SEQ = 2, 6


class SwiGLU(torch.nn.Module):
    """One gated MLP, token-wise: each token's output depends on that token alone."""

    def __init__(self, d: int = 8, hidden: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate = torch.nn.Linear(d, hidden, bias=False)
        self.up = torch.nn.Linear(d, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, d, bias=False)

    def hidden(self, x):
        return torch.nn.functional.silu(self.gate(x)) * self.up(x)

    def forward(self, x):
        return self.down(self.hidden(x))


def _converted(name: str, head_mode: str, **cfg):
    model = ZOO[name]()
    em = flextron_fx.flextronize(model, sample_inputs(name), calibration(),
                                 config=FlextronConfig(head_mode=head_mode, **cfg),
                                 progress=False)
    return model, em


_CACHE: dict = {}


def converted(name: str, head_mode: str = "group", **cfg):
    cfg.setdefault("compensate", "all")
    cfg.setdefault("compensation_rank", 0)  # the mean bias; the least-squares tests ask
    key = (name, head_mode, tuple(sorted(cfg.items())))
    if key not in _CACHE:
        _CACHE[key] = _converted(name, head_mode, **cfg)
    return _CACHE[key]


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def test_every_block_gets_a_compensation_node_with_k_minus_1_rows():
    _, em = converted("llama")
    comps = {m.block: m for m in compensation_modules(em.graph_module).values()}
    assert set(comps) == set(em.ops)
    for name, op in em.ops.items():
        assert comps[name].bias.shape == (len(op.candidates) - 1, 64)
        assert comps[name].bias.abs().sum() > 0  # measured, not left at zero


@pytest.mark.parametrize(("arch", "mode"), [("llama", "group"), ("llama", "query"),
                                            ("gpt2", "query")])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_compensated_elastic_equals_materialize_at_every_width(arch, mode, data):
    _, em = converted(arch, mode)
    widths = {n: data.draw(st.sampled_from(op.candidates), label=n) for n, op in em.ops.items()}
    ids = _ids(data.draw(st.integers(0, 2**16)))
    with em.at(widths):
        elastic = output(em, ids)
    dense = em.materialize(widths)
    assert not any(isinstance(m, Compensation) for m in dense.modules())
    assert_close(output(dense, ids), elastic)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_width_is_unchanged_bit_for_bit(arch):
    """Full width: compensated and uncompensated conversions give identical logits."""
    _, with_comp = converted(arch, "query")
    _, without = converted(arch, "query", compensate=False)
    assert not compensation_modules(without.graph_module)
    ids = _ids(5)
    with_comp.set_full()
    without.set_full()
    assert torch.equal(output(with_comp, ids), output(without, ids))
    # and at a smaller width the compensation changes the output
    with with_comp.at(0.5), without.at(0.5):
        assert not torch.allclose(output(with_comp, ids), output(without, ids))


@pytest.mark.parametrize(("arch", "which"), [("llama", "mlp"), ("llama", "attention"),
                                             ("gpt2", "mlp"), ("gpt2", "attention")])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_per_token_routed_equals_per_token_materialize(arch, which, seed):
    """One op of the last layer takes a width per token; each token must equal the dense
    model materialized at that token's width (with that width's compensation row)."""
    _, em = converted(arch, "group" if arch == "llama" else "query")
    name = [n for n, op in em.ops.items() if op.kind == which][-1]
    cands = em.ops[name].candidates
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(len(cands), (BATCH, SEQ), generator=g)
    ids = _ids(seed)
    with em.at({name: index}):
        out = output(em, ids)
    refs = torch.stack([output(em.materialize({name: c}), ids) for c in cands])
    ref = refs[index, torch.arange(BATCH)[:, None], torch.arange(SEQ)[None]]
    assert_close(out, ref)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16),
       mlp_score=st.sampled_from([n for n in S.names("mlp") if n != "taylor"]))
def test_bias_equals_the_expected_removed_contribution_by_hand(seed, mlp_score):
    """One SwiGLU MLP: the bias of width w is sum over the neurons stored after the first w
    of mean(h_j) * W_down[:, j], computed here from the original model and the stored
    order; and adding it makes the mean output at width w equal the full model's mean on
    the calibration data."""
    model = SwiGLU(seed=seed % 97)
    g = torch.Generator().manual_seed(seed)
    calib = torch.randn(16, 5, 8, generator=g)
    em = flextron_fx.flextronize(model, (calib[:2],), calib,
                                 config=FlextronConfig(mlp_multiple=8, mlp_score=mlp_score,
                                                       compensate="mlp", compensation_rank=0),
                                 progress=False)
    (name,) = em.ops
    order = torch.tensor(em.orders[name]["neurons"])  # stored neuron p = original order[p]
    (comp,) = compensation_modules(em.graph_module).values()
    with torch.no_grad():
        mean = model.hidden(calib).reshape(-1, 32).double().mean(0)
        w = model.down.weight.double()
        for k, width in enumerate(em.ops[name].candidates[:-1]):
            removed = order[width:]
            expected = w[:, removed] @ mean[removed]
            torch.testing.assert_close(comp.bias[k].double(), expected, atol=1e-5, rtol=1e-5)
            with em.at({name: width}):
                got = em(calib).reshape(-1, 8).double().mean(0)
            torch.testing.assert_close(got, model(calib).reshape(-1, 8).double().mean(0),
                                       atol=1e-5, rtol=1e-5)


def test_save_load_keeps_the_biases(tmp_path):
    _, em = converted("llama")
    with torch.no_grad():  # as if training had moved them
        for m in compensation_modules(em.graph_module).values():
            m.bias.add_(0.01)
    em.set_widths(0.5)
    flextron_fx.save(em, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "compensation.safetensors").is_file()
    loaded = flextron_fx.load(tmp_path / "ckpt")
    before = {m.block: m.bias for m in compensation_modules(em.graph_module).values()}
    after = {m.block: m.bias for m in compensation_modules(loaded.graph_module).values()}
    assert before.keys() == after.keys()
    for k, bias in before.items():
        assert torch.equal(bias, after[k])
    ids = _ids(1)
    assert_close(output(loaded, ids), output(em, ids))
    em.set_full()


def test_to_hf_puts_the_biases_on_the_output_projections():
    """SmolLM2's family (Llama) has no output-projection biases: to_hf switches them on
    and the rebuilt Hugging Face model equals the compensated elastic one."""
    from flextron_fx.export.hf import to_hf

    _, em = converted("llama")
    ids = _ids(4)
    for f in (0.5, 0.25):
        small = to_hf(em, f)
        assert small.config.mlp_bias and small.config.attention_bias
        with em.at(f):
            assert_close(output(small, ids), output(em, ids))
    assert not to_hf(em, 1.0).config.attention_bias  # full width: no bias needed


def test_to_hf_of_a_class_without_bias_flags_gives_the_flextron_class_with_biases():
    """Mistral's config has no mlp_bias / attention_bias: the compensated sub-network is
    a Flextron<Class> whose layout adds the output-projection biases."""
    from flextron_fx.export.hf import to_hf

    _, em = converted("mistral")
    ids = _ids(4)
    small = to_hf(em, 0.5)
    assert type(small).__name__ == "FlextronMistralForCausalLM"
    down = em.block(next(n for n, op in em.ops.items() if op.kind == "mlp")).out_proj
    assert small.get_parameter(down.weight[len(em.param_prefix):].removesuffix("weight")
                               + "bias").abs().sum() > 0
    with em.at(0.5):
        assert_close(output(small, ids), output(em, ids))
    assert type(to_hf(em, 1.0)).__name__ == "MistralForCausalLM"  # no bias at full width


@pytest.mark.parametrize("train", [True, False])
def test_train_elastic_trains_the_biases_only_when_asked(tmp_path, train):
    from flextron_fx.train import TrainConfig, train_elastic

    _, em = _converted("llama", "group", compensate="all")
    comps = list(compensation_modules(em.graph_module).values())
    before = [m.bias.detach().clone() for m in comps]
    weight = em.graph_module.get_parameter(em.block(next(iter(em.ops))).out_proj.weight)
    w0 = weight.detach().clone()
    config = TrainConfig(steps=2, batch=4, samples=2, warmup=1, lr=1e-2, checkpoint_every=5,
                         eval_every=5, train_compensation=train)
    data = torch.randint(0, 128, (16, 8), generator=torch.Generator().manual_seed(0))
    train_elastic(em, data, tmp_path / "run", config, progress=False)
    moved = [not torch.equal(b, m.bias.detach()) for b, m in zip(before, comps)]
    assert any(moved) == train
    assert not torch.equal(w0, weight.detach())  # the weights trained either way


# ---- scores: each ranks a hand-built case correctly ------------------------------------

def _mlp_stats(h: torch.Tensor, grad: torch.Tensor | None = None) -> S.Stats:
    h = h.double()
    taylor = None if grad is None else (h * grad.double()).abs().sum(0)
    return S.Stats(h.shape[0], h.abs().sum(0), h.sum(0), h.pow(2).sum(0), taylor)


def test_a_neuron_that_never_fires_scores_lowest_under_every_mlp_score():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 6, generator=g)
    h[:, 2] = 0.0  # dead neuron
    w = torch.randn(4, 6, generator=g)
    stats = _mlp_stats(h, torch.randn(64, 6, generator=g))
    for name in S.names("mlp"):
        s = S.evaluate(name, "mlp", stats, w)
        assert int(s.argmin()) == 2, name


def test_scores_that_see_the_weight_rank_a_zero_column_lowest():
    """A neuron that fires hard but whose down-projection column is zero contributes
    nothing: scores that read the weight (act_x_norm, wanda, fluctuation) rank it last,
    the plain activation score ranks it first."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 5, generator=g)
    h[:, 0] *= 10
    w = torch.randn(3, 5, generator=g)
    w[:, 0] = 0
    stats = _mlp_stats(h)
    for name in ("act_x_norm", "wanda", "fluctuation"):
        assert int(S.evaluate(name, "mlp", stats, w).argmin()) == 0, name
    assert int(S.evaluate("activation", "mlp", stats, w).argmax()) == 0


def test_fluctuation_ranks_a_constant_neuron_lowest():
    """A neuron with a large constant output carries no information: its variance is 0
    (compensation adds its mean back), though its activation is the largest."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(64, 4, generator=g)
    h[:, 1] = 5.0
    stats = _mlp_stats(h)
    w = torch.ones(3, 4)
    assert int(S.evaluate("fluctuation", "mlp", stats, w).argmin()) == 1
    assert int(S.evaluate("activation", "mlp", stats, w).argmax()) == 1


def test_head_scores_rank_a_silent_head_lowest():
    """Two groups of two heads, two channels each; head 3 outputs zeros."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(32, 8, generator=g)
    h[:, 6:] = 0
    head_of = torch.arange(8) // 2
    grad = torch.randn(32, 8, generator=g)
    w = torch.randn(5, 8, generator=g).double()
    stats = _mlp_stats(h, grad)
    stats.head_of, stats.shape = head_of, (2, 2)
    per_head = torch.zeros(32, 4).index_add_(1, head_of, h * grad)
    contrib = torch.stack([(h[:, head_of == k].double() @ w[:, head_of == k].t()).norm(dim=1)
                           .sum() for k in range(4)])
    stats.heads = {"taylor": per_head.abs().sum(0).double(), "contribution": contrib}
    for name in S.names("attention"):
        s = S.evaluate(name, "attention", stats, w)
        assert s.shape == (2, 2)
        assert int(s.reshape(-1).argmin()) == 3, name


def test_taylor_measured_in_rank_matches_autograd_by_hand():
    """`rank` with the Taylor score on a tiny LM: the per-neuron sum |h * dL/dh| equals
    the same computed with autograd directly on the original model."""
    from flextron_fx.analyze import analyze
    from flextron_fx.passes.rank import lm_loss, measure
    from flextron_fx.trace import trace

    model = ZOO["llama"]()
    calib = calibration(n=4)
    traced = trace(model, sample_inputs("llama"))
    analysis = analyze(traced.graph_module, traced.sample_inputs)
    mlp = [b for b in analysis.blocks if b.kind == "mlp"][-1]
    stats = measure(traced.graph_module, analysis, analysis.blocks, calib, measures={"taylor"},
                    batch_size=2, sample_inputs=traced.sample_inputs, progress=False)
    seen = []
    down = model.model.layers[-1].mlp.down_proj

    def keep(module, inputs, out):
        inputs[0].retain_grad()
        seen.append(inputs[0])

    hook = down.register_forward_hook(keep)
    expected = torch.zeros(96, dtype=torch.float64)
    try:
        for batch in calib.split(2):
            seen.clear()
            lm_loss(model(batch).logits, batch).backward()
            h = seen[0]
            expected += (h * h.grad).abs().reshape(-1, 96).sum(0).double()
    finally:
        hook.remove()
    torch.testing.assert_close(stats[mlp.name].taylor, expected, rtol=1e-3, atol=1e-6)


def test_taylor_on_a_model_without_a_next_token_loss_is_a_clear_error():
    from flextron_fx.errors import CalibrationDataError

    calib = torch.randn(4, 5, 8)
    with pytest.raises(CalibrationDataError, match="'taylor' score needs a language model"):
        flextron_fx.flextronize(SwiGLU(), (calib[:2],), calib,
                                config=FlextronConfig(mlp_multiple=8, mlp_score="taylor"),
                                progress=False)


def test_compensate_names_the_kinds_of_blocks_that_get_it():
    for kinds, expected in (("mlp", {"mlp"}), ("attention", {"attention"}), (False, set()),
                            (True, {"mlp", "attention"})):
        _, em = converted("llama", compensate=kinds)
        got = {em.ops[m.block].kind for m in compensation_modules(em.graph_module).values()}
        assert got == expected, kinds
    with pytest.raises(ValueError, match="compensate must be one of"):
        FlextronConfig(compensate="heads")


def test_unknown_score_is_a_clear_error():
    with pytest.raises(ValueError, match="mlp_score.*'contribution' is not a score for MLP"):
        FlextronConfig(mlp_score="contribution")
    with pytest.raises(ValueError, match="head_score.*choose one of"):
        FlextronConfig(head_score="wanda")
    assert FlextronConfig.from_json(FlextronConfig(mlp_score="taylor").to_json()).mlp_score \
        == "taylor"


def test_calibration_mix_takes_equal_interleaved_shares(monkeypatch):
    from flextron_fx.data import corpus
    from flextron_fx.data.blocks import calibration_mix

    class Chars:
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    texts = {"wikipedia": [("w", "a" * 40)], "python": [("p", "b" * 40)]}
    monkeypatch.setattr(corpus, "load_split", lambda d, split, cache_dir=None: texts[d])
    calib, source = calibration_mix(Chars(), ["wikipedia", "python"], seq_len=8, n_calib=4)
    assert calib[:, 0].tolist() == [ord("a"), ord("b"), ord("a"), ord("b")]
    assert "wikipedia (2 blocks)" in source and "python (2 blocks)" in source
    with pytest.raises(ValueError, match="unknown domain"):
        calibration_mix(Chars(), ["klingon"], seq_len=8)


# ---- least-squares compensation (compensation_rank > 0) ----

def test_least_squares_reproduces_an_output_the_kept_units_determine():
    """Removed units that are affine functions of the kept ones (rank 2 here): a rank-2
    fit without ridge gives back W h exactly; rank 1 cannot, and is worse than rank 2."""
    from flextron_fx.passes import compensate as C

    g = torch.Generator().manual_seed(0)
    n, kept_n, out = 12, 7, 5
    hk = torch.randn(400, kept_n, generator=g, dtype=torch.float64) + 0.5
    mix = torch.randn(kept_n, 2, generator=g, dtype=torch.float64) @ \
        torch.randn(2, n - kept_n, generator=g, dtype=torch.float64)
    h = torch.cat([hk, hk @ mix + 0.3], dim=1)  # removed = affine in the kept, rank 2
    perm = torch.randperm(n, generator=g)  # the kept units need not be a prefix
    h = h[:, perm]
    kept = torch.argsort(perm)[:kept_n]  # where the kept units went, in the kept order
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    mean, gram = h.mean(0), h.t() @ h / len(h)

    def error(rank, ridge):
        old, C.RIDGE = C.RIDGE, ridge
        try:
            bias, u, v = C.least_squares(w, mean, gram, kept, rank)
        finally:
            C.RIDGE = old
        assert u.shape == (out, min(rank, out)) and v.shape == (kept_n, min(rank, out))
        fit = h[:, kept] @ (w[:, kept] + u @ v.t()).t() + bias
        return (fit - h @ w.t()).abs().max().item()

    assert error(2, 0.0) < 1e-8
    _, u, v = C.least_squares(w, mean, gram, kept[:3], 4)  # fewer kept units than the rank:
    assert u.shape == (out, 4) and v.shape == (3, 4)     # zero columns keep one rank per
    assert not u[:, 3:].any() and not v[:, 3:].any()      # block (the ONNX file stacks them)
    assert error(1, 0.0) > 1e-3
    mean_bias = (h[:, kept] @ w[:, kept].t() + w[:, torch.ones(n, dtype=torch.bool)
                 .index_fill(0, kept, False)] @ mean[torch.ones(n, dtype=torch.bool)
                 .index_fill(0, kept, False)] - h @ w.t()).abs().max().item()
    assert error(1, 0.0) < mean_bias


@pytest.mark.parametrize(("arch", "mode"), [("llama", "group"), ("llama", "query"),
                                            ("gpt2", "query")])
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_low_rank_compensated_elastic_equals_materialize_static_and_per_token(arch, mode, data):
    """Static widths: the elastic graph (low-rank correction inside the regions) equals
    materialize (folded into the weights); per-token widths equal per-token materialize."""
    _, em = converted(arch, mode, compensation_rank=3)
    widths = {n: data.draw(st.sampled_from(op.candidates), label=n) for n, op in em.ops.items()}
    ids = _ids(data.draw(st.integers(0, 2**16)))
    with em.at(widths):
        elastic = output(em, ids)
        again = output(em, ids)  # the cached corrected weights give the same
    assert torch.equal(elastic, again)
    dense = em.materialize(widths)
    assert not any(isinstance(m, Compensation) for m in dense.modules())
    assert_close(output(dense, ids), elastic)
    kind = data.draw(st.sampled_from(["mlp", "attention"]), label="per-token op")
    name = [n for n, op in em.ops.items() if op.kind == kind][-1]  # last: no later mixing
    cands = em.ops[name].candidates
    index = torch.randint(len(cands), (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    with em.at({name: index}):
        out = output(em, ids)
    refs = torch.stack([output(em.materialize({name: c}), ids) for c in cands])
    assert_close(out, refs[index, torch.arange(BATCH)[:, None], torch.arange(SEQ)[None]])


def test_low_rank_compensation_fits_the_full_output_better_than_the_mean():
    """On the calibration tokens, every cut of the tiny Llama is closer to the full model
    with the least-squares correction than with the mean bias alone; full width is the
    same bit for bit; the factors have the rank asked for."""
    _, mean = converted("llama", "query")
    _, ls = converted("llama", "query", compensation_rank=8)
    ids = calibration()[:4]
    with torch.no_grad():
        full = output(mean, ids)
        assert torch.equal(output(ls, ids), full)
        for kind in ("mlp", "attention"):
            ops = {n: op.candidates for n, op in ls.ops.items() if op.kind == kind}
            for k in range(len(next(iter(ops.values()))) - 1):  # every width below the full
                widths = {n: c[k] for n, c in ops.items()}
                with mean.at(widths), ls.at(widths):
                    e_mean = (output(mean, ids) - full).pow(2).mean()
                    e_ls = (output(ls, ids) - full).pow(2).mean()
                assert e_ls < e_mean, (widths, e_ls, e_mean)
    for m in compensation_modules(ls.graph_module).values():
        assert m.rank == 8 and len(m.u) == len(m.candidates) - 1
    for f in (1.0, 0.5, 0.25):  # the factors fold into the sliced weights: no extra count
        widths = ls.resolve(f)
        assert ls.num_params(widths) == mean.num_params(widths) == sum(
            p.numel() for p in ls.materialize(widths).parameters())


def test_the_corrected_weight_follows_changes_to_weights_and_factors():
    """The corrected weight is cached per width without autograd; a factor or the weight
    changed in place (as an optimiser step does) is read on the next call."""
    _, em = _converted("llama", "group", compensate="mlp", compensation_rank=2)
    ids = _ids(2)
    comp = next(iter(compensation_modules(em.graph_module).values()))
    weight = em.graph_module.get_parameter(em.block(comp.block).out_proj.weight)
    with em.at(0.5), torch.no_grad():
        before = output(em, ids)
        comp.u[1].mul_(2)  # candidate 1 of 4 is width 0.5
        after_u = output(em, ids)
        assert not torch.equal(before, after_u)
        weight.add_(0.01)
        assert not torch.equal(after_u, output(em, ids))
        assert_close(output(em.materialize(), ids), output(em, ids))


def test_save_load_and_training_keep_and_move_the_factors(tmp_path):
    from flextron_fx.train import TrainConfig, train_elastic

    _, em = _converted("llama", "group", compensate="all", compensation_rank=2)
    comps = list(compensation_modules(em.graph_module).values())
    before = [m.u[0].detach().clone() for m in comps]
    config = TrainConfig(steps=2, batch=4, samples=2, warmup=1, lr=1e-2, checkpoint_every=5,
                         eval_every=5)
    data = torch.randint(0, 128, (16, 8), generator=torch.Generator().manual_seed(0))
    train_elastic(em, data, tmp_path / "run", config, progress=False)
    assert any(not torch.equal(b, m.u[0].detach()) for b, m in zip(before, comps))
    em.set_widths(0.5)
    flextron_fx.save(em, tmp_path / "ckpt")
    loaded = flextron_fx.load(tmp_path / "ckpt")
    for a, b in zip(compensation_modules(em.graph_module).values(),
                    compensation_modules(loaded.graph_module).values()):
        assert a.rank == b.rank == 2
        assert all(torch.equal(x, y) for x, y in zip([*a.u, *a.v], [*b.u, *b.v]))
    ids = _ids(1)
    assert_close(output(loaded, ids), output(em, ids))


def test_the_default_is_least_squares_on_every_block_and_none_drops_the_rank():
    assert (FlextronConfig().compensate, FlextronConfig().compensation_rank) == ("all", 128)
    # chosen from the eight-domain zero-shot table (docs/RESULTS.md, "The default MLP score")
    assert (FlextronConfig().mlp_score, FlextronConfig().head_score) == \
        ("activation", "contribution")
    assert FlextronConfig(compensate="none", compensation_rank=4).compensation_rank == 0
    assert FlextronConfig(compensate=False).compensation_rank == 0
    with pytest.raises(ValueError, match=">= 0"):
        FlextronConfig(compensate="all", compensation_rank=-1)


def test_gram_matrices_are_taken_only_for_the_compensated_kinds():
    from flextron_fx.analyze import analyze
    from flextron_fx.passes.rank import measure
    from flextron_fx.trace import trace

    traced = trace(ZOO["llama"](), sample_inputs("llama"))
    analysis = analyze(traced.graph_module, traced.sample_inputs)
    stats = measure(traced.graph_module, analysis, analysis.blocks, calibration(n=4),
                    measures={"gram"}, batch_size=2, sample_inputs=traced.sample_inputs,
                    progress=False, gram_kinds=("attention",))
    kinds = {b.name: b.kind for b in analysis.blocks}
    assert {kinds[n] for n, st in stats.items() if st.gram is not None} == {"attention"}
    assert all(st.gram is None for n, st in stats.items() if kinds[n] == "mlp")


def test_gram_matrices_that_would_not_fit_in_memory_stop_before_calibrating(monkeypatch):
    from flextron_fx.errors import MemoryBudgetError
    from flextron_fx.passes import rank

    calibrated = []
    monkeypatch.setattr(rank, "tqdm", lambda *a, **k: calibrated.append(1) or tqdm(*a, **k))
    # llama's blocks: 2 MLPs with 96 inputs and 2 attentions with 64; 8 * (2 * 96**2 +
    # 2 * 64**2) = 212,992 bytes, more than half of 300 kB of memory
    monkeypatch.setattr(rank.os, "sysconf", lambda name: 1 if name == "SC_PAGE_SIZE"
                        else 300_000)
    with pytest.raises(MemoryBudgetError, match=r"compensation_rank=0.*attention blocks only"):
        _converted("llama", "group")
    assert not calibrated  # stopped before the first batch
    _converted("llama", "group", compensate="attention")  # 65,536 bytes fit
    assert calibrated


def test_the_routed_onnx_correction_reorders_units_from_band_order_to_slice_order():
    """Query heads kept inside KV groups: a candidate's units in band order (band 0's,
    then band 1's) are not its slice order; U V^T applied to the band-order outputs
    must equal it applied to the slice-order ones."""
    from types import SimpleNamespace

    from flextron_fx.export.routed_onnx import _Correction

    g = torch.Generator().manual_seed(0)
    kept = [torch.tensor([0, 4]), torch.tensor([0, 1, 4, 5]), torch.arange(8)]
    bands = [torch.tensor([0, 4]), torch.tensor([1, 5]), torch.tensor([2, 3, 6, 7])]
    u = [torch.randn(3, 2, generator=g) for _ in range(2)]
    v = [torch.randn(len(kept[k]), 2, generator=g) for k in range(2)]
    comp = SimpleNamespace(rank=2, u=u, v=v, block="b")
    region = SimpleNamespace(ref=torch.nn.Module())
    corr = _Correction.of(SimpleNamespace(comp=comp, region=region), kept, bands)
    assert corr.orders[0] is None and corr.orders[1].tolist() == [0, 2, 1, 3]
    h = torch.randn(1, 1, 8, generator=g)  # every unit's output, by unit index
    band_order = torch.cat([h[..., b] for b in bands], -1)
    y = torch.zeros(1, 1, 3)
    for k in range(2):
        got = corr(y, band_order, torch.tensor(k))
        want = (h[..., kept[k]] @ v[k]) @ u[k].t()
        torch.testing.assert_close(got, want)
    assert torch.equal(corr(y, band_order, torch.tensor(2)), y)  # full width: nothing
