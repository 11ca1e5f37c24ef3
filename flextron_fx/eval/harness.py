"""`flextron eval`: one model, several budgets, every domain and task; JSON, Markdown, PNG.

A *budget* ``f`` is, for now, the uniform width fraction ``f`` of every elastic op
(``ElasticModel.set_widths(f)``: each MLP keeps the smallest candidate width >= f of its
neurons, each attention block the smallest head count >= f of its heads). Once routers
and a latency profiler exist, a budget will mean what the router picks for it; the
reported parameter counts (``num_params``) and latencies are those of the widths used.
The tasks of an elastic model from a Hugging Face class run on the same sub-network
rebuilt in that class (``export.hf.to_hf``, checked to give the same logits), so few-shot
prompts reuse the key/value cache of their shared examples.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from flextron_fx._atomic import savefig_atomic, write_atomic

log = logging.getLogger(__name__)


def load_model(spec: str):
    """``(model, is_elastic)`` for a bundled model name or a folder saved by ``convert``."""
    path = Path(spec)
    if (path / "flextron.json").is_file():
        import flextron_fx

        return flextron_fx.load(path), True
    if path.exists():
        raise ValueError(f"{spec} is a path but holds no flextron.json; pass a folder saved by "
                         "`flextron convert` or a bundled model name")
    from flextron_fx.models import available, load

    if spec not in available():
        raise ValueError(f"unknown model {spec!r}; pass a bundled model "
                         f"({', '.join(available())}) or a folder saved by `flextron convert`")
    model, _ = load(spec)
    return model, False


def param_counts(model, elastic: bool) -> tuple[int, int]:
    """(all parameters, non-embedding parameters) of the current sub-network."""
    if elastic:
        return model.num_params(), model.num_params(non_embedding=True)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    emb = model.get_input_embeddings().weight.numel()
    return total, total - emb


def latencies_ms(model, budgets, *, elastic: bool, reps: int = 5, seq_len: int = 256,
                 vocab: int = 100) -> dict[float, float]:
    """Median forward time of one ``[1, seq_len]`` input at each budget, in ms.

    Budgets are timed in interleaved rounds (each round visits every budget: set the
    widths, one untimed call that pays the one-time weight slicing, one timed call), so a
    change in machine load spreads over all budgets instead of biasing one.
    """
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    times: dict[float, list[float]] = {b: [] for b in budgets}
    with torch.inference_mode():
        for _ in range(max(reps, 1)):
            for b in budgets:
                with _at(model, b, elastic):
                    model(ids)
                    t0 = time.perf_counter()
                    model(ids)
                    times[b].append((time.perf_counter() - t0) * 1e3)
    return {b: statistics.median(t) for b, t in times.items()}


def _at(model, budget: float, elastic: bool):
    """The elastic model at `budget` for a `with` block; nothing to change for a plain one."""
    return model.at(budget) if elastic else contextlib.nullcontext()


def _kept(model, kind: str) -> float:
    ops = [o for o in model.ops.values() if o.kind == kind]
    return sum(model.widths[o.name] for o in ops) / sum(o.full for o in ops) if ops else 1.0


def _task_model(model, elastic: bool, echo):
    """What scores the tasks: for an elastic model from a Hugging Face class, the same
    sub-network rebuilt in that class (`to_hf`, checked to give the same logits), whose
    key/value cache lets few-shot prompts share one pass over their common examples;
    otherwise the model itself (every sequence run in full)."""
    if not elastic:
        return model
    from flextron_fx.errors import UnsupportedModelError, WidthError
    from flextron_fx.export.hf import to_hf

    try:
        return to_hf(model)
    except (UnsupportedModelError, WidthError) as exc:
        echo(f"  tasks run on the elastic graph without a key/value cache ({exc})")
        return model


def evaluate(model, tokenizer, *, elastic: bool, budgets=(1.0,), domains=(), tasks=(),
             limit: int | None = None, max_tokens: int | None = 32768, seq_len: int = 512,
             batch_size: int = 4, split: str = "test", latency_reps: int = 5,
             max_length: int = 2048, cache_dir=None, echo=print, on_progress=None) -> dict:
    """Evaluate ``model`` at each budget on ``domains`` (loss) and ``tasks`` (accuracy).

    ``on_progress(result)``, if given, is called with the partial result after every
    domain and every task, so a long run that is stopped keeps what it finished.
    """
    from flextron_fx.eval.loss import domain_loss, domain_tokens
    from flextron_fx.eval.tasks import build_requests, lm_adapter, run_tasks

    budgets = [float(b) for b in budgets]
    if not elastic and budgets != [1.0]:
        raise ValueError("budgets below 1.0 need an elastic model: pass a folder saved by "
                         "`flextron convert` as --model")
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"a budget is a fraction in (0, 1], got {b}")
    blocks = {d: domain_tokens(tokenizer, d, split, seq_len, max_tokens, cache_dir)
              for d in domains}
    built = build_requests(list(tasks), limit, cache_dir) if tasks else []
    vocab = int(getattr(tokenizer, "vocab_size", None) or 100)
    latency = latencies_ms(model, budgets, elastic=elastic, reps=latency_reps, vocab=vocab)
    rows: list[dict] = []
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "split": split,
              "seq_len": seq_len, "max_tokens_per_domain": max_tokens, "limit": limit,
              "budget_meaning": "uniform width fraction of every elastic op (set_widths)",
              "latency": f"median of {latency_reps} interleaved [1, 256] forwards per "
                         f"budget, {torch.get_num_threads()} threads, on this machine as loaded",
              "settings": rows}
    progress = on_progress or (lambda r: None)
    for b in budgets:
        with _at(model, b, elastic):  # the previous widths come back after
            t0 = time.perf_counter()
            row: dict = {"budget": b}
            if elastic:
                row["mlp_kept"] = _kept(model, "mlp")
                row["heads_kept"] = _kept(model, "attention")
            row["params"], row["params_non_embedding"] = param_counts(model, elastic)
            row["latency_ms"] = latency[b]
            echo(f"budget {b}: {row['params_non_embedding'] / 1e6:.1f} M non-embedding "
                 f"params, {row['latency_ms']:.0f} ms per 1x256 forward (median of "
                 f"{latency_reps})")
            row["domains"], row["tasks"] = {}, {}
            rows.append(row)
            for d, toks in blocks.items():
                r = domain_loss(model, tokenizer, d, split=split, batch_size=batch_size,
                                blocks=toks)
                row["domains"][d] = r
                echo(f"  {d:<10} loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  "
                     f"bpb {r['bpb']:.4f}  ({r['tokens']:,} tokens)")
                progress(result)
            if built:
                scorer = _task_model(model, elastic, echo)
                row["task_model"] = type(scorer).__name__
                lm = lm_adapter(scorer, tokenizer, max_length=max_length,
                                batch_tokens=max(batch_size * seq_len, 2048))
            for task in built:  # one pass per task, so each is kept as soon as it is done
                r = row["tasks"][task.name] = run_tasks(lm, [task])[task.name]
                norm = f"  acc_norm {r['acc_norm']:.4f}" if "acc_norm" in r else ""
                echo(f"  {task.name:<10} acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}{norm}  "
                     f"(n={r['n']}, {r['shots']}-shot)")
                progress(result)
            row["seconds"] = time.perf_counter() - t0
    return result


def markdown(result: dict) -> str:
    """The result as Markdown tables: loss (perplexity) and bits per byte per domain, and
    accuracy ± standard error per task, one row per budget."""
    rows = result["settings"]
    domains = list(dict.fromkeys(d for r in rows for d in r.get("domains", {})))
    tasks = list(dict.fromkeys(t for r in rows for t in r.get("tasks", {})))
    head = "| budget | params (non-emb.) | latency ms |"
    lines = [(f"Model: `{result.get('model', '?')}`; split `{result['split']}`; "
              f"{result['seq_len']}-token blocks, at most {result['max_tokens_per_domain']} "
              f"tokens per domain; task limit {result['limit']}."), ""]

    def lead(r):
        return (f"| {r['budget']:g} | {r['params'] / 1e6:.1f} M ({r['params_non_embedding'] / 1e6:.1f} M) | "
                f"{r['latency_ms']:.0f} |")

    if domains:
        lines += ["Loss in nats per token (perplexity):", "",
                  head + "".join(f" {d} |" for d in domains),
                  "|---:|---:|---:|" + "---:|" * len(domains)]
        lines += [lead(r) + "".join(_cell(r["domains"], d, lambda x: f"{x['loss']:.3f} "
                                          f"({x['ppl']:.1f})") for d in domains) for r in rows]
        lines += ["", "Bits per byte:", "", head + "".join(f" {d} |" for d in domains),
                  "|---:|---:|---:|" + "---:|" * len(domains)]
        lines += [lead(r) + "".join(_cell(r["domains"], d, lambda x: f"{x['bpb']:.3f}")
                                    for d in domains) for r in rows]
    if tasks:
        first = {t: next(r["tasks"][t] for r in rows if t in r["tasks"]) for t in tasks}
        cols = [(t, m) for t in tasks for m in ("acc", "acc_norm") if m in first[t]]
        lines += ["", "Accuracy ± standard error (n documents, shots):", "",
                  head + "".join(f" {t} {m} ({first[t]['n']}, {first[t]['shots']}) |"
                                 for t, m in cols),
                  "|---:|---:|---:|" + "---:|" * len(cols)]
        lines += [lead(r) + "".join(_cell(r["tasks"], t, lambda x, m=m: f"{100 * x[m]:.1f} ± "
                                          f"{100 * x[m + '_stderr']:.1f}") for t, m in cols)
                  for r in rows]
    return "\n".join(lines) + "\n"


def _cell(results: dict, key: str, fmt) -> str:
    return f" {fmt(results[key])} |" if key in results else " (not run) |"


def plot(result: dict, prefix: str | Path) -> list[Path]:
    """The paper's Figure 5 (loss against parameters, against latency) and Figure 8
    (per-domain PPL_sub / PPL_full against budget), one curve per domain, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["settings"], key=lambda r: r["budget"])
    domains = list(dict.fromkeys(d for r in rows for d in r.get("domains", {})))
    if not domains:
        return []
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    full = max(rows, key=lambda r: r["budget"])
    out = []
    figures = [
        ("loss-vs-params", "non-embedding parameters (millions)",
         lambda r: r["params_non_embedding"] / 1e6, lambda r, d: r["domains"][d]["loss"],
         "loss (nats per token)"),
        ("loss-vs-latency", "latency of a 1x256 forward (ms, median)",
         lambda r: r["latency_ms"], lambda r, d: r["domains"][d]["loss"],
         "loss (nats per token)"),
        ("degradation", "budget (width fraction)", lambda r: r["budget"],
         lambda r, d: r["domains"][d]["ppl"] / full["domains"][d]["ppl"],
         "PPL_sub / PPL_full"),
    ]
    for name, xlabel, x, y, ylabel in figures:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for d in domains:
            have = [r for r in rows if d in r["domains"]]
            if name == "degradation" and d not in full["domains"]:
                continue
            ax.plot([x(r) for r in have], [y(r, d) for r in have], marker="o", label=d)
        if name == "degradation":
            ax.set_yscale("log")  # ratios run from 1 to thousands across domains
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{result.get('model', '')}: {ylabel} per domain", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = savefig_atomic(fig, prefix.with_name(f"{prefix.name}-{name}.png"), dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def write_outputs(result: dict, json_path: str | Path, md_path: str | Path | None = None,
                  plot_prefix: str | Path | None = None) -> list[Path]:
    """Write the JSON, the Markdown tables and the plots; return the paths written."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path = Path(md_path) if md_path else json_path.with_suffix(".md")
    prefix = Path(plot_prefix) if plot_prefix else json_path.with_suffix("")
    pngs = plot(result, prefix)
    result["plots"] = [str(p) for p in pngs]
    write_atomic(json_path, json.dumps(result, indent=1))
    write_atomic(md_path, markdown(result))
    return [json_path, md_path, *pngs]
