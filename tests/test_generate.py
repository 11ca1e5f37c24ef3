"""Generation: sub-networks at per-layer widths in their Hugging Face class (`sliced_hf`),
a key/value cache that holds the kept heads, the ONNX decoder, and `flextron generate`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    assert_close,
    calibration,
    output,
    perturb_routers,
    token_ids,
    width_share_costs,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import FlextronConfig, cli
from flextron_fx.errors import InputError, UnsupportedModelError
from flextron_fx.export.generate import OrtDecoder, Sampling, TorchDecoder, generate
from flextron_fx.export.generate_command import _prompt
from flextron_fx.export.hf import to_hf
from flextron_fx.export.sliced import sliced_hf
from flextron_fx.passes.compensate import compensation_modules

FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]


def _mixed(em, pick):
    """Per-op widths: `pick(i, candidates)` for op i (layers differ)."""
    return {op.name: pick(i, op.candidates) for i, op in enumerate(em.ops.values())}


def _alternating(em):
    return _mixed(em, lambda i, c: c[0] if (i // 2) % 2 == 0 else c[-1])


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("name", FAMILIES)
def test_sliced_model_equals_the_elastic_model_at_per_layer_widths(name, data, zoo_converted):
    model, em = zoo_converted(name)
    widths = {op.name: data.draw(st.sampled_from(op.candidates), label=op.name)
              for op in em.ops.values()}
    small = sliced_hf(em, widths, check=False)  # compared here, not by its own check
    ids = token_ids(2, 7)
    with em.at(widths):
        assert_close(output(small, ids), output(em, ids))
    # num_params counts the compensation bias row a cut block adds as a constant (as
    # materialize holds it); the Hugging Face class holds it as the projection's bias,
    # a new parameter where the source class has none
    have = dict(model.named_parameters())
    rows = 0
    for m in compensation_modules(em.graph_module).values():
        weight = em.block(m.block).out_proj.weight[len(em.param_prefix):]
        if m.row(widths[m.block]) is not None and \
                weight.removesuffix("weight") + "bias" not in have:
            rows += m.bias.shape[1]
    assert sum(p.numel() for p in small.parameters()) == em.num_params(widths) + rows


def _recompute(em, widths, ids, n):
    """Greedy decoding without a cache: the elastic graph on the whole sequence each step."""
    seq = ids
    with em.at(widths):
        for _ in range(n):
            nxt = output(em, seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq[:, ids.shape[1]:]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_with_the_cache_equals_recomputing_the_sequence(name, zoo_converted):
    _, em = zoo_converted(name)
    widths = _alternating(em)
    ids = token_ids(2, 5)
    got = generate(TorchDecoder(sliced_hf(em, widths)), ids, 12).tokens
    assert torch.equal(got, _recompute(em, widths, ids, 12))


def test_the_cache_holds_the_key_value_heads_each_layer_keeps(zoo_converted):
    _, em = zoo_converted("llama", head_mode="group")  # 4 over 2 KV heads
    attn = [n for n, op in em.ops.items() if op.kind == "attention"]
    widths = {attn[0]: 2, attn[1]: 4}
    decoder = TorchDecoder(sliced_hf(em, widths))
    generate(decoder, token_ids(1, 4), 3)
    shapes = [tuple(layer.keys.shape) for layer in decoder.cache.layers]
    assert shapes == [(1, 1, 6, 16), (1, 2, 6, 16)]  # 4 + 3 - 1 positions cached
    assert [em.kv_heads(n, widths[n]) for n in attn] == [1, 2]


def test_nucleus_sampling_with_a_tiny_top_p_is_greedy_and_a_seed_repeats(zoo_converted):
    _, em = zoo_converted("llama")
    decoder = TorchDecoder(sliced_hf(em, 0.5))
    ids = token_ids(1, 4)
    greedy = generate(decoder, ids, 8).tokens
    assert torch.equal(generate(decoder, ids, 8, Sampling(False, 0.7, 1e-6)).tokens, greedy)
    hot = Sampling(greedy=False, temperature=5.0, seed=4)
    first = generate(decoder, ids, 8, hot).tokens
    assert torch.equal(first, generate(decoder, ids, 8, hot).tokens)
    assert not torch.equal(first, greedy)  # a flat distribution over 128 tokens
    with pytest.raises(InputError, match="temperature"):
        Sampling(greedy=False, temperature=0)
    with pytest.raises(InputError, match="top_p"):
        Sampling(top_p=1.5)


def test_a_class_that_reads_head_counts_from_its_config_is_refused(zoo_converted):
    _, em = zoo_converted("phi3", head_mode="group")  # fused qkv split by config.num_attention_heads
    with pytest.raises(UnsupportedModelError, match="per-layer sizes"):
        sliced_hf(em, _alternating(em))


def test_a_mixed_width_export_reloads_with_the_auto_class(zoo_converted, tmp_path):
    _, em = zoo_converted("qwen2", head_mode="group")
    widths = _alternating(em)
    small = to_hf(em, widths)
    assert type(small).__name__ == "FlextronQwen2ForCausalLM"
    small.save_pretrained(tmp_path)
    ids = token_ids(1, 6)
    np.save(tmp_path / "want.npy", output(small, ids).numpy())
    np.save(tmp_path / "ids.npy", ids.numpy())
    code = (  # a fresh process: transformers imported after flextron_fx
        "import flextron_fx, numpy as np, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()\n"
        f"ids = torch.from_numpy(np.load({str(tmp_path / 'ids.npy')!r}))\n"
        "with torch.no_grad(): got = m(ids).logits.numpy()\n"
        f"print(type(m).__name__, float(abs(got - np.load({str(tmp_path / 'want.npy')!r})).max()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    cls, err = done.stdout.split()[-2:]
    assert cls == "FlextronQwen2ForCausalLM" and float(err) <= 1e-5
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "flextron_qwen2"


@pytest.fixture(scope="module")
def onnx_decoder(tmp_path_factory, zoo_converted):
    _, em = zoo_converted("llama", head_mode="group")
    attn = [n for n, op in em.ops.items() if op.kind == "attention"]
    widths = {**_alternating(em), attn[0]: 2, attn[1]: 4}
    folder = tmp_path_factory.mktemp("decoder")
    flextron_fx.save(em, folder / "elastic")
    (folder / "widths.json").write_text(json.dumps(widths))
    path = folder / "decoder.onnx"  # `flextron export` runs to_onnx_decoder(sliced_hf(...))
    assert cli.main(["export", str(folder / "elastic"), "--widths", str(folder / "widths.json"),
                     "--format", "onnx-decoder", "--out", str(path)]) == 0
    return em, widths, sliced_hf(em, widths), path


def test_the_onnx_decoder_steps_like_pytorch(onnx_decoder):
    em, widths, small, path = onnx_decoder
    ort_decoder, torch_decoder = OrtDecoder(path), TorchDecoder(small)
    assert [i.shape[1] for i in ort_decoder.past] == [1, 1, 2, 2]  # KV heads per layer
    ids = token_ids(2, 5)
    for decoder in (ort_decoder, torch_decoder):
        decoder.reset()
    for step in (ids, ids[:, :1], ids[:, 1:3]):  # a prompt, then one and two tokens
        want, got = torch_decoder.step(step), ort_decoder.step(step)
        assert_close(got, want)
    presents = [t for layer in torch_decoder.cache.layers for t in (layer.keys, layer.values)]
    for got, want in zip(ort_decoder.cache, presents):
        assert_close(torch.from_numpy(got), want)
    greedy = generate(ort_decoder, ids, 10).tokens
    assert torch.equal(greedy, _recompute(em, widths, ids, 10))
    hot = Sampling(greedy=False, temperature=0.9, top_p=0.8, seed=2)
    assert torch.equal(generate(ort_decoder, ids, 10, hot).tokens,
                       generate(torch_decoder, ids, 10, hot).tokens)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, zoo_converted):
    # plain slices: the untrained routers' choices below vary across tokens on this model
    _, em = zoo_converted("llama", compensate="none")
    path = tmp_path_factory.mktemp("elastic") / "llama"
    flextron_fx.save(em, path)
    return em, path


def test_generate_from_the_command_line(saved, capsys):
    em, path = saved
    argv = ["generate", str(path), "--fraction", "0.5", "--prompt-ids", "1 2 3",
            "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    tokens = [int(t) for t in out.split("tokens:")[1].splitlines()[0].split()]
    want = _recompute(em, em.static_widths(0.5), torch.tensor([[1, 2, 3]]), 6)
    assert tokens == want[0].tolist()
    assert "tokens/s, torch" in out


@pytest.mark.parametrize("args, message", [
    (["--budget", "params=0.01"], "smallest costs"),
    (["--widths", "WRONG"], "no elastic op named"),
    (["--fraction", "0.5", "--prompt-ids", "1 x"], "integers"),  # these three: before loading
    (["--fraction", "0.5", "--max-new-tokens", "0"], "at least 1"),
    (["--top-p", "0.9", "--greedy"], "cannot go with --greedy"),
])
def test_generate_refuses_bad_input_clearly(saved, tmp_path, capsys, args, message):
    _, path = saved
    if "WRONG" in args:  # widths of another model
        (tmp_path / "w.json").write_text(json.dumps({"transformer.h.0.mlp#1": 64}))
        args = ["--widths", str(tmp_path / "w.json")]
    if "--prompt-ids" not in args:
        args = [*args, "--prompt-ids", "1 2"]
    assert cli.main(["generate", str(path), *args]) == 2
    assert message in capsys.readouterr().err


def test_prompt_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(InputError, match=r"\[500\] are outside the model's vocabulary"):
        _prompt([1, 500], 128)


def test_generate_refuses_folders_that_hold_no_model(saved, tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path), "--prompt", "hi"]) == 2
    assert "neither flextron.json" in capsys.readouterr().err


def _save_routers(em, folder, mode: str):
    """Routers with trained-looking (random) weights and a width-share cost table."""
    from flextron_fx.route import CostTable, inject_routers, remove_routers, save_routers

    table = CostTable.coerce(em, width_share_costs(em))
    perturb_routers(inject_routers(em, mode, cost=table, seed=3), seed=3, scale=2.0)
    try:
        save_routers(em, folder, table)
    finally:
        remove_routers(em)
    return table


def _generated(out: str) -> list[int]:
    return [int(t) for t in out.split("tokens:")[1].splitlines()[0].split()]


def test_generate_with_dynamic_routers_gives_each_token_its_own_widths(saved, tmp_path,
                                                                        capsys):
    """Each new token is the greedy choice of the routed elastic graph on the sequence
    before it, and the cost printed is what the routers chose for the new tokens: checked
    against one routed forward over the whole generated sequence."""
    from flextron_fx.route import load_routers, remove_routers, set_budget

    em, path = saved
    table = _save_routers(em, tmp_path / "dyn", "dynamic")
    prompt = [1, 2, 3]
    assert cli.main(["generate", str(path), "--routers", str(tmp_path / "dyn"), "--budget",
                     "0.6", "--prompt-ids", " ".join(map(str, prompt)),
                     "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    new = _generated(out)
    routers, _, _ = load_routers(em, tmp_path / "dyn", "dynamic")
    try:
        set_budget(em, 0.6)
        seq = torch.tensor([prompt + new])
        logits = output(em, seq)
        positions = range(len(prompt) - 1, seq.shape[1] - 1)
        assert [int(logits[0, p].argmax()) for p in positions] == new
        index = {n: r.last_index[0] for n, r in routers.items()}
    finally:
        remove_routers(em)
        em.set_full()
    costs = [(table.fixed + sum(table.costs[n][int(index[n][p])] for n in index)) / table.full
             for p in positions]
    assert len(set(costs)) > 1  # the routers chose different widths for different tokens
    line = out.split("the new tokens cost ")[1]
    assert float(line.split()[0]) == pytest.approx(sum(costs) / len(costs), abs=1e-3)
    assert "tokens/s" in out
    assert "key/value cache with every head's" in out
    # the same in onnxruntime: routers inside the ONNX decoder
    assert cli.main(["generate", str(path), "--routers", str(tmp_path / "dyn"), "--budget",
                     "0.6", "--prompt-ids", " ".join(map(str, prompt)),
                     "--max-new-tokens", "8", "--runtime", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert _generated(out) == new and "routers inside the ONNX graph" in out
    assert float(out.split("the new tokens cost ")[1].split()[0]) == pytest.approx(
        sum(costs) / len(costs), abs=1e-3)
    # `flextron export` writes that decoder; it serves any budget
    from flextron_fx.export.generate import OrtRoutedDecoder

    argv = ["export", str(path), "--routers", str(tmp_path / "dyn"), "--budget", "0.6",
            "--out", str(tmp_path / "routed.onnx")]
    assert cli.main(argv) == 2  # a logits-only file cannot hold per-token widths
    assert "--format onnx-decoder" in capsys.readouterr().err
    assert cli.main([*argv, "--format", "onnx-decoder"]) == 0
    assert "dynamic routers inside" in capsys.readouterr().out
    decoder = OrtRoutedDecoder(tmp_path / "routed.onnx", table, 0.6)
    assert generate(decoder, torch.tensor([prompt]), 8).tokens[0].tolist() == new


def test_generate_with_static_routers_uses_the_widths_they_select(saved, tmp_path, capsys):
    from flextron_fx.route import load_routers, remove_routers, select

    em, path = saved
    table = _save_routers(em, tmp_path / "static", "static")
    load_routers(em, tmp_path / "static")
    try:
        widths = select(em, 0.6, table).widths
    finally:
        remove_routers(em)
    assert cli.main(["generate", str(path), "--routers", str(tmp_path / "static"),
                     "--budget", "0.6", "--prompt-ids", "1 2 3", "--max-new-tokens", "6"]) == 0
    got = _generated(capsys.readouterr().out)
    assert got == _recompute(em, widths, torch.tensor([[1, 2, 3]]), 6)[0].tolist()
    # `flextron export --routers` writes the same sub-network
    assert cli.main(["export", str(path), "--routers", str(tmp_path / "static"), "--budget",
                     "0.6", "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    ids = token_ids(2, 7)
    with torch.no_grad(), em.at(widths):
        want = output(em, ids)
        assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, want)
    # refused clearly: routers without a budget, with fixed widths, in onnxruntime (dynamic)
    base = ["generate", str(path), "--prompt-ids", "1 2"]
    for extra, message in [
            (["--routers", str(tmp_path / "static")], "need --budget"),
            (["--routers", str(tmp_path / "static"), "--fraction", "0.5"], "leave out"),
            (["--routers", str(tmp_path / "nothing"), "--budget", "0.6"], "no trained routers")]:
        assert cli.main([*base, *extra]) == 2
        assert message in capsys.readouterr().err


def _dynamic(name: str, head_mode: str, rank: int = 0):
    """A zoo model converted with compensation on every block (of `rank`), with dynamic
    routers (trained-looking random weights) and a width-share cost table."""
    from flextron_fx.route import CostTable, inject_routers

    em = flextron_fx.flextronize(ZOO[name](), sample_inputs(name), calibration(),
                                 config=FlextronConfig(head_mode=head_mode, compensate="all",
                                                       compensation_rank=rank),
                                 progress=False)
    table = CostTable.coerce(em, width_share_costs(em))
    perturb_routers(inject_routers(em, "dynamic", cost=table, seed=3), seed=3, scale=2.0)
    return em, table


@pytest.mark.parametrize("name, head_mode, rank", [
    ("llama", "query", 0), ("llama", "group", 0), ("qwen2", "group", 0), ("gemma", "query", 0),
    ("gpt2", "query", 0),  # fused q/k/v, learned positions, biases
    ("gpt_neox", "group", 0),  # q/k/v fused per head, partial rotary, parallel residual
    ("opt", "query", 0),  # the MLP's fc1, fc2 in the decoder layer; tokens flattened
    ("llama", "group", 2)])  # the last: low-rank compensation inside the regions
def test_routed_generation_with_a_cache_equals_recomputing_the_routed_graph(name, head_mode,
                                                                              rank):
    """Per-token widths with a key/value cache (routed_hf) give the tokens, logits and
    costs of the routed elastic graph run on the whole sequence at every step; the cache
    holds every key/value head, since later tokens may use heads earlier ones did not."""
    from flextron_fx.export.generate import RoutedDecoder
    from flextron_fx.route import routers_of

    em, table = _dynamic(name, head_mode, rank)
    ids = token_ids(2, 5)
    cached, plain = RoutedDecoder(em, table, 0.6), RoutedDecoder(em, table, 0.6, cache=False)
    assert cached.cached is not None and plain.cached is None
    got, want = generate(cached, ids, 10).tokens, generate(plain, ids, 10).tokens
    assert torch.equal(got, want)
    assert cached.costs == pytest.approx(plain.costs, abs=1e-6)
    # logits, step by step, on the sequence just generated
    seq = torch.cat([ids, got], 1)
    cached.reset()
    steps = [cached.step(seq[:, :5])] + [cached.step(seq[:, i:i + 1]) for i in range(5, 14)]
    with torch.no_grad():
        ref = output(em, seq)[:, 4:14]
    assert_close(torch.stack(steps, 1), ref)
    chosen = {n: r.last_index for n, r in routers_of(em).items()}  # the whole sequence's
    assert any(len(set(i.reshape(-1).tolist())) > 1 for i in chosen.values())
    attention = next(op for op in em.ops.values() if op.kind == "attention")
    layer = cached.cached.cache.layers[0]
    assert layer.keys.shape[1] == attention.sizes.get("kv_heads", attention.sizes["heads"])
    assert layer.keys.shape[2] == 14
    # the routed model holds the elastic model's own weights, not copies
    path = em.block(attention.name).module_path
    proj = {"gpt2": "c_attn", "gpt_neox": "query_key_value"}.get(name, "k_proj")
    mine = getattr(cached.cached.model.get_submodule(path).attn, proj).weight
    graph = em.graph_module.get_parameter(f"{em.param_prefix}{path}.{proj}.weight")
    assert mine.data_ptr() == graph.data_ptr()


@pytest.mark.parametrize("name, why", [
    ("phi3", "no attention with q/k/v projections")])  # fused qkv_proj, layout not known
def test_routed_generation_without_a_cache_where_the_family_cannot_run_one(name, why):
    """routed_hf refuses clearly, saying why; RoutedDecoder recomputes the sequence."""
    from flextron_fx.export.generate import RoutedDecoder
    from flextron_fx.export.routed_hf import routed_hf

    em, table = _dynamic(name, "query")
    with pytest.raises(UnsupportedModelError, match=why):
        routed_hf(em)
    decoder = RoutedDecoder(em, table, 0.6)
    assert decoder.cached is None and why in decoder.why
    ids = token_ids(1, 4)
    assert torch.equal(generate(decoder, ids, 5).tokens,
                       generate(RoutedDecoder(em, table, 0.6, cache=False), ids, 5).tokens)


@pytest.mark.parametrize("name, head_mode, rank", [
    ("llama", "query", 0), ("qwen2", "group", 0),
    ("llama", "query", 2)])  # low-rank compensation: query heads' columns out of order
def test_the_routed_onnx_decoder_generates_what_routed_pytorch_does(name, head_mode, rank,
                                                                     tmp_path):
    """One ONNX file with the routers inside serves every budget: at each budget its tokens,
    its routers' choices (the printed costs) and its logits equal the routed PyTorch
    decoder's."""
    from flextron_fx.export.generate import OrtRoutedDecoder, RoutedDecoder
    from flextron_fx.export.routed_onnx import to_routed_onnx
    from flextron_fx.passes.inject_routers import budget_source

    em, table = _dynamic(name, head_mode, rank)
    # a budget calibration (calibrate_budget) travels in the file: 0.55 -> 0.4, 0.8 -> 0.8
    budget_source(em).calibration = {"inputs": [0.4, 0.8, 0.55], "costs": [0.1, 0.6, 0.9]}
    path = to_routed_onnx(em, tmp_path / "routed.onnx")
    ids = token_ids(1, 4)
    costs = []
    for budget in (0.55, 0.8):
        ort_decoder = OrtRoutedDecoder(path, table, budget)
        torch_decoder = RoutedDecoder(em, table, budget)
        got = generate(ort_decoder, ids, 8).tokens
        assert torch.equal(got, generate(torch_decoder, ids, 8).tokens)
        assert ort_decoder.costs == pytest.approx(torch_decoder.costs, abs=1e-6)
        costs.append(sum(ort_decoder.costs))
        seq = torch.cat([ids, got], 1)
        ort_decoder.reset()
        torch_decoder.reset()
        assert_close(ort_decoder.step(seq), torch_decoder.step(seq))
    assert costs[0] != pytest.approx(costs[1])  # the budget input changes the routers' choices
    two = token_ids(2, 3)  # rows of a batch, each with its own widths and cache
    ort_decoder, torch_decoder = OrtRoutedDecoder(path, table, 0.6), RoutedDecoder(em, table, 0.6)
    assert torch.equal(generate(ort_decoder, two, 5).tokens, generate(torch_decoder, two, 5).tokens)
    assert ort_decoder.costs == pytest.approx(torch_decoder.costs, abs=1e-6)
    with pytest.raises(InputError, match="got 1"):
        ort_decoder.step(two[:1, :1])
    from flextron_fx.route import CostTable

    with pytest.raises(InputError, match="does not fit"):  # another model's cost table
        OrtRoutedDecoder(path, CostTable("params", {"some.mlp#0": [1.0, 2.0]}), 0.6)


def test_the_routed_onnx_decoder_refuses_a_family_it_cannot_slice(tmp_path):
    from flextron_fx.export.routed_onnx import to_routed_onnx

    em, _ = _dynamic("gpt2", "query")
    with pytest.raises(UnsupportedModelError, match="q/k/v projections"):
        to_routed_onnx(em, tmp_path / "routed.onnx")
    assert not (tmp_path / "routed.onnx").exists()
