"""Every zoo architecture: what is detected, and that every width computes what it should."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, output, param_count, token_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import ZOO

NAMES = sorted(ZOO)

# Facts read off the zoo configs: (heads, kv_heads, head_dim, model_dim, mlp hidden).
SIZES = {
    "llama": (4, 2, 16, 64, 96), "mistral": (4, 2, 16, 64, 96), "qwen2": (4, 2, 16, 64, 96),
    "phi3": (4, 2, 16, 64, 96), "gemma": (4, 1, 16, 64, 96), "gpt_neox": (4, 4, 16, 64, 96),
    "opt": (4, 4, 16, 64, 96), "bert": (4, 4, 16, 64, 96), "gpt2": (4, 4, 16, 64, 256),
    "nanogpt": (4, 4, 16, 64, 256),
}

# role -> module (inside layer 0) whose weight plays it, for the attention and MLP blocks.
_LLAMA = ({"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj"},
          {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"})
ROLES = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    # with a single KV head there is no head axis on k/v: only q and o are sliced
    "gemma": ({"q": "self_attn.q_proj", "o": "self_attn.o_proj"}, _LLAMA[1]),
    "phi3": ({"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj"},
             {"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}),
    "gpt2": ({"qkv": "attn.c_attn", "o": "attn.c_proj"}, {"up": "mlp.c_fc", "down": "mlp.c_proj"}),
    "gpt_neox": ({"qkv": "attention.query_key_value", "o": "attention.dense"},
                 {"up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}),
    "opt": ({"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.out_proj"}, {"up": "fc1", "down": "fc2"}),
    "bert": ({"q": "attention.self.query", "k": "attention.self.key",
              "v": "attention.self.value", "o": "attention.output.dense"},
             {"up": "intermediate.dense", "down": "output.dense"}),
    "nanogpt": ({"qkv": "c_attn", "o": "c_proj"}, {"up": "c_fc", "down": "mlp_proj"}),
}
LAYER0 = {"llama": "model.layers.0.", "mistral": "model.layers.0.", "qwen2": "model.layers.0.",
          "phi3": "model.layers.0.", "gemma": "model.layers.0.", "gpt2": "transformer.h.0.",
          "gpt_neox": "gpt_neox.layers.0.", "opt": "model.decoder.layers.0.",
          "bert": "encoder.layer.0.", "nanogpt": "h.0."}


def _is_full(em) -> bool:
    return all(em.widths[n] == op.full for n, op in em.ops.items())


@pytest.mark.parametrize("name", NAMES)
def test_detects_two_attention_and_two_mlp_blocks(name, zoo_converted):
    _, em = zoo_converted(name)
    heads, kv, head_dim, model_dim, hidden = SIZES[name]
    assert em.skipped == []
    assert [op.kind for op in em.ops.values()] == ["attention", "mlp", "attention", "mlp"]
    for op in em.ops.values():
        if op.kind == "attention":
            assert op.sizes == {"heads": heads, "kv_heads": kv, "head_dim": head_dim,
                                "model_dim": model_dim}
            assert op.full == heads
            # query mode: with GQA only whole multiples of the groups; otherwise every count
            assert op.candidates == ((2, 4) if 1 < kv < heads else (1, 2, 3, 4))
        else:
            assert op.sizes == {"hidden": hidden, "model_dim": model_dim}
            assert op.full == hidden
            assert op.candidates == ((32, 48, 64, 96) if hidden == 96 else (64, 128, 192, 256))


@pytest.mark.parametrize("name", NAMES)
def test_projection_roles_name_the_right_weights(name, zoo_converted):
    _, em = zoo_converted(name)
    prefix = em.param_prefix + LAYER0[name]
    attn, mlp = list(em.ops)[:2]
    for op_name, expected in zip((attn, mlp), ROLES[name]):
        projs = em.block(op_name).projections
        got = {p.role: p.weight for p in projs}
        assert got == {role: f"{prefix}{mod}.weight" for role, mod in expected.items()}
        assert projs[-1].role in ("o", "down")  # the out-projection comes last


@pytest.mark.parametrize("name", NAMES)
def test_full_width_with_calibration_equals_original(name, zoo_converted):
    model, em = zoo_converted(name)
    ids = token_ids(3, 11)  # differs from the [2, 8] sample the graph was traced with
    expected = output(model, ids)
    assert_close(output(em, ids), expected)
    assert_close(output(em.materialize(), ids), expected)
    # the calibration really reordered weights, so the equality above is not vacuous
    original = dict(model.named_parameters())
    moved = [p.weight for op in em.ops for p in em.block(op).projections
             if not torch.equal(em.graph_module.get_parameter(p.weight),
                                original[p.weight.removeprefix(em.param_prefix)])]
    assert moved


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_widths_match_materialized_model(name, zoo_converted, data):
    _, em = zoo_converted(name)
    widths = {n: data.draw(st.sampled_from(op.candidates), label=n) for n, op in em.ops.items()}
    batch = data.draw(st.integers(1, 3), label="batch")
    seq = data.draw(st.integers(2, 12), label="seq")
    ids = token_ids(batch, seq, seed=batch * 100 + seq)
    em.set_widths(widths)
    assert em.widths == widths
    dense = em.materialize()
    assert_close(output(dense, ids), output(em, ids))

    full = em.num_params(1.0)
    small = param_count(dense)
    assert em.num_params() == small  # the parameter model, exact, without slicing
    assert em.num_params(widths) == small
    assert small <= full
    if not _is_full(em):
        assert small < full
    else:
        assert small == full
    flextron = [type(m).__name__ for m in dense.modules()
                if type(m).__name__.startswith(("Weight", "Shape"))]
    assert flextron == []


@pytest.mark.parametrize("name", NAMES)
def test_mlp_widths_are_nested_prefixes(name, zoo_converted):
    """Without compensation every width's weights are a prefix of the next width's (with
    it, materialize folds each width's own low-rank correction into its slice)."""
    _, em = zoo_converted(name, compensate="none")
    op = next(op for op in em.ops.values() if op.kind == "mlp")
    down = em.block(op.name).out_proj
    weights = {}
    for c in op.candidates:
        w = em.materialize({op.name: c}).get_parameter(down.weight)
        assert w.shape[down.axis] == c
        weights[c] = w
    for small, large in zip(op.candidates, op.candidates[1:]):
        assert torch.equal(weights[small], weights[large].narrow(down.axis, 0, small))
    # materialize must not leave the elastic model at the widths it exported
    assert _is_full(em)


def test_non_embedding_parameters_leave_out_the_token_embedding(zoo_converted):
    model, em = zoo_converted("llama")
    table = model.get_input_embeddings().weight.numel()
    for widths in (1.0, 0.5):
        assert em.num_params(widths) - em.num_params(widths, non_embedding=True) == table
    assert em.num_params(0.5, non_embedding=True) < em.num_params(1.0, non_embedding=True)
