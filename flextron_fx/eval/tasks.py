"""The paper's downstream tasks through lm-evaluation-harness, reading local files only.

Prompts and metrics are lm-eval's own: each task here is one of lm-eval's YAML task
definitions (``include:``) with only the data location changed to the files that
``flextron data fetch`` put in the cache (Arrow files or JSON lines; no hub access), and
its ``process_results`` computes ``acc`` / ``acc_norm`` per document. The compute goes
through :class:`FlextronLM`, an lm-eval ``TemplateLM`` (so context/continuation encoding
is lm-eval's) whose scoring is :func:`flextron_fx.eval.scoring.score`.

| task | lm-eval definition | data (split) | shots | metrics |
|---|---|---|---:|---|
| arc_easy | arc/arc_easy.yaml | ARC-Easy test | 0 | acc, acc_norm |
| lambada | lambada/lambada_openai.yaml | LAMBADA (OpenAI) test | 0 | acc |
| piqa | piqa/piqa.yaml | validation | 0 | acc, acc_norm |
| winogrande | winogrande/default.yaml | winogrande_xl validation | 0 | acc |
| mmlu | mmlu/default/mmlu_<subject>.yaml, 57 | test (shots: dev, first 5) | 5 | acc |
| hellaswag | hellaswag/hellaswag.yaml | validation | 10 | acc, acc_norm |

HellaSwag's training split is not in the package: its 10 shots are the first 10
validation documents (lm-eval's ``first_n`` sampler), which are then never evaluated.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from flextron_fx._atomic import write_atomic
from flextron_fx.data.evalsets import eval_dir, eval_set_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task: which lm-eval definition, which local split, how many shots."""

    name: str
    lm_eval_yaml: str          # under lm_eval/tasks/
    split: str                 # the split of the local files that is evaluated
    num_fewshot: int
    metrics: tuple[str, ...]
    fewshot_pool: int = 0      # leading docs of the split used as shots, never evaluated


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("arc_easy", "arc/arc_easy.yaml", "test", 0, ("acc", "acc_norm")),
    TaskSpec("lambada", "lambada/lambada_openai.yaml", "test", 0, ("acc",)),
    TaskSpec("piqa", "piqa/piqa.yaml", "validation", 0, ("acc", "acc_norm")),
    TaskSpec("winogrande", "winogrande/default.yaml", "validation", 0, ("acc",)),
    TaskSpec("mmlu", "mmlu/default/mmlu_{subject}.yaml", "test", 5, ("acc",)),
    TaskSpec("hellaswag", "hellaswag/hellaswag.yaml", "validation", 10,
             ("acc", "acc_norm"), fewshot_pool=11),
)}
# Chance accuracy, for reading results (MMLU, ARC-Easy: 4 choices; some ARC items have 3 or 5).
CHANCE = {"arc_easy": 0.25, "lambada": 0.0, "piqa": 0.5, "winogrande": 0.5, "mmlu": 0.25,
          "hellaswag": 0.25}


def resolve_tasks(spec: str | list[str] | None) -> list[str]:
    """Task names from ``"all"``, ``"none"`` or a comma list; unknown names are an error.

    Example:
        >>> resolve_tasks("piqa,arc_easy")
        ['piqa', 'arc_easy']
    """
    if spec is None or spec == "none" or spec == "":
        return []
    if spec == "all":
        return list(TASKS)
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    bad = [n for n in names if n not in TASKS]
    if bad or not names:
        raise ValueError(f"unknown task(s) {bad or names}; valid: {', '.join(TASKS)}, "
                         "or 'all' / 'none'")
    return names


def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError("downstream tasks need lm-eval: pip install 'flextron_fx[eval]'") from e
    return Path(lm_eval.__file__).parent / "tasks"


def write_task_configs(cache_dir=None) -> Path:
    """Write lm-eval task YAMLs that point at the fetched files; return their folder.

    Each is ``include:`` of lm-eval's own definition plus a new data location, so prompts,
    choices and metrics stay lm-eval's. Task names get an ``fx_`` prefix.
    """
    lm_tasks = _lm_eval_tasks_dir()
    out = eval_dir(cache_dir) / "lm_eval_tasks"
    out.mkdir(parents=True, exist_ok=True)
    for spec in TASKS.values():
        files = eval_set_files(spec.name, cache_dir)
        if spec.name == "mmlu":
            for subject, paths in files.items():
                _write_yaml(out / f"fx_mmlu_{subject}.yaml", {
                    "include": str(lm_tasks / spec.lm_eval_yaml.format(subject=subject)),
                    "task": f"fx_mmlu_{subject}", "tag": [], "dataset_path": "arrow",
                    "dataset_name": None, "dataset_kwargs": {"data_files": paths},
                    "test_split": "test", "fewshot_split": "dev", "num_fewshot": 5})
            continue
        path = files[spec.split]
        cfg = {"include": str(lm_tasks / spec.lm_eval_yaml), "task": f"fx_{spec.name}",
               "tag": [], "dataset_path": "json" if path.endswith(".jsonl") else "arrow",
               "dataset_name": None, "dataset_kwargs": {"data_files": {spec.split: path}},
               "training_split": None, "validation_split": None, "test_split": None,
               "num_fewshot": spec.num_fewshot}
        cfg[f"{spec.split}_split"] = spec.split
        if spec.num_fewshot:
            cfg["fewshot_split"] = spec.split
            cfg["fewshot_config"] = {"sampler": "first_n"}
        _write_yaml(out / f"fx_{spec.name}.yaml", cfg)
    return out


