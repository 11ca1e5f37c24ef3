"""The fetched corpus: document splits, the fetch record, resumability, clear errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron_fx.data import corpus, domains
from flextron_fx.data.corpus import DataNotFetchedError, fetch, load_split, split_corpus
from flextron_fx.data.domains import Domain, _bible_chapters, _mostly_hangul, html_text

FOUR = {"test": 0.3, "validation": 0.05, "calibration": 0.1, "train": 0.55}


def ids(part):
    return {i for i, _ in part}


docs_strategy = st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=40)),
                         max_size=60, unique_by=lambda d: d[0])


@given(docs=docs_strategy, seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_split_is_a_partition_by_document(docs, seed):
    parts = split_corpus(docs, FOUR, seed=seed)
    seen = [i for p in parts.values() for i in ids(p)]
    assert len(seen) == len(set(seen)), "a document is in two splits"
    assert set(seen) == ids(docs)
    assert list(parts) == list(FOUR)


@given(docs=docs_strategy, seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_split_is_deterministic_and_order_free(docs, seed):
    parts = split_corpus(docs, FOUR, seed=seed)
    assert split_corpus(docs, FOUR, seed=seed) == parts
    again = split_corpus(list(reversed(docs)), FOUR, seed=seed)
    assert {k: ids(v) for k, v in again.items()} == {k: ids(v) for k, v in parts.items()}


def test_split_shares_follow_the_fractions_in_characters():
    docs = [(f"d{i}", "x" * (i * 37 % 101 + 1)) for i in range(2000)]
    parts = split_corpus(docs, FOUR, seed=0)
    total = sum(len(t) for _, t in docs)
    for name, frac in FOUR.items():
        share = sum(len(t) for _, t in parts[name]) / total
        assert abs(share - frac) < 0.01, (name, share)
    other = split_corpus(docs, FOUR, seed=1)
    assert ids(other["test"]) != ids(parts["test"])


def test_split_max_chars_keeps_whole_documents_in_hash_order():
    docs = [(f"d{i}", "y" * 100) for i in range(50)]
    parts = split_corpus(docs, FOUR, max_chars=1000)
    kept = [d for p in parts.values() for d in p]
    first = sorted(docs, key=lambda d: corpus.doc_hash(0, d[0]))[:10]
    assert ids(kept) == ids(first)


def test_split_rejects_duplicates_and_bad_fractions():
    with pytest.raises(ValueError, match="'a' occurs twice"):
        split_corpus([("a", "x"), ("b", "y"), ("a", "z")], FOUR)
    with pytest.raises(ValueError, match="sum to 1"):
        split_corpus([("a", "x")], {"test": 0.5, "train": 0.6})


@pytest.fixture
def fake_domains(monkeypatch):
    """Two tiny registered domains, one of which fails until `ok["b"]` is set."""
    calls = {"a": 0, "b": 0}
    ok = {"b": False}

    def extract_a(root):
        calls["a"] += 1
        return [(f"a{i}", f"alpha {i} " * 20) for i in range(40)], [
            {"kind": "local", "package": "fixture-a", "version": "1", "licence": "CC0",
             "where": "here"}]

    def extract_b(root):
        calls["b"] += 1
        if not ok["b"]:
            raise RuntimeError("mirror unreachable")
        return [("b0", "beta " * 50), ("b1", "gamma " * 50)], [
            {"kind": "local", "package": "fixture-b", "version": "2", "licence": "MIT",
             "where": "there"}]

    table = {"a": Domain("a", "english", extract_a, small=True),
             "b": Domain("b", "code", extract_b)}
    monkeypatch.setattr(domains, "DOMAINS", table)
    monkeypatch.setattr(corpus, "DOMAINS", table)
    return calls, ok


class WordCount:
    """Counts whitespace-separated words as tokens."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [t.split() for t in texts]}


