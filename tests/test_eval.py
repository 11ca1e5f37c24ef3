"""Loss per domain, continuation scoring, lm-eval task scoring and the eval harness outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import ZOO, sample_inputs

from flextron_fx.data import corpus, domains
from flextron_fx.data.domains import Domain
from flextron_fx.eval.loss import domain_loss
from flextron_fx.eval.scoring import score
from flextron_fx.eval.tasks import TaskRequests, resolve_tasks, run_tasks, sample_docs

VOCAB = 11


def bigram(vocab=VOCAB, seed=0):
    """logits = a fixed random table indexed by the input id."""
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))
    return table, (lambda ids: table[ids])


# ---- continuation scoring ------------------------------------------------------------------
def test_score_sums_the_continuation_log_probs_by_hand():
    table, fn = bigram()
    logp = torch.log_softmax(table, -1)
    ctx, cont = [3, 1, 4], [1, 5]
    (ll, greedy), = score(fn, [(ctx, cont)], progress=False)
    assert math.isclose(ll, (logp[4, 1] + logp[1, 5]).item(), rel_tol=1e-6)
    assert greedy == (logp[4].argmax().item() == 1 and logp[1].argmax().item() == 5)
    best = [logp[4].argmax().item()]
    assert score(fn, [(ctx, best)], progress=False)[0][1] is True


@given(pairs=st.lists(st.tuples(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=9),
                                st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=4)),
                      min_size=1, max_size=12),
       batch_tokens=st.integers(1, 64))
@settings(max_examples=40, deadline=None)
def test_score_does_not_depend_on_batching_or_shared_inputs(pairs, batch_tokens):
    _, fn = bigram()
    alone = [score(fn, [p], progress=False)[0] for p in pairs]
    together = score(fn, pairs, batch_tokens=batch_tokens, progress=False)
    for (a, ga), (b, gb) in zip(alone, together, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5) and ga == gb


def test_score_truncates_the_context_on_the_left():
    _, fn = bigram()
    long_ctx = list(range(VOCAB)) * 3
    ll_trunc = score(fn, [(long_ctx, [2])], max_length=4, progress=False)[0][0]
    ll_short = score(fn, [(long_ctx[-3:], [2])], progress=False)[0][0]
    assert math.isclose(ll_trunc, ll_short, rel_tol=1e-6)  # a bigram only sees the last id


def test_prefix_cache_of_a_hf_model_gives_the_same_scores():
    model = ZOO["llama"]()
    shared = list(range(5, 75))
    pairs = [(shared + [i, i + 1], [i + 2, 9]) for i in range(6)] + [([1, 2], [3])]
    # the same context with answers that start alike: the cached prefix must stop before
    # the answers, or their first tokens' log-probs would be lost
    pairs += [(shared, [40, 41, 42]), (shared, [40, 41, 43]), (shared, [40, 44])]
    cached = score(model, pairs, prefix_cache=True, min_prefix=32, progress=False)
    plain = score(model, pairs, prefix_cache=False, progress=False)
    for (a, ga), (b, gb) in zip(cached, plain, strict=True):
        assert abs(a - b) < 1e-4 and ga == gb


# ---- task scoring through lm-eval ----------------------------------------------------------
class FixedLM:
    """A stand-in lm whose log-likelihood of each continuation is given by a table."""

    def __init__(self, table):
        self.table = table

    def loglikelihood(self, instances):
        return [(self.table[inst.args[1].strip()], False) for inst in instances]


@pytest.fixture
def arc_fixture(tmp_path):
    """lm-eval's own ARC-Easy task definition over three hand-made questions."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from flextron_fx.eval.tasks import _lm_eval_tasks_dir

    docs = [
        {"id": "q1", "question": "One?", "answerKey": "A",
         "choices": {"text": ["a", "bbbb"], "label": ["A", "B"]}},
        {"id": "q2", "question": "Two?", "answerKey": "B",
         "choices": {"text": ["cc", "dddddddd"], "label": ["A", "B"]}},
        {"id": "q3", "question": "Three?", "answerKey": "C",
         "choices": {"text": ["e", "ff", "ggg"], "label": ["A", "B", "C"]}},
    ]
    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "fx_arc_fixture.yaml").write_text(json.dumps({
        "include": str(_lm_eval_tasks_dir() / "arc/arc_easy.yaml"), "task": "fx_arc_fixture",
        "tag": [], "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "training_split": None,
        "validation_split": None, "test_split": "test", "num_fewshot": 0}))
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = manager.load(["fx_arc_fixture"])["tasks"]
    tasks["fx_arc_fixture"].build_all_requests(samples=[0, 1, 2], rank=0, world_size=1)
    return tasks


