"""A uniform-width sub-network rebuilt in its source's Hugging Face class (`to_hf`)."""

from __future__ import annotations

import pytest
from conftest import assert_close, output, param_count, token_ids

from flextron_fx.errors import UnsupportedModelError
from flextron_fx.eval.harness import _task_model
from flextron_fx.eval.scoring import score
from flextron_fx.export.hf import to_hf


def _uniform(em, f):
    return em.resolve(f)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "phi3", "gemma"])
def test_every_uniform_width_is_the_same_network_in_the_hf_class(name, zoo_converted):
    model, em = zoo_converted(name, head_mode="group")
    ids = token_ids(2, 9)
    seen = set()
    for f in (1.0, 0.75, 0.5, 0.25):
        widths = _uniform(em, f)
        small = to_hf(em, f)
        assert type(small) is type(model)
        cfg = small.config
        mlp = {w for n, w in widths.items() if em.ops[n].kind == "mlp"}
        heads = {w for n, w in widths.items() if em.ops[n].kind == "attention"}
        assert {cfg.intermediate_size} == mlp
        assert {cfg.num_attention_heads} == (heads or {model.config.num_attention_heads})
        assert param_count(small) == em.num_params(widths)
        em.set_widths(widths)
        assert_close(output(small, ids), output(em, ids))
        seen.add((cfg.intermediate_size, cfg.num_attention_heads))
    em.set_full()
    assert len(seen) >= 2  # the fractions did give different networks


def test_the_key_value_cache_of_the_rebuilt_model_scores_like_the_graph(zoo_converted):
    """Few-shot scoring reuses the cache of a shared prefix on the HF model; the elastic
    graph runs every sequence whole. Both give the same log-likelihoods."""
    _, em = zoo_converted("llama", head_mode="group")
    em.set_widths(0.5)
    scorer = _task_model(em, True, echo=lambda msg: None)
    assert type(scorer).__name__ == "LlamaForCausalLM"
    prefix = token_ids(1, 20, seed=5)[0].tolist()
    conts = token_ids(4, 3, seed=6).tolist()
    pairs = [(prefix + [i + 1], c) for i, c in enumerate(conts)] + [(prefix, conts[0])]
    cached = score(scorer, pairs, min_prefix=8, progress=False)
    whole = score(em, pairs, prefix_cache=False, progress=False)
    for (a, ga), (b, gb) in zip(cached, whole):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
    em.set_full()


def test_widths_that_differ_across_layers_give_the_per_layer_class(zoo_converted):
    """A config of the source class cannot hold per-layer sizes: export/sliced.py's
    Flextron<Class> does (tests/test_generate.py covers it in depth)."""
    _, em = zoo_converted("llama", head_mode="group")
    mlp = [n for n, op in em.ops.items() if op.kind == "mlp"]
    widths = {mlp[0]: em.ops[mlp[0]].candidates[0]}
    small = to_hf(em, widths)
    assert type(small).__name__ == "FlextronLlamaForCausalLM"
    assert small.get_parameter(em.block(mlp[0]).out_proj.weight[len(em.param_prefix):]
                               ).shape[1] == em.ops[mlp[0]].candidates[0]
    with em.at(widths):
        assert_close(output(small, token_ids(2, 7)), output(em, token_ids(2, 7)))


def test_query_mode_heads_that_keep_every_group_export_too(zoo_converted):
    """Head mode "query" at 2 of 4 heads keeps both key/value heads, one query head each:
    still a grouped attention the class expresses (2 heads over 2 groups)."""
    _, em = zoo_converted("llama", head_mode="query")
    heads = {n: 2 for n, op in em.ops.items() if op.kind == "attention"}
    small = to_hf(em, heads)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
    em.set_widths(heads)
    ids = token_ids(2, 7)
    assert_close(output(small, ids), output(em, ids))
    em.set_full()


@pytest.mark.parametrize("name", ["gpt2", "nanogpt"])
def test_models_without_a_llama_style_class_are_refused_and_tasks_use_the_graph(
        name, zoo_converted):
    _, em = zoo_converted(name)
    with pytest.raises(UnsupportedModelError, match="materialize"):
        to_hf(em)
    said = []
    assert _task_model(em, True, echo=said.append) is em
    assert "without a key/value cache" in said[0]