def test_fetch_records_sources_sizes_and_survives_a_failing_source(tmp_path, fake_domains):
    calls, ok = fake_domains
    lines = []
    record = fetch("all", cache_dir=tmp_path, tokenizer=WordCount(), echo=lines.append)
    assert "b" in record["failures"] and "mirror unreachable" in record["failures"]["b"]
    assert any("[2/2] b: FAILED: RuntimeError: mirror unreachable" in ln for ln in lines)
    a = record["domains"]["a"]
    assert a["sources"][0]["licence"] == "CC0" and a["documents"] == 40
    assert a["tokens"] == 40 * 40 and a["chars"] == sum(len(f"alpha {i} " * 20)
                                                        for i in range(40))
    assert sum(s["documents"] for s in a["splits"].values()) == 40
    on_disk = json.loads((tmp_path / "corpus" / "record.json").read_text())
    assert on_disk["failures"]["b"] == record["failures"]["b"]
    # every document is in exactly one split file
    seen = [i for s in corpus.SPLITS for i, _ in load_split("a", s, tmp_path)]
    assert sorted(seen) == sorted(f"a{i}" for i in range(40))

    ok["b"] = True  # the source comes back: only b is fetched again
    record = fetch("all", cache_dir=tmp_path, tokenizer=WordCount(), echo=lines.append)
    assert calls == {"a": 1, "b": 2}
    assert record["failures"] == {} and set(record["domains"]) == {"a", "b"}
    assert load_split("b", "test", tmp_path) + load_split("b", "train", tmp_path) != []


def test_missing_data_and_unknown_names_say_what_to_do(tmp_path, fake_domains):
    with pytest.raises(DataNotFetchedError, match="flextron data fetch --domains a"):
        load_split("a", "test", tmp_path)
    with pytest.raises(ValueError, match="valid: a, b"):
        load_split("nope", "test", tmp_path)
    with pytest.raises(ValueError, match="valid: test, validation, calibration, train"):
        load_split("a", "dev", tmp_path)
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['zz'\]; valid: a, b"):
        domains.resolve_domains("a,zz")
    assert domains.resolve_domains("small") == ["a"]


def test_bible_dump_splits_by_chapter():
    dump = ("\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n"
            "  1 Thus the heavens.\n")
    assert _bible_chapters(dump) == [("Genesis 1", "In the beginning.\nAnd the earth."),
                                     ("Genesis 2", "Thus the heavens.")]


def test_html_text_keeps_the_display_area_only():
    page = ("<html><head><title>T</title><script>var x;</script></head><body>"
            "<header>menu</header><div id='DisplayArea'><h1>Suchleiste</h1>"
            "<p>Die <span>Suchleiste</span> sucht.</p><div class='tip'><p>Tipp</p></div>"
            "</div><footer>foot</footer></body></html>")
    assert html_text(page, area="DisplayArea") == "Suchleiste\nDie Suchleiste sucht.\nTipp"
    assert "menu" in html_text(page) and "var x" not in html_text(page)


def test_korean_filter_keeps_mostly_hangul_lines():
    assert _mostly_hangul("찾기 도구 모음을 엽니다 (Find)")  # 9 Hangul letters, 4 Latin
    assert not _mostly_hangul("Find toolbar 찾기")
    assert not _mostly_hangul("1234 !!")


def test_real_python_domain_splits_without_overlap(tmp_path):
    """The one domain that needs no download: the running interpreter's standard library."""
    docs, sources = domains.DOMAINS["python"].extract(tmp_path)
    assert len(docs) > 300 and sources[0]["licence"] == "PSF-2.0"
    assert not any(i.startswith("test/") for i, _ in docs)
    spec = domains.DOMAINS["python"]
    parts = split_corpus(docs, spec.splits, max_chars=spec.max_chars)
    seen = [i for p in parts.values() for i in ids(p)]
    assert len(seen) == len(set(seen))
    assert all(parts[s] for s in corpus.SPLITS)
    test_chars = sum(len(t) for _, t in parts["test"])
    assert abs(test_chars / sum(len(t) for p in parts.values() for _, t in p) - 0.3) < 0.05
