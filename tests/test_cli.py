"""The `flextron` command line on the real SmolLM2, with small data so it runs in seconds."""

from __future__ import annotations

import json

import pytest

from flextron_fx import cli

SMALL = ["--calib-samples", "8", "--seq-len", "64", "--heldout-tokens", "1024",
         "--batch-size", "4"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "smol"
    assert cli.main(["convert", "--out", str(out), *SMALL]) == 0
    return out


def test_convert_then_train_from_the_saved_model(converted, tmp_path):
    out = converted
    assert (out / "model.safetensors").is_file() and (out / "flextron.json").is_file()
    assert not out.with_name("smol.partial").exists(), "calibration progress is cleaned up"
    meta = json.loads((out / "flextron.json").read_text())
    assert len(meta["ops"]) == 60 and meta["skipped"] == []
    assert meta["domains_seen"] == {"calibration": ["wikipedia"]}

    run = tmp_path / "train"
    assert cli.main(["train-elastic", str(run), "--elastic", str(out), "--steps", "2",
                     "--batch", "2", "--seq", "32", "--samples", "1", "--eval-every", "1",
                     "--eval-tokens", "64", "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 2
    assert set(summary["val"]) == {"full", "mlp50", "params50", "params65", "params80"}
    assert (run / "final" / "model.safetensors").is_file() and (run / "curves.png").is_file()
    final = json.loads((run / "final" / "flextron.json").read_text())
    assert final["domains_seen"] == {"calibration": ["wikipedia"], "train-elastic": ["wikipedia"]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all("val" in r for r in rows)


@pytest.mark.slow  # about a minute: a second conversion (unsorted) and four evaluations
def test_ablate_from_the_saved_model(converted, tmp_path, capsys):
    report = tmp_path / "ablate.json"
    assert cli.main(["ablate-sorting", "--elastic", str(converted), "--json", str(report),
                     *SMALL]) == 0
    r = json.loads(report.read_text())
    for key in ("full_ppl", "mlp50_unsorted_ppl", "mlp50_sorted_ppl", "heads50_unsorted_ppl",
                "heads50_sorted_ppl", "eval_tokens", "eval_source"):
        assert key in r, key
    assert r["eval_tokens"] == 16 * 63
    assert r["mlp_fraction_kept"] == 0.5 and r["heads_fraction_kept"] == pytest.approx(2 / 3)
    # even with 8 calibration sequences, sorting beats the stored order by far
    assert r["mlp50_sorted_ppl"] < r["mlp50_unsorted_ppl"] / 10
    assert r["full_ppl"] < r["mlp50_sorted_ppl"]
    assert (r["compensate"], r["compensation_rank"]) == ("all", 128)  # the defaults
    assert "with sorting + LS comp." in capsys.readouterr().out


def test_train_elastic_needs_a_model(tmp_path, capsys):
    assert cli.main(["train-elastic", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "--elastic DIR" in capsys.readouterr().err


def test_train_elastic_never_trains_on_evaluation_text():
    from flextron_fx.data.corpus import load_split
    from flextron_fx.data.domains import DOMAINS
    from flextron_fx.train.command import _split

    train = _split("wikipedia", "train") + _split("wikipedia", "calibration")  # the default
    val = _split("wikipedia", "validation")
    assert train and val
    ids = {d for d, _ in train}
    assert not ids & {d for d, _ in val}
    try:
        test = load_split("wikipedia", "test")  # what `flextron eval` reports
    except FileNotFoundError:  # not fetched: the split train-elastic computes itself
        from flextron_fx.data import split_corpus, wikipedia_articles

        wiki = DOMAINS["wikipedia"]
        test = split_corpus(wikipedia_articles(), wiki.splits, seed=0,
                            max_chars=wiki.max_chars)["test"]
    assert not ids & {d for d, _ in test}
    assert {d for d, _ in test} and not {d for d, _ in val} & {d for d, _ in test}


def test_train_elastic_refuses_held_out_splits(tmp_path, capsys):
    code = cli.main(["train-elastic", str(tmp_path / "run"), "--elastic", str(tmp_path),
                     "--steps", "1", "--train-splits", "train,validation"])
    assert code == 2
    assert "validation and test text stay held out" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["shrink"])
    assert e.value.code == 2


def test_outputs_never_replace_a_foreign_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert cli.main(["convert", "--out", str(mine), *SMALL]) == 2  # refused before loading
    err = capsys.readouterr().err
    assert f"{mine} is a folder holding notes.txt, not a flextron checkpoint" in err
    assert "--overwrite" in err
    assert cli.main(["train-elastic", str(mine), "--elastic", str(tmp_path / "x"),
                     "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt, not a training run" in err and "--overwrite" in err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # a run, but its final/ is not
    (tmp_path / "run" / "final").mkdir()
    (tmp_path / "run" / "final" / "mine.txt").write_text("keep")
    assert cli.main(["train-elastic", str(tmp_path / "run"), "--elastic", str(tmp_path / "x"),
                     "--steps", "1"]) == 2
    assert "final is a folder holding mine.txt" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.slow  # the whole demo at small sizes, with --onnx: about 5 minutes
def test_demo_ends_with_budgets_onnx_and_generation(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--json", str(tmp_path / "ablate.json"),
                     "--onnx", *SMALL]) == 0
    said = capsys.readouterr().out
    assert (tmp_path / "demo-train" / "final" / "model.safetensors").is_file()
    assert "Budgets of" in said and said.count("$ flextron generate") == 2
    assert said.count("tokens/s, torch") == 2
    diff = float(said.split("largest logit difference from PyTorch ")[1].split()[0])
    assert diff < 1e-2  # logits of magnitude ~20 in fp32
    assert (tmp_path / "demo-half.onnx").is_file()