def test_acc_and_acc_norm_follow_lm_eval_on_hand_checked_examples(arc_fixture):
    inst = arc_fixture["fx_arc_fixture"].instances[0]
    assert inst.args == ("Question: One?\nAnswer:", " a")
    # q1: lls -1 vs -2: acc picks "a" (right); per character -1/1 vs -2/4: acc_norm picks "bbbb".
    # q2: lls -1 vs -4: acc picks "cc" (wrong); per character -0.5 vs -0.5: a tie, argmax
    #     takes the first, "cc" (wrong).
    # q3: lls -3, -2.5, -2.9: acc picks "ff" (wrong); per character -3, -1.25, -0.967:
    #     acc_norm picks "ggg" (right).
    lm = FixedLM({"a": -1.0, "bbbb": -2.0, "cc": -1.0, "dddddddd": -4.0,
                  "e": -3.0, "ff": -2.5, "ggg": -2.9})
    r = run_tasks(lm, [TaskRequests("arc_easy", arc_fixture, 3)])["arc_easy"]
    assert r["n"] == 3 and r["available"] == 3 and r["shots"] == 0
    assert r["acc"] == pytest.approx(1 / 3) and r["acc_norm"] == pytest.approx(1 / 3)
    # lm-eval's standard error: sample standard deviation / sqrt(n)
    assert r["acc_stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    lm.table["dddddddd"] = -3.0  # now q2 per character: -0.5 vs -0.375 -> "dddddddd" (right)
    r = run_tasks(lm, [TaskRequests("arc_easy", arc_fixture, 3)])["arc_easy"]
    assert r["acc"] == pytest.approx(1 / 3) and r["acc_norm"] == pytest.approx(2 / 3)


def test_sample_docs_is_a_deterministic_subset():
    pool = list(range(3, 100))
    a = sample_docs(pool, 10)
    assert a == sample_docs(pool, 10) and len(set(a)) == 10 and set(a) <= set(pool)
    assert a == sorted(a) and a != sample_docs(pool, 10, seed=1)
    assert sample_docs(pool, 500) == pool
    with pytest.raises(ValueError, match="limit must be >= 1"):
        sample_docs(pool, 0)


def test_unknown_tasks_and_missing_eval_sets_say_what_to_do(tmp_path):
    from flextron_fx.data.evalsets import EvalSetNotFetchedError, eval_set_files

    with pytest.raises(ValueError, match="valid: arc_easy, lambada, piqa, winogrande, mmlu, "
                                         "hellaswag"):
        resolve_tasks("arc_easy,boolq")
    assert resolve_tasks("all")[0] == "arc_easy" and resolve_tasks("none") == []
    with pytest.raises(EvalSetNotFetchedError, match="flextron data fetch"):
        eval_set_files("piqa", tmp_path)


# ---- loss per domain -----------------------------------------------------------------------
class CharTokenizer:
    eos_token_id = 0
    vocab_size = VOCAB

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % (VOCAB - 1) + 1 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join("ab" if i == 1 else "c" for i in ids if i or not skip_special_tokens)


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch):
    def extract(root):
        return [(f"d{i}", "the quick brown fox " * (i + 3)) for i in range(30)], [
            {"kind": "local", "package": "fixture", "version": "0", "licence": "CC0",
             "where": "test"}]

    table = {"tiny": Domain("tiny", "english", extract)}
    monkeypatch.setattr(domains, "DOMAINS", table)
    monkeypatch.setattr(corpus, "DOMAINS", table)
    corpus.fetch("all", cache_dir=tmp_path, echo=lambda s: None)
    return tmp_path


