"""Trace generality (issue 16, item 8): which input dims vary is inferred or given, never
assumed; bounds and specialisations in forward() become bounds and static dims of the
graph with a clear error past them; a graph that bakes in the batch size is refused."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import assert_close, output, param_count
from torch import nn

import flextron_fx
from flextron_fx import InputShapeError, TraceError


def _ids(batch: int, seq: int, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- a minimal GPT as the popular single-file implementations write it -------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class MinimalGPT(nn.Module):
    def __init__(self, vocab: int = 64, block_size: int = 16, n_embd: int = 32,
                 n_head: int = 4, n_layer: int = 2):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(GPTBlock(n_embd, n_head, block_size) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying

    def forward(self, idx):
        _, t = idx.size()
        assert t <= self.block_size, f"Cannot forward sequence of length {t}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _perturbed(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():  # no parameter left at exactly 0 or 1: permutation bugs show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = _perturbed(MinimalGPT())
    em = flextron_fx.flextronize(model, (_ids(2, 8),), _ids(8, 16, seed=1), progress=False)
    return model, em


def test_minimal_gpt_traces_with_its_block_size_bound(gpt):
    model, em = gpt
    assert sorted(op.kind for op in em.ops.values()) == ["attention"] * 2 + ["mlp"] * 2
    for shape in [(3, 16), (5, 2), (2, 11)]:  # other batches and lengths, up to block_size
        ids = _ids(*shape, seed=4)
        em.set_full()
        assert_close(em(ids), output(model, ids))
        em.set_widths(0.5)
        half = em(ids)
        assert_close(half, em.materialize()(ids))
        assert not torch.allclose(half, output(model, ids), atol=1e-3)
    assert em.num_params() < param_count(model)  # tied lm_head counted once, blocks sliced


def test_minimal_gpt_past_its_block_size_is_a_clear_error(gpt):
    _, em = gpt
    with pytest.raises(InputShapeError, match=r"dim 1 must be 2 to 16.*bounds seq to 2\.\.16"):
        em(_ids(2, 17))


# ---- a forward() that specialises on the sequence length ----------------------------------

class FixedLength(nn.Module):
    """Learned positions added whole (no slicing): only length 8 broadcasts."""

    def __init__(self, vocab: int = 64, width: int = 16, length: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(1, length, width))
        self.up, self.down = nn.Linear(width, 48), nn.Linear(48, width)

    def forward(self, ids):
        x = self.emb(ids) + self.pos
        return x + self.down(torch.relu(self.up(x)))


def test_sequence_specialised_model_falls_back_to_a_static_length():
    model = _perturbed(FixedLength())
    with pytest.warns(UserWarning, match="traced for length 8 only"):
        em = flextron_fx.flextronize(model, (_ids(2, 8),), _ids(10, 8, seed=1), progress=False)
    ids = _ids(5, 8, seed=2)  # any batch still works
    assert_close(em(ids), output(model, ids))
    em.set_widths(0.5)
    assert_close(em(ids), em.materialize()(ids))
    with pytest.raises(InputShapeError, match=r"shape \(2, 9\).*dim 1 must be exactly 8.*"
                                              r"specialises on the sequence length"):
        em(_ids(2, 9))
    with pytest.raises(InputShapeError, match="dim 1 must be exactly 8"):
        em.materialize()(_ids(2, 9))


# ---- a forward() that bakes in the batch size ---------------------------------------------

class RowScaled(nn.Module):
    """Scales each row by a buffer sized for the example batch (a batch-size bound)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)
        self.register_buffer("scale", torch.ones(2, 1, 1))

    def forward(self, ids):
        x = self.emb(ids) * self.scale[: ids.shape[0]]
        return self.down(torch.relu(self.up(x)))


