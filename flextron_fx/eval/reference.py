"""Cross-check: our task pipeline against lm-eval's own Hugging Face model adapter.

Both run the same lm-eval task (``fx_<task>``, local files) on the same documents; the
only difference is the compute: lm-eval's ``HFLM`` (its tokenization, batching and
scoring) against :class:`flextron_fx.eval.tasks.lm_adapter` over
:func:`flextron_fx.eval.scoring.score`. Used by ``benchmarks/lm_eval_compare.py`` and
the slow test ``tests/test_lm_eval_reference.py``.
"""

from __future__ import annotations

import time


def compare_with_hflm(model_name: str = "smollm2-135m", task: str = "arc_easy",
                      limit: int | None = 500, batch_size: int = 16, cache_dir=None) -> dict:
    """Accuracies and per-request log-likelihoods from both pipelines, and their gaps."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from flextron_fx.data._fetch import cache_root
    from flextron_fx.eval.tasks import (
        build_requests,
        lm_adapter,
        run_tasks,
        write_task_configs,
    )
    from flextron_fx.models import load

    model, tok = load(model_name, cache_dir=cache_dir)
    folder = cache_root(cache_dir) / "models" / model_name  # the saved HF copy load() made

    t0 = time.perf_counter()
    built = build_requests([task], limit, cache_dir)
    ours = run_tasks(lm_adapter(model, tok, progress=False), built)[task]
    ours_s = time.perf_counter() - t0
    ((fx_name, fx_task),) = built[0].tasks.items()
    samples = built[0].chosen[fx_name]
    # requests number the chosen documents 0, 1, ...; lm-eval's logged samples by index
    ours_ll = {(samples[i.doc_id], i.idx): i.resps[0][0] for i in fx_task.instances}

    t0 = time.perf_counter()
    manager = TaskManager(include_path=str(write_task_configs(cache_dir)),
                          include_defaults=False)
    hflm = HFLM(pretrained=str(folder), dtype="float32", batch_size=batch_size,
                device="cpu")
    out = lm_eval.simple_evaluate(model=hflm, tasks=[fx_name], task_manager=manager,
                                  samples={fx_name: samples}, log_samples=True,
                                  bootstrap_iters=0)
    ref_s = time.perf_counter() - t0
    ref = out["results"][fx_name]
    ref_ll = {}
    for s in out["samples"][fx_name]:
        for idx, resp in enumerate(s["resps"]):
            ref_ll[(s["doc_id"], idx)] = float(resp[0][0])
    if set(ref_ll) != set(ours_ll):
        raise RuntimeError("the two pipelines scored different requests")
    gaps = [abs(ours_ll[k] - ref_ll[k]) for k in ours_ll]
    row = {"task": task, "model": model_name, "documents": ours["n"],
           "requests": len(ours_ll), "max_abs_loglik_gap": max(gaps),
           "mean_abs_loglik_gap": sum(gaps) / len(gaps), "seconds_ours": ours_s,
           "seconds_lm_eval": ref_s}
    for m in ("acc", "acc_norm"):
        if m in ours:
            row[f"{m}_ours"] = ours[m]
            row[f"{m}_lm_eval"] = ref[f"{m},none"]
            row[f"{m}_gap_points"] = 100 * abs(ours[m] - ref[f"{m},none"])
    return row