def test_domain_loss_equals_cross_entropy_on_the_same_tokens(tiny_corpus):
    from flextron_fx.eval.loss import domain_tokens

    _, fn = bigram()
    tok = CharTokenizer()
    blocks = domain_tokens(tok, "tiny", seq_len=16, max_tokens=160, cache_dir=tiny_corpus)
    assert blocks.shape == (10, 16)
    docs = corpus.load_split("tiny", "test", tiny_corpus)
    flat = []
    for i, (_, text) in enumerate(docs):
        flat += ([0] if i else []) + tok.encode(text)
    assert blocks.flatten().tolist() == flat[:160]

    r = domain_loss(fn, tok, "tiny", seq_len=16, max_tokens=160, batch_size=3,
                    cache_dir=tiny_corpus)
    logits = fn(blocks)
    ce = torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, VOCAB), blocks[:, 1:].reshape(-1))
    assert r["tokens"] == 10 * 15
    assert math.isclose(r["loss"], ce.item(), rel_tol=1e-6)
    assert math.isclose(r["ppl"], math.exp(ce.item()), rel_tol=1e-6)
    n_bytes = sum(len(tok.decode(row[1:].tolist())) for row in blocks)
    assert r["bytes"] == n_bytes
    assert math.isclose(r["bpb"], ce.item() * 150 / math.log(2) / n_bytes, rel_tol=1e-6)


# ---- the harness: budgets, Markdown, plots -------------------------------------------------
def test_eval_over_budgets_writes_rows_markdown_and_labelled_plots(tiny_corpus, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    import flextron_fx
    from flextron_fx.eval.harness import evaluate, write_outputs

    em = flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"),
                                 torch.randint(0, 128, (4, 8)), progress=False)
    tok = CharTokenizer()
    seen = []
    before = {name: op.candidates[1] for name, op in em.ops.items()}
    em.set_widths(before)
    result = evaluate(em, tok, elastic=True, budgets=[1.0, 0.5], domains=["tiny"], tasks=[],
                      max_tokens=64, seq_len=16, latency_reps=1, cache_dir=tiny_corpus,
                      echo=lambda s: None, on_progress=lambda r: seen.append(
                          [list(row["domains"]) for row in r["settings"]]))
    assert seen == [[["tiny"]], [["tiny"], ["tiny"]]], "partial results after every domain"
    result["model"] = "tiny llama"
    rows = result["settings"]
    assert [r["budget"] for r in rows] == [1.0, 0.5]
    assert rows[0]["params"] == em.num_params(1.0) and rows[1]["params"] == em.num_params(0.5)
    assert rows[1]["params_non_embedding"] < rows[0]["params_non_embedding"]
    assert rows[1]["mlp_kept"] <= 0.75 and rows[0]["mlp_kept"] == 1.0
    assert em.widths == before, "evaluate gives back the widths the model had"
    em.set_widths(0.5)
    direct = domain_loss(em, tok, "tiny", seq_len=16, max_tokens=64, cache_dir=tiny_corpus)
    assert math.isclose(rows[1]["domains"]["tiny"]["loss"], direct["loss"], rel_tol=1e-6)
    dense = domain_loss(em.materialize(), tok, "tiny", seq_len=16, max_tokens=64,
                        cache_dir=tiny_corpus)  # any ids -> logits callable works
    assert math.isclose(dense["loss"], direct["loss"], rel_tol=1e-5)
    paths = write_outputs(result, tmp_path / "out" / "r.json")
    md = (tmp_path / "out" / "r.md").read_text()
    assert "| 0.5 |" in md and "tiny" in md
    from flextron_fx.eval.harness import markdown

    partial = {**result, "settings": [*result["settings"][:1],
                                      {**result["settings"][1], "domains": {}}]}
    assert "(not run)" in markdown(partial)
    saved = json.loads((tmp_path / "out" / "r.json").read_text())
    assert len(saved["settings"]) == 2 and len(saved["plots"]) == 3
    for png in paths[2:]:
        img = matplotlib.image.imread(png)
        assert img.shape[0] > 200 and img.shape[1] > 300


def test_budgets_need_an_elastic_model():
    from flextron_fx.eval.harness import evaluate

    with pytest.raises(ValueError, match="need an elastic model"):
        evaluate(ZOO["llama"](), CharTokenizer(), elastic=False, budgets=[1.0, 0.5])


def test_cli_rejects_unknown_names_with_the_valid_ones(capsys, tmp_path):
    from flextron_fx import cli

    assert cli.main(["eval", "--tasks", "boolq", "--json", str(tmp_path / "x.json")]) == 2
    assert "valid: arc_easy, lambada" in capsys.readouterr().err
    assert cli.main(["eval", "--domains", "klingon", "--json", str(tmp_path / "x.json")]) == 2
    assert "valid: wikipedia, arxiv, books, german, korean, html, java, python" in \
        capsys.readouterr().err
    assert cli.main(["data", "fetch", "--domains", "klingon"]) == 2
    assert "unknown domain" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
