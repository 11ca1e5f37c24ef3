"""A uniform-width sub-network rebuilt in its source's Hugging Face class (`to_hf`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import assert_close, output, param_count, token_ids

from flextron_fx.errors import UnsupportedModelError
from flextron_fx.eval.harness import _task_model
from flextron_fx.eval.scoring import score
from flextron_fx.export.hf import to_hf


def _uniform(em, f):
    return em.resolve(f)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "phi3", "gemma"])
def test_every_uniform_width_is_the_same_network_in_the_hf_class(name, zoo_converted):
    model, em = zoo_converted(name, head_mode="group", compensate="none")
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


def test_a_model_not_from_hugging_face_is_refused_and_tasks_use_the_graph(zoo_converted):
    _, em = zoo_converted("nanogpt")
    with pytest.raises(UnsupportedModelError, match="materialize"):
        to_hf(em)
    said = []
    assert _task_model(em, True, echo=said.append) is em
    assert "without a key/value cache" in said[0]


# the config field of the MLP width; these configs tie the head size to hidden / heads
_MLP_FIELD = {"gpt2": "n_inner", "gpt_neox": "intermediate_size", "opt": "ffn_dim"}


def test_gpt2_neox_and_opt_reload_in_a_fresh_process(zoo_converted, tmp_path):
    """An MLP cut is a standard checkpoint that plain transformers loads (the process never
    imports flextron_fx); a head cut, which these configs cannot hold, is a Flextron class
    that AutoModelForCausalLM loads once flextron_fx is imported. Both give the elastic
    graph's logits."""
    ids = token_ids(2, 7)
    torch.save(ids, tmp_path / "ids.pt")
    cases = []
    for name, field in _MLP_FIELD.items():
        _, em = zoo_converted(name, head_mode="group")
        mlp_half = {n: op.candidates[1] if op.kind == "mlp" else op.candidates[-1]
                    for n, op in em.ops.items()}
        for cut, widths in (("mlp", mlp_half), ("both", em.resolve(0.5))):
            small = to_hf(em, widths)
            plain = cut == "mlp"
            assert type(small).__name__.startswith("Flextron") is not plain
            if plain:
                assert getattr(small.config, field) == \
                    next(w for n, w in widths.items() if em.ops[n].kind == "mlp")
            folder = tmp_path / f"{name}-{cut}"
            small.save_pretrained(folder)
            with em.at(widths):
                torch.save(output(em, ids), folder / "want.pt")
            cases.append((str(folder), plain))
    script = "\n".join([
        "import sys, torch",
        f"cases = {cases!r}",
        "for folder, plain in sorted(cases, key=lambda c: not c[1]):",
        "    if not plain: import flextron_fx",
        "    from transformers import AutoModelForCausalLM",
        "    m = AutoModelForCausalLM.from_pretrained(folder).eval()",
        f"    ids = torch.load({str(tmp_path / 'ids.pt')!r})",
        "    with torch.no_grad(): got = m(ids).logits",
        "    err = float((got - torch.load(folder + '/want.pt')).abs().max())",
        "    print(folder, type(m).__name__, 'flextron_fx' in sys.modules, err)"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(rows) == len(cases)
    for folder, cls, imported, err in rows:
        plain = dict(cases)[folder]
        assert cls.startswith("Flextron") is not plain
        assert imported == str(not plain)  # the plain ones loaded before flextron_fx
        assert float(err) <= 1e-5, (folder, err)
