"""The profiler: latency tables (fingerprint, lookups), cost models, the per-layer Hugging
Face runtime it measures decode on, and the profile / profile-check commands on a tiny
Llama. The graph-level profiler of every architecture: test_profiler_graph.py.

Timings of tiny models are noise; nothing here asserts a speed, only structure and exact
arithmetic. The accuracy numbers come from `flextron profile-check` on SmolLM2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import token_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flextron_fx
from flextron_fx import cli
from flextron_fx.errors import FingerprintError, MissingEntryError, ProfileError
from flextron_fx.profiler import Budget, CostModel, LatencyTable, ProfileConfig, profile
from flextron_fx.profiler.backends import get_backend
from flextron_fx.profiler.runtime import LayerwiseModel
from flextron_fx.profiler.table import FORMAT, VERSION, model_signature, op_rows

HYP = settings(max_examples=6, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def widths_of(em):
    """A hypothesis strategy of per-op widths (any mix of candidates)."""
    return st.tuples(*[st.sampled_from(op.candidates) for op in em.ops.values()]).map(
        lambda ws: dict(zip(em.ops, ws)))


@pytest.fixture(scope="module")
def table(zoo_converted):
    """A real (tiny, noisy) prefill table of the group-mode tiny Llama."""
    _, em = zoo_converted("llama", head_mode="group")
    return profile(em, ProfileConfig(shapes="1x8,2x4", threads=1, repeats=2, warmup=1),
                   progress=False)


def hand_table(em) -> LatencyTable:
    """Entries chosen by hand: attention 1 ms per kept KV group, MLP 1 ms per 96 neurons."""
    rows = op_rows(em)
    entries = {}
    for rid, row in rows.items():
        per = {2: 1.0, 4: 2.0} if row["kind"] == "attention" else \
            {32: 0.25, 48: 0.5, 64: 0.75, 96: 1.0}
        entries[rid] = {"1x8": {str(w): {"median_ms": v, "p25_ms": v, "p75_ms": v, "n": 1}
                                for w, v in per.items()}}
    fixed = {p: {"median_ms": v, "p25_ms": v, "p75_ms": v, "n": 1}
             for p, v in {"embedding": 0.1, "norms": 0.2, "head": 0.3, "other": 0.4}.items()}
    return LatencyTable({
        "format": FORMAT, "version": VERSION,
        "fingerprint": {"machine": {"cpu": "hand"}, "backend": "torch-cpu", "dtype": "float32",
                        "mode": "prefill", "shapes": [[1, 8]], "model": model_signature(em)},
        "settings": {}, "rows": rows, "entries": entries, "fixed": {"1x8": fixed},
        "anchors": {}, "seconds": 0})


# ---- cost-model arithmetic ---------------------------------------------------------------
def test_cost_model_arithmetic_by_hand(zoo_converted):
    """Tiny Llama: hidden 64, MLP 96, 4 query heads over 2 KV heads of 16, vocab 128,
    2 layers, untied head. Group mode: 2 query heads keep 1 KV head."""
    _, em = zoo_converted("llama", head_mode="group")
    attn0, mlp0, attn1, mlp1 = em.ops  # graph order: layer 0 attention, MLP, then layer 1
    widths = {attn0: 2, mlp0: 48, attn1: 4, mlp1: 96}
    cost = CostModel(em, hand_table(em))
    # latency: fixed 0.1 + 0.2 + 0.3 + 0.4 = 1.0; ops 1.0 + 0.5 + 2.0 + 1.0 = 4.5
    assert cost.latency(widths) == pytest.approx(5.5)
    assert cost.latency(None) == pytest.approx(1.0 + 2 * 2.0 + 2 * 1.0)
    assert cost.latency_parts(widths)["attention"] == pytest.approx(3.0)
    assert cost.fraction("latency", widths) == pytest.approx(5.5 / 7.0)
    # parameters: a full layer is q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288,
    # MLP 3*64*96 = 18432, two norms 128 -> 30848; final norm 64, head 128*64 = 8192
    assert cost.params(None, non_embedding=True) == 2 * 30848 + 64 + 8192
    # layer 0 at 2 heads (1 KV head): 64*32 + 64*16 * 2 + 32*64 = 6144; MLP 48: 3*64*48 = 9216
    small = 6144 + 9216 + 128 + 30848 + 64 + 8192
    assert cost.params(widths, non_embedding=True) == small
    assert cost.params(widths) == small + 128 * 64
    # KV cache: 2 (K, V) * (1 + 2 KV heads) * 16 dims * batch 3 * 10 tokens * 4 bytes
    assert cost.kv_cache_bytes(widths, batch=3, context=10, dtype="float32") == 11520
    assert cost.kv_cache_bytes(widths, batch=3, context=10, dtype="bfloat16") == 5760
    assert cost.memory(widths, batch=3, context=10) == (small + 8192) * 4 + 11520
    # budgets: relative to the full model or absolute
    assert Budget("latency", 0.8).allows(cost, widths)  # 5.5 <= 5.6
    assert not Budget("latency", 0.75).allows(cost, widths)  # 5.5 > 5.25
    assert Budget.parse("latency=5.5ms").allows(cost, widths)
    assert not Budget.parse("latency=5.4ms").allows(cost, widths)
    assert Budget.parse("params=55k").allows(cost, widths)  # 54592 non-embedding
    assert not Budget.parse("params=54k").allows(cost, widths)
    assert Budget.parse("memory=263kB").limit(cost) == 263000


def test_budget_strings_and_their_errors():
    assert Budget.parse("latency=60%") == Budget("latency", 0.6, True)
    assert Budget.parse("params=0.5") == Budget("params", 0.5, True)
    assert Budget.parse("params=50M") == Budget("params", 50e6, False)
    assert Budget.parse("memory=1GiB") == Budget("memory", 2.0**30, False)
    with pytest.raises(ProfileError, match="METRIC=AMOUNT"):
        Budget.parse("speed=3ms")
    with pytest.raises(ProfileError, match="unknown unit"):
        Budget.parse("latency=12")  # a bare number above 1 is not a fraction: needs ms
    with pytest.raises(ProfileError, match="fraction in"):
        Budget("latency", 1.5)


@HYP
@given(data=st.data())
@pytest.mark.parametrize("name,mode", [("llama", "group"), ("llama", "query"),
                                       ("nanogpt", "query")])
def test_parameter_model_equals_the_materialized_network(name, mode, data, zoo_converted):
    _, em = zoo_converted(name, head_mode=mode)
    widths = data.draw(widths_of(em))
    dense = em.materialize(widths)
    assert CostModel(em).params(widths) == sum(p.numel() for p in dense.parameters())


@HYP
@given(data=st.data())
@pytest.mark.parametrize("mode", ["group", "query"])
def test_kv_cache_model_equals_a_real_generation_cache(mode, data, zoo_converted):
    """Per-layer widths in the HF class, greedy generation: the cache it allocates has
    exactly the bytes the memory model predicts, in float32 and bfloat16."""
    _, em = zoo_converted("llama", head_mode=mode)
    rts = _runtimes(em, mode)
    widths = data.draw(widths_of(em))
    batch, prompt, new = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), 3
    cost = CostModel(em)
    for dtype, rt in rts.items():
        rt.set(widths)
        ids = token_ids(batch, prompt, seed=prompt)
        with torch.inference_mode():
            out = rt.model.generate(ids, max_new_tokens=new, min_new_tokens=new,
                                    do_sample=False, return_dict_in_generate=True,
                                    pad_token_id=0)
        cache = out.past_key_values
        got = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        assert cache.get_seq_length() == prompt + new - 1  # the last token is not fed back
        assert got == cost.kv_cache_bytes(widths, batch=batch, context=prompt + new - 1,
                                          dtype=dtype)
    if mode == "group":  # fewer heads, fewer KV heads: the cache does shrink
        assert cost.kv_cache_bytes(0.5, batch=1, context=4) < cost.kv_cache_bytes(None, 1, 4)


_RT: dict = {}


def _runtimes(em, mode):
    if mode not in _RT:
        _RT[mode] = {"float32": LayerwiseModel(em),
                     "bfloat16": LayerwiseModel(em, dtype=torch.bfloat16, check=False)}
    return _RT[mode]


@HYP
@given(data=st.data())
@pytest.mark.parametrize("name,mode", [("llama", "group"), ("llama", "query"),
                                       ("qwen2", "group"), ("gemma", "query"),
                                       ("gpt2", "query"), ("gpt_neox", "group"),
                                       ("opt", "query")])
def test_the_per_layer_hf_model_equals_the_elastic_graph(name, mode, data, zoo_converted):
    _, em = zoo_converted(name, head_mode=mode)
    key = (name, mode, "f32")
    if key not in _RT:
        _RT[key] = LayerwiseModel(em)
    rt = _RT[key]
    widths = data.draw(widths_of(em))
    rt.set(widths)
    em.set_widths(widths)
    ids = token_ids(2, 7)
    with torch.inference_mode():
        torch.testing.assert_close(rt.model(input_ids=ids).logits, em(ids),
                                   atol=1e-4, rtol=0)
    em.set_full()


@pytest.mark.parametrize("name,mode", [("llama", "group"), ("gpt2", "query"),
                                       ("gpt_neox", "group"), ("opt", "group")])
def test_a_timed_decode_step_is_the_graphs_next_token_and_every_op_is_timed(name, mode,
                                                                           zoo_converted):
    """Decode runs in the source class with a key/value cache of the kept heads: one step
    after the prompt gives the elastic graph's logits for prompt + that token, at a
    per-layer mix of widths, and the hooks time every op (OPT's MLP, whose module is its
    whole decoder layer, by the modules that own its weights)."""
    from flextron_fx.profiler.measure import ModuleTimer, timed_modules
    from flextron_fx.profiler.runtime import Runner

    _, em = zoo_converted(name, head_mode=mode)
    rt = LayerwiseModel(em)
    widths = {n: op.candidates[i % len(op.candidates)] for i, (n, op) in
              enumerate(em.ops.items())}
    rt.set(widths)
    clock = get_backend("torch-cpu").clock()
    runner = Runner(rt, clock, "decode", (2, 6))
    runner.prepare("mix")
    kept = [em.kv_heads(n, w) for n, w in widths.items() if em.ops[n].kind == "attention"]
    assert [k.shape[1] for k, _ in runner.cache("mix")] == kept
    timer = ModuleTimer(timed_modules(rt), clock)
    timer.enabled = True
    try:
        assert runner.run("mix") > 0
    finally:
        timer.remove()
    ops, fixed = timer.collect()
    assert set(ops) == set(em.ops) and all(ms > 0 for ms in ops.values())
    assert {"embedding", "head"} <= set(fixed)
    from transformers import DynamicCache

    with torch.inference_mode():  # the step the runner times, its logits this time
        step = rt.model(input_ids=runner.ids, position_ids=runner.pos, use_cache=True,
                        cache=DynamicCache(ddp_cache_data=runner.cache("mix"))).logits
        with em.at(widths):
            whole = em(torch.cat([runner.prompt, runner.ids], dim=1))
    torch.testing.assert_close(step[:, -1], whole[:, -1], atol=1e-4, rtol=0)
    rt.set(em.full_widths())


# ---- the table: fingerprint and lookups -----------------------------------------------------
def test_a_table_for_another_setup_is_refused_naming_what_differs(table, zoo_converted,
                                                                   tmp_path):
    path = table.save(tmp_path / "lut.json")
    here = get_backend("torch-cpu").machine(1)
    LatencyTable.load(path, machine=here, backend="torch-cpu", dtype="float32")  # matches
    other = dict(here, threads=7, cpu="Some Other CPU")
    with pytest.raises(FingerprintError) as err:
        LatencyTable.load(path, machine=other, backend="torch-cuda", dtype="bfloat16",
                          shapes=["1x8", "1x512"])
    msg = str(err.value)
    for what in ("machine.threads: table 1, here 7", "machine.cpu",
                 "backend: table 'torch-cpu', here 'torch-cuda'", "dtype",
                 "asked for ['1x512']", "flextron profile"):
        assert what in msg, (what, msg)
    assert "shapes" in msg and "1x8'" not in msg.split("asked for")[1]
    # another elastic model (other candidates): the cost model refuses the table
    _, em_query = zoo_converted("llama", head_mode="query")
    with pytest.raises(FingerprintError, match="model.hash"):
        CostModel(em_query, table)
    # validation measures here, so a table from another machine is refused before measuring
    from flextron_fx.profiler import check

    moved = LatencyTable(copy.deepcopy(table.data), source="moved.json")
    moved.data["fingerprint"]["machine"]["cpu"] = "Some Other CPU"
    _, em = zoo_converted("llama", head_mode="group")
    with pytest.raises(FingerprintError, match="machine.cpu: table 'Some Other CPU'"):
        check(em, moved, n=3, progress=False)


def test_a_missing_entry_is_an_error_naming_op_width_and_shape(table, zoo_converted):
    _, em = zoo_converted("llama", head_mode="group")
    cost = CostModel(em, table)
    attn0 = next(iter(em.ops))
    assert cost.latency({attn0: 2}, shape="1x8") > 0
    broken = LatencyTable(copy.deepcopy(table.data), source="broken.json")
    del broken.data["entries"][broken.row_of(attn0)]["1x8"]["2"]
    with pytest.raises(MissingEntryError) as err:
        CostModel(em, broken).latency({attn0: 2}, shape="1x8")
    msg = str(err.value)
    assert attn0 in msg and "width 2" in msg and "shape 1x8" in msg and "broken.json" in msg
    with pytest.raises(MissingEntryError, match="shape 4x4"):
        cost.latency(None, shape="4x4")
    with pytest.raises(ProfileError, match="several shapes"):
        cost.latency(None)  # two shapes in the table: say which


def test_the_table_covers_every_op_width_and_shape_and_round_trips(table, zoo_converted,
                                                                   tmp_path):
    _, em = zoo_converted("llama", head_mode="group")
    data = table.data
    assert len(data["rows"]) == 2  # both attentions share a row, both MLPs another
    for op in em.ops.values():
        for shape in ("1x8", "2x4"):
            for w in op.candidates:
                e = data["entries"][table.row_of(op.name)][shape][str(w)]
                # 2 ops per row x the grid's sub-networks with this width x 2 rounds
                assert e["n"] == 2 * (8 // len(op.candidates)) * 2
                assert e["p25_ms"] <= e["median_ms"] <= e["p75_ms"]
    for shape in ("1x8", "2x4"):
        # prefill on torch-cpu times the graph's blocks; the rest of a forward is one part
        assert set(data["fixed"][shape]) == {"other"}
        assert len(data["anchors"][shape]) == 2 * 4  # every head count x every MLP width
    again = LatencyTable.load(table.save(tmp_path / "t.json"))
    assert again.data == json.loads(json.dumps(table.data))
    assert CostModel(em, again).latency(0.5, "2x4") == CostModel(em, table).latency(0.5, "2x4")


def test_unknown_and_unavailable_backends_say_what_exists():
    with pytest.raises(ProfileError, match="not profiled yet.*torch-cpu"):
        get_backend("triton")
    if not torch.cuda.is_available():
        with pytest.raises(ProfileError, match="no CUDA device"):
            get_backend("torch-cuda")
    with pytest.raises(ProfileError, match="BATCHxLENGTH"):
        ProfileConfig(shapes="256")
    with pytest.raises(ProfileError, match="mode must be"):
        ProfileConfig(mode="train")


def test_decode_without_a_hugging_face_class_is_refused_clearly(zoo_converted):
    _, em = zoo_converted("nanogpt")
    with pytest.raises(flextron_fx.UnsupportedModelError,
                       match="decode is unavailable.*not a Hugging Face class.*need no"):
        profile(em, ProfileConfig(mode="decode", shapes="1x4", repeats=1), progress=False)


# ---- the commands, end to end ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_profile_then_check_on_a_tiny_llama(mode, zoo_converted, tmp_path, capsys):
    _, em = zoo_converted("llama", head_mode="group")
    run = flextron_fx.save(em, tmp_path / "run")
    lut, out, png = tmp_path / "lut.json", tmp_path / "check.json", tmp_path / "check.png"
    assert cli.main(["profile", str(run), "--mode", mode, "--shapes", "1x16", "--threads",
                     "1", "--repeats", "3", "--json", str(lut), "--no-progress"]) == 0
    table = LatencyTable.load(lut, mode=mode, shapes=["1x16"])
    assert table.fingerprint["machine"]["threads"] == 1
    assert not (tmp_path / "lut.json.partial").exists()
    printed = capsys.readouterr().out
    assert "anchor" in printed and "attention[" in printed
    assert cli.main(["profile-check", str(run), "--lut", str(lut), "--n", "6", "--repeats",
                     "2", "--json", str(out), "--plot", str(png), "--no-progress"]) == 0
    r = json.loads(out.read_text())["shapes"]["1x16"]
    assert r["random"]["n"] == 6 and r["uniform"]["n"] == 8
    for key in ("median_abs_rel_error", "worst_abs_rel_error"):
        assert r["random"][key] is not None
    # a rank correlation exists unless a tiny model's 6 points tie on one side
    random = [p for p in r["points"] if p["group"] == "random"]
    ties = any(len({p[k] for p in random}) == 1 for k in ("predicted_ms", "measured_ms"))
    assert (r["random"]["spearman"] is None) == ties
    cost = CostModel(em, table)
    for p in r["points"]:  # the reported prediction is the cost model's, for those widths
        widths = dict(zip(em.ops, p["widths"]))
        assert p["predicted_ms"] == pytest.approx(cost.latency(widths))
        assert p["rel_error"] == pytest.approx(p["predicted_ms"] / p["measured_ms"] - 1)
        assert p["predicted_ratio"] == pytest.approx(cost.fraction("latency", widths))
        assert p["ratio_error"] == pytest.approx(p["predicted_ratio"] / p["measured_ratio"] - 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Spearman" in capsys.readouterr().out


def test_an_interrupted_profile_resumes_from_its_finished_rounds(zoo_converted, tmp_path,
                                                                 monkeypatch, capsys):
    from flextron_fx.profiler import measure

    _, em = zoo_converted("llama", head_mode="group")
    config = ProfileConfig(shapes="1x8", threads=1, repeats=3, warmup=0)
    lut = tmp_path / "lut.json"
    real = _dies_at_call(monkeypatch, measure.ModuleTimer, "collect", 8 + 3)  # 8 per round
    with pytest.raises(KeyboardInterrupt):
        profile(em, config, path=lut, progress=False)
    partial = json.loads((tmp_path / "lut.json.partial").read_text())
    assert len(partial["samples"]["1x8"]) == 8  # round one kept, round two lost
    monkeypatch.setattr(measure.ModuleTimer, "collect", real)
    table = profile(em, config, path=lut, progress=False)
    assert "resuming" in capsys.readouterr().out
    assert all(a["measured"]["n"] == 3 for a in table.data["anchors"]["1x8"])
    assert not (tmp_path / "lut.json.partial").exists()


# ---- onnxruntime: exported sub-networks ------------------------------------------------------
@pytest.mark.parametrize("name,mode", [("llama", "prefill"), ("llama", "decode"),
                                       ("opt", "decode"), ("gpt2", "decode")])
def test_an_exported_subnetwork_equals_torch_and_its_kernels_are_attributed(name, mode,
                                                                            zoo_converted):
    from flextron_fx.profiler.onnxrt import ExportedNetwork
    from flextron_fx.profiler.runtime import Runner

    _, em = zoo_converted(name, head_mode="group")
    rt = LayerwiseModel(em)
    widths = {n: op.candidates[i % len(op.candidates)] for i, (n, op) in
              enumerate(em.ops.items())}  # a per-layer mix, not a uniform width
    rt.set(widths)
    runner = Runner(rt, get_backend("onnxruntime-cpu").clock(), mode, (2, 8))
    net = ExportedNetwork(rt, runner, "mix", threads=1, profiled=True, check=False)
    got = net.sessions["plain"].run(None, net.feeds)[0]
    kwargs = {"input_ids": runner.ids}
    if mode == "decode":
        from transformers import DynamicCache

        kwargs.update(position_ids=runner.pos, use_cache=True,
                      cache=DynamicCache(ddp_cache_data=runner.cache("mix")))
    with torch.inference_mode():
        ref = rt.model(**kwargs).logits
    assert got.shape == tuple(ref.shape) == (2, 8 if mode == "prefill" else 1, 128)
    assert abs(got - ref.numpy()).max() < 1e-4
    assert net.run() > 0 and set(net.sessions) == {"plain"}
    for _ in range(3):
        net.run_profiled()
    parts = net.breakdown()
    assert len(parts) == 3  # one per profiled forward
    for ops, fixed in parts:  # every op's and fixed part's kernels are found and timed
        assert set(ops) == set(em.ops) and all(ms > 0 for ms in ops.values())
        assert set(fixed) == {"embedding", "norms", "head"}


@pytest.mark.slow  # 19 ONNX exports (~60 s); one exported network is timed above by default
def test_onnxruntime_profile_then_check_on_a_tiny_llama(zoo_converted, tmp_path):
    from flextron_fx.profiler.validate import check

    _, em = zoo_converted("llama", head_mode="group")
    with pytest.raises(ProfileError, match="float32"):
        profile(em, ProfileConfig(backend="onnxruntime-cpu", dtype="bfloat16"), progress=False)
    config = ProfileConfig(backend="onnxruntime-cpu", shapes="1x8", threads=1, repeats=2,
                           warmup=1)
    table = profile(em, config, path=tmp_path / "lut.json", progress=False)
    fp = table.fingerprint
    assert fp["backend"] == "onnxruntime-cpu" and "onnxruntime" in fp["machine"]
    for rid, row in table.data["rows"].items():
        ent = table.data["entries"][rid]["1x8"]
        assert sorted(int(w) for w in ent) == sorted(row["candidates"])
        per_width = 2 * len(row["ops"]) * 8 // len(row["candidates"])  # repeats x ops x grid
        assert all(e["n"] == per_width and e["median_ms"] > 0 for e in ent.values())
    assert len(table.data["anchors"]["1x8"]) == 8
    with pytest.raises(FingerprintError, match="backend"):
        LatencyTable.load(tmp_path / "lut.json", backend="torch-cpu")
    r = check(em, table, n=3, repeats=2, warmup=1, progress=False)["shapes"]["1x8"]
    assert r["random"]["n"] == 3 and r["uniform"]["n"] == 8
    cost = CostModel(em, table)
    for p in r["points"]:
        assert p["predicted_ms"] == pytest.approx(cost.latency(dict(zip(em.ops, p["widths"]))))
        assert p["measured_ms"] > 0


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    from flextron_fx.profiler.validate import spearman

    a, b = [1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 4.0], [2.0, 1.0, 3.0, 3.0, 6.0, 4.0, 4.0]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert spearman(a, [1.0] * 7) is None


@pytest.mark.slow  # ~35 s; resuming is checked on the torch backend by default
def test_an_interrupted_onnxruntime_profile_keeps_its_finished_networks(zoo_converted,
                                                                        tmp_path, monkeypatch,
                                                                        capsys):
    from flextron_fx.profiler import onnxrt

    _, em = zoo_converted("llama", head_mode="group")
    config = ProfileConfig(backend="onnxruntime-cpu", shapes="1x8", threads=1, repeats=2,
                           warmup=0)
    lut = tmp_path / "lut.json"
    real = _dies_at_call(monkeypatch, onnxrt.ExportedNetwork, "breakdown", 3)  # third network
    with pytest.raises(KeyboardInterrupt):
        profile(em, config, path=lut, progress=False)
    partial = json.loads((tmp_path / "lut.json.partial").read_text())
    assert len(partial["samples"]["1x8"]) == 2 * 2  # two networks x two repeats kept
    monkeypatch.setattr(onnxrt.ExportedNetwork, "breakdown", real)
    built = []
    monkeypatch.setattr(onnxrt.ExportedNetwork, "__init__",
                        _counting(onnxrt.ExportedNetwork.__init__, built))
    table = profile(em, config, path=lut, progress=False)
    assert "resuming" in capsys.readouterr().out
    assert len(built) == 8 - 2  # the two finished networks are not exported again
    assert all(a["measured"]["n"] == 2 for a in table.data["anchors"]["1x8"])
    assert not (tmp_path / "lut.json.partial").exists()


def _dies_at_call(monkeypatch, owner, name: str, n: int):
    """Make `owner.name` raise KeyboardInterrupt at its n-th call; returns the real one."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def dies(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, dies)
    return real


def _counting(init, into: list):
    def wrapped(self, *args, **kwargs):
        into.append(1)
        init(self, *args, **kwargs)
    return wrapped
