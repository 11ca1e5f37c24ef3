import math
from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron_fx.eval import perplexity


def bigram_logits(vocab, seed=0):
    """A deterministic logits function: a fixed random table indexed by the input id."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
    return lambda ids: table[ids]


def reference_loss(fn, tokens):
    logits = fn(tokens)
    ce = torch.nn.CrossEntropyLoss()  # mean over all predicted tokens
    return ce(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()


def test_matches_cross_entropy_loss():
    fn = bigram_logits(11)
    tokens = torch.randint(0, 11, (5, 9), generator=torch.Generator().manual_seed(1))
    r = perplexity(fn, tokens, batch_size=2)
    expected = reference_loss(fn, tokens)
    assert r["tokens"] == 5 * 8
    assert math.isclose(r["loss"], expected, rel_tol=1e-6)
    assert math.isclose(r["ppl"], math.exp(expected), rel_tol=1e-6)


def test_accepts_outputs_with_logits_and_modules():
    fn = bigram_logits(7)
    tokens = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(2))
    plain = perplexity(fn, tokens)
    wrapped = perplexity(lambda ids: SimpleNamespace(logits=fn(ids)), tokens)
    emb = torch.nn.Embedding(7, 7)
    emb.weight.data.copy_(fn(torch.arange(7)))
    module = perplexity(emb, tokens)
    assert wrapped == plain
    assert math.isclose(module["loss"], plain["loss"], rel_tol=1e-6)


@given(n=st.integers(1, 9), length=st.integers(2, 12), vocab=st.integers(2, 17),
       batch_size=st.integers(1, 10), seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_batch_size_does_not_change_the_result(n, length, vocab, batch_size, seed):
    fn = bigram_logits(vocab, seed)
    tokens = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    whole = perplexity(fn, tokens, batch_size=n)
    split = perplexity(fn, tokens, batch_size=batch_size)
    assert split["tokens"] == whole["tokens"] == n * (length - 1)
    assert math.isclose(split["loss"], whole["loss"], rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(whole["loss"], reference_loss(fn, tokens), rel_tol=1e-5, abs_tol=1e-6)


def test_uniform_model_has_vocab_size_perplexity():
    tokens = torch.randint(0, 13, (4, 5))
    r = perplexity(lambda ids: torch.zeros(*ids.shape, 13), tokens)
    assert math.isclose(r["ppl"], 13.0, rel_tol=1e-6)
