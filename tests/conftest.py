"""Shared test helpers: the one tolerance table, and converted zoo models cached per session."""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx import FlextronConfig

# One tolerance per dtype for every "same output" comparison in the suite.
ATOL = {torch.float32: 1e-4}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape and values within ATOL (absolute, no relative slack)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, atol=ATOL[expected.dtype], rtol=0)


def output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The tensor a model returns: logits, last_hidden_state (BertModel) or itself."""
    with torch.no_grad():
        out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def calibration(seed: int = 2, n: int = 8, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def token_ids(batch: int, seq: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="session")
def zoo_converted():
    """get(name, calibrated=True, head_mode="query", compensate="all") -> (original
    model, ElasticModel), with FlextronConfig's defaults otherwise (least-squares
    compensation of every block); compensate="none" gives plain sorted slices.

    Conversions are cached for the session (each takes about a second); the elastic
    model is handed out at full width.
    """
    cache: dict = {}

    def get(name: str, calibrated: bool = True, head_mode: str = "query",
            compensate: str = "all"):
        key = (name, calibrated, head_mode, compensate)
        if key not in cache:
            model = ZOO[name]()
            em = flextron_fx.flextronize(
                model, sample_inputs(name), calibration() if calibrated else None,
                config=FlextronConfig(head_mode=head_mode, compensate=compensate),
                progress=False)
            cache[key] = (model, em)
        model, em = cache[key]
        em.set_full()
        return model, em

    return get


def width_share_costs(em) -> dict[str, list[float]]:
    """A synthetic cost table: each candidate costs its share of the full width."""
    return {n: [c / op.full for c in op.candidates] for n, op in em.ops.items()}


def self_sampled_tokens(em, n: int = 48, seq: int = 14, seed: int = 0) -> torch.Tensor:
    """Text drawn from the full model itself: the full model is then the best predictor
    of it, and narrower sub-networks lose more (a learnable signal on random weights)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, 2), generator=g)
    with torch.no_grad():
        while ids.shape[1] < seq:
            p = torch.softmax(output(em, ids)[:, -1], -1)
            ids = torch.cat([ids, torch.multinomial(p, 1, generator=g)], 1)
    return ids


def perturb_routers(routers: dict, seed: int = 1, scale: float = 1.0) -> None:
    """Trained-looking router weights instead of the uniform start (all logits equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers.values():
            for p in r.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def saved_real_vocab_llama(folder) -> flextron_fx.ElasticModel:
    """A tiny Llama with SmolLM2's vocabulary (so the CLI can feed it real text), converted
    and saved to `folder`; returns the elastic model."""
    from zoo import _hf

    model = _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=49152, hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True)
    ids = torch.randint(0, 49152, (2, 8), generator=torch.Generator().manual_seed(0))
    em = flextron_fx.flextronize(model, (ids,), ids, progress=False)
    flextron_fx.save(em, folder)
    return em
