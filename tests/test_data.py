
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron_fx.data import (
    calibration_and_heldout,
    split_documents,
    token_blocks,
    wikipedia_articles,
    wikitext_to_plain,
)
from flextron_fx.data.corpus import split_corpus
from flextron_fx.data.domains import DOMAINS


class CharTokenizer:
    """One token per character; id 0 is EOS and never produced by encode."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 1000 + 1 for c in text]


DOCS = [(f"article {i}", f"text of article {i}") for i in range(200)]


def titles(docs):
    return {t for t, _ in docs}


@given(seed=st.integers(0, 2**31), frac=st.floats(0.0, 1.0))
@settings(max_examples=30, deadline=None)
def test_split_is_a_partition_by_document(seed, frac):
    calib, held = split_documents(DOCS, heldout_fraction=frac, seed=seed)
    assert titles(calib).isdisjoint(titles(held))
    assert titles(calib) | titles(held) == titles(DOCS)
    assert len(calib) + len(held) == len(DOCS)


def test_split_is_deterministic_order_free_and_seeded():
    calib, held = split_documents(DOCS, seed=3)
    assert split_documents(DOCS, seed=3) == (calib, held)
    _, held_rev = split_documents(DOCS[::-1], seed=3)
    assert titles(held_rev) == titles(held)
    assert titles(split_documents(DOCS, seed=4)[1]) != titles(held)
    assert 20 <= len(held) <= 60  # 0.2 of 200, with generous binomial slack


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(DOCS, heldout_fraction=1.5)


def test_token_blocks_joins_documents_with_eos_and_drops_tail():
    tok = CharTokenizer()
    blocks = token_blocks(tok, ["abc", "de", "fghij"], seq_len=4)
    flat = [ord(c) % 1000 + 1 for c in "abc"] + [0] + [ord(c) % 1000 + 1 for c in "de"] + [0]
    flat += [ord(c) % 1000 + 1 for c in "fghij"]
    assert blocks.dtype == torch.long
    assert blocks.shape == (3, 4)  # 12 ids of 12; with seq_len 5 the tail would drop
    assert blocks.flatten().tolist() == flat
    assert token_blocks(tok, ["abc", "de", "fghij"], seq_len=5).shape == (2, 5)
    assert token_blocks(tok, ["abc", "de", "fghij"], seq_len=2, max_blocks=3).shape == (3, 2)
    assert token_blocks(tok, ["ab"], seq_len=5).shape == (0, 5)


def test_wikitext_to_plain_drops_markup():
    raw = ("'''Ada''' is a [[Programming language|language]].<ref>{{cite web|url=x}}</ref>\n"
           "[[File:Ada.png|thumb|A caption]]\n{| class=wikitable\n| cell\n|}\n"
           "It was named after [[Ada Lovelace]]. {{Citation needed}}\n[[Category:Languages]]")
    assert wikitext_to_plain(raw) == ("Ada is a language.\n"
                                      "It was named after Ada Lovelace.")


@pytest.fixture(scope="session")
def wiki_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("flextron_cache")


def test_wikipedia_articles_are_plain_text(wiki_cache):
    docs = wikipedia_articles(cache_dir=wiki_cache)
    assert len(docs) >= 80
    assert len(titles(docs)) == len(docs)
    for title, text in docs:
        assert len(text) >= 500, title
        assert "[[" not in text and "{{" not in text and "<ref" not in text, title
    assert wikipedia_articles(cache_dir=wiki_cache) == docs  # the JSON cache round-trips


def test_calibration_and_heldout_use_disjoint_articles(wiki_cache):
    """Calibration and held-out text are the Wikipedia domain's calibration and validation
    splits: never the test split that `flextron eval` reports."""
    tok = CharTokenizer()
    calib, held, source = calibration_and_heldout(tok, seq_len=64, n_calib=32,
                                                  n_heldout_tokens=640, cache_dir=wiki_cache)
    assert calib.shape == (32, 64) and held.shape == (10, 64)
    assert "validation articles" in source
    docs = wikipedia_articles(cache_dir=wiki_cache)
    parts = split_corpus(docs, DOMAINS["wikipedia"].splits)
    assert held[0].tolist() == tok.encode(parts["validation"][0][1])[:64]
    assert calib[0].tolist() == tok.encode(parts["calibration"][0][1])[:64]
    test_text = {t for _, t in parts["test"]}
    assert not test_text & {t for _, t in parts["calibration"] + parts["validation"]}
    with pytest.raises(ValueError, match="held-out text too short"):
        calibration_and_heldout(tok, seq_len=64, n_calib=1, n_heldout_tokens=10**9,
                                cache_dir=wiki_cache)