class FirstRows(nn.Module):
    """Keeps at most two rows: at batch 2 nothing shows, at batch 3 a row goes missing."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, ids):
        x = self.down(torch.relu(self.up(self.emb(ids))))
        return x.narrow(0, 0, min(ids.shape[0], 2))


def test_graph_that_bakes_in_the_batch_size_is_refused_at_trace_time():
    # export accepts it (batch >= 2 is all it asks), but at batch 3 a row goes missing
    with pytest.raises(TraceError, match=r"does not run correctly at batch size 3 \(traced at "
                                         r"2\): an output of shape \(2, 8, 16\) at batch 2 "
                                         r"has shape \(2, 8, 16\) at batch 3.*What to do: "
                                         r"derive every batch-sized"):
        flextron_fx.flextronize(FirstRows(), (_ids(2, 8),), progress=False)


def test_code_that_fixes_the_batch_size_is_named():
    with pytest.raises(TraceError, match="(?s)RowScaled.*forward\\(\\) fixes the batch size to 2"):
        flextron_fx.flextronize(RowScaled(), (_ids(2, 8),), progress=False)


# ---- inputs that are not token ids ---------------------------------------------------------

def test_feature_vectors_have_no_sequence_axis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    em = flextron_fx.flextronize(model, (torch.randn(2, 8),), torch.randn(16, 8),
                                 progress=False)
    x = torch.randn(5, 8)
    assert_close(em(x), model(x).detach())
    em.set_widths(0.5)
    assert_close(em(x), em.materialize()(x))


@pytest.fixture(scope="module")
def vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, image_size=16, patch_size=8,
                                    num_channels=3, num_labels=5)
    torch.manual_seed(0)
    model = _perturbed(transformers.ViTForImageClassification(config))
    g = torch.Generator().manual_seed(1)
    em = flextron_fx.flextronize(model, (torch.randn(2, 3, 16, 16, generator=g),),
                                 torch.randn(8, 3, 16, 16, generator=g), progress=False)
    return model, em


def test_vision_transformer_from_transformers(vit):
    model, em = vit
    assert sorted(op.kind for op in em.ops.values()) == ["attention"] * 2 + ["mlp"] * 2
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    full = em(x)
    assert full.shape == (3, 5)  # classification logits
    assert_close(full, output(model, x))
    em.set_widths(0.5)
    half = em(x)
    assert_close(half, em.materialize()(x))
    assert not torch.allclose(half, full, atol=1e-3)
    with pytest.raises(InputShapeError, match=r"dim 2 must be exactly 16"):
        em(torch.randn(3, 3, 24, 24))
    em.set_full()


def test_dynamic_shapes_given_by_the_user_are_used():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    em = flextron_fx.flextronize(model, (torch.randn(2, 4, 8),), progress=False,
                                 dynamic_shapes=({0: batch},))  # the length stays 4
    x = torch.randn(7, 4, 8)
    assert_close(em(x), model(x).detach())
    with pytest.raises(InputShapeError, match="dim 1 must be exactly 4"):
        em(torch.randn(7, 5, 8))
    with pytest.raises(InputShapeError, match="dim 0 must be 1 to 64"):
        em(torch.randn(65, 4, 8))


def test_dynamic_shapes_without_the_batch_is_refused():
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    with pytest.raises(TraceError, match="static batch size 2.*mark dim 0"):
        flextron_fx.flextronize(model, (torch.randn(2, 4, 8),), progress=False,
                                dynamic_shapes=({1: torch.export.Dim("seq")},))


def test_several_inputs_share_the_batch_and_sequence_dims():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 16)
            self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)

        def forward(self, ids, mask):
            x = self.emb(ids) * mask[..., None]
            return self.down(torch.relu(self.up(x)))

    model = _perturbed(Masked())
    mask = torch.ones(2, 8)
    em = flextron_fx.flextronize(model, (_ids(2, 8), mask.bool()), progress=False)
    ids, m = _ids(3, 5, seed=3), torch.rand(3, 5) > 0.3
    with torch.no_grad():
        assert_close(em(ids, m), model(ids, m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        em(_ids(4, 6), torch.ones(4, 6, dtype=torch.bool))


# ---- a Hugging Face class traced again in the same process -------------------------------

def test_a_second_trace_of_the_same_hf_config_reuses_the_graph_with_its_own_weights(
        monkeypatch):
    """Loading a saved model, training and exporting each trace the same class again: the
    graph is reused, but every traced model computes with its own weights, and a model
    whose config or forward differs is traced afresh."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flextron_fx import trace as T

    calls = []
    real = T._export_inferred
    monkeypatch.setattr(T, "_export_inferred", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(T, "_PROGRAMS", type(T._PROGRAMS)())
    config = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    torch.manual_seed(0)
    first, second = (LlamaForCausalLM(LlamaConfig(**config)).eval() for _ in range(2))
    ids, other = _ids(2, 8), _ids(3, 11, seed=1)
    graphs = [T.trace(m, (ids,)).graph_module for m in (first, second)]
    assert len(calls) == 1  # the second came from the first's graph
    with torch.no_grad():
        for model, gm in zip((first, second), graphs):
            assert_close(gm(other), model(other).logits)
        assert (graphs[0](other) - graphs[1](other)).abs().max() > 1e-3
        # the traced graphs own their weights: changing one leaves the user's model alone
        next(graphs[1].parameters()).add_(1.0)
        assert_close(graphs[0](other), first(other).logits)
    T.trace(LlamaForCausalLM(LlamaConfig(**{**config, "num_hidden_layers": 1})), (ids,))
    assert len(calls) == 2
    patched = LlamaForCausalLM(LlamaConfig(**config)).eval()
    inner = patched.model.layers[0].mlp
    inner.forward = lambda x, _f=inner.forward: 2 * _f(x)
    gm = T.trace(patched, (ids,)).graph_module
    assert len(calls) == 3
    with torch.no_grad():
        assert_close(gm(other), patched(other).logits)