def _write_yaml(path: Path, cfg: dict) -> None:
    # JSON is valid YAML; lm-eval's loader reads it (and resolves `include` as a path).
    text = json.dumps(cfg, indent=1)
    if not path.is_file() or path.read_text() != text:
        write_atomic(path, text)


def sample_docs(pool: list, limit: int | None, seed: int = 1234) -> list:
    """A deterministic subsample of ``limit`` items of ``pool`` (all of it without a limit).

    Example:
        >>> sample_docs(list(range(10)), 3) == sample_docs(list(range(10)), 3)
        True
    """
    if limit is None or limit >= len(pool):
        return list(pool)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return sorted(random.Random(seed).sample(pool, limit))


@dataclass
class TaskRequests:
    """The lm-eval task objects of one of our tasks and the documents chosen for it."""

    name: str
    tasks: dict            # lm-eval task name -> task object (built requests inside)
    available: int         # documents the split offers for evaluation
    chosen: dict | None = None  # lm-eval task name -> indices of the evaluated documents


def build_requests(names: list[str], limit: int | None, cache_dir=None,
                   seed: int = 1234) -> list[TaskRequests]:
    """lm-eval tasks for ``names`` with their requests built on a deterministic subsample."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    folder = write_task_configs(cache_dir)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    built = []
    for name in names:
        spec = TASKS[name]
        if name == "mmlu":
            subjects = sorted(eval_set_files("mmlu", cache_dir))
            objs = manager.load([f"fx_mmlu_{s}" for s in subjects])["tasks"]
            pool = [(s, i) for s in subjects
                    for i in range(len(objs[f"fx_mmlu_{s}"].eval_docs))]
            chosen: dict[str, list[int]] = defaultdict(list)
            for s, i in sample_docs(pool, limit, seed):
                chosen[f"fx_mmlu_{s}"].append(i)
            objs = {k: v for k, v in objs.items() if k in chosen}
        else:
            objs = manager.load([f"fx_{name}"])["tasks"]
            n = len(objs[f"fx_{name}"].eval_docs)
            pool = list(range(spec.fewshot_pool, n))
            chosen = {f"fx_{name}": sample_docs(pool, limit, seed)}
        for key, task in objs.items():
            task.build_all_requests(samples=chosen[key], rank=0, world_size=1)
        built.append(TaskRequests(name, objs, len(pool), dict(chosen)))
    return built


def run_tasks(lm, built: list[TaskRequests]) -> dict:
    """Score every request with ``lm`` (one pass over all tasks), then lm-eval's metrics.

    Returns ``{task: {"acc": .., "acc_stderr": .., "acc_norm": .., "n": .., ...}}``, the
    standard error being lm-eval's (sample standard deviation / sqrt(n)).
    """
    from lm_eval.api.metrics import mean_stderr

    instances = [inst for b in built for t in b.tasks.values() for inst in t.instances]
    for inst in instances:
        if inst.request_type != "loglikelihood":
            raise ValueError(f"{inst.task_name}: request type {inst.request_type} is not "
                             "supported (only loglikelihood)")
    for inst, resp in zip(instances, lm.loglikelihood(instances), strict=True):
        inst.resps[:] = [resp]  # a task list is scored once per budget
    out = {}
    for b in built:
        per_metric: dict[str, list[float]] = defaultdict(list)
        for task in b.tasks.values():
            by_doc = defaultdict(list)
            for inst in task.instances:
                by_doc[inst.doc_id].append(inst)
            for insts in by_doc.values():
                insts.sort(key=lambda x: x.idx)
                metrics = task.process_results(insts[0].doc, [x.resps[0] for x in insts])
                for k in TASKS[b.name].metrics:
                    per_metric[k].append(float(metrics[k]))
        row: dict = {"n": len(next(iter(per_metric.values()))), "available": b.available,
                     "shots": TASKS[b.name].num_fewshot}
        for k, values in per_metric.items():
            row[k] = sum(values) / len(values)
            row[f"{k}_stderr"] = mean_stderr(values) if len(values) > 1 else float("nan")
        out[b.name] = row
    return out


def lm_adapter(model, tokenizer, *, max_length: int = 2048, batch_tokens: int = 4096,
               progress: bool = True):
    """An lm-eval ``TemplateLM`` over any ids -> logits model (see :class:`FlextronLM`)."""
    from lm_eval.api.model import TemplateLM

    from flextron_fx.eval.scoring import score

    class FlextronLM(TemplateLM):
        """lm-eval's encoding of (context, continuation), our batched scoring."""

        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer

        @property
        def eot_token_id(self):
            return tokenizer.eos_token_id

        def tok_encode(self, string, add_special_tokens=False, **kwargs):
            return tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            pairs = [(ctx, cont) for _, ctx, cont in requests]
            return score(model, pairs, max_length=max_length, batch_tokens=batch_tokens,
                         progress=progress and not disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError("rolling log-likelihood: use flextron_fx.eval.domain_loss")

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError("generation tasks are not supported")

    return FlextronLM()
