"""Measure a latency table: every elastic op at every candidate width, in context.

What runs. Prefill on torch-cpu at the model's own dtype measures the elastic graph itself
(`graphrun.GraphModel`): the graph split into one partition per elastic block (an MLP's
`flextron_mlp_i` region; an attention block from its q/k/v projections to its
`flextron_out_i` region) and glue partitions between them. This works for every model
`flextronize` converts. Decode (it needs a key/value cache, which the traced graph does
not have), other dtypes, CUDA and onnxruntime run the source Hugging Face class rebuilt
with per-op dense variants (`runtime.LayerwiseModel`: the Llama family, GPT-2, GPT-NeoX,
OPT); for other models they are refused with a message saying so, and a prefill table records
whether decode is available (`settings["decode"]`, printed by `flextron profile`).

Method. For each shape, a grid of uniform-width sub-networks (every MLP candidate x every
attention candidate) runs in interleaved rounds: per round and sub-network one warm-up
forward after the switch, one forward with hooks that time every block (and, on the
Hugging Face runtime, every fixed module: embedding, norms, output head), and one
forward of the whole model without hooks for the end-to-end time. Op timings pool over
the layers sharing a row and over rounds; the median and quartiles go into the table.
"other" is what end-to-end time leaves over after the timed parts (graph: everything
outside the blocks: embedding, norms, head, rotary tables, mask building, residual adds;
Hugging Face runtime: the glue between modules). It is fitted over the grid together with
one scale of all block entries (`fit_whole`; the table's `block_scale`), so that the sum
predicts the grid's end-to-end medians; the entries in the table are scaled.
Timing blocks inside the running model, rather than each block alone, keeps what the sum
predicts close to what the whole network does (caches hold what a real forward leaves
there; no per-call timer overhead is counted).

Decode: each sub-network first fills a KV cache of the shape's length with one prefill
(not timed); every timed step gets a fresh copy of that cache and runs one new token per
sequence, so the cache length stays fixed.

Progress goes to `path + ".partial"` after every round; a run started again with the same
fingerprint and settings continues from there.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..elastic.model import ElasticModel
from ..errors import ProfileError, UnsupportedModelError
from . import onnxrt
from .backends import get_backend
from .cost import CostModel
from .graphrun import GraphModel, GraphRunner
from .runtime import LayerwiseModel, Runner, decode_unavailable, fixed_modules
from .table import (
    FORMAT,
    MODES,
    VERSION,
    LatencyTable,
    model_signature,
    op_rows,
    parse_shapes,
    shape_key,
    stats,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ProfileConfig:
    """How to measure a table. `threads=None` keeps torch's current intra-op threads.

    Example:
        >>> ProfileConfig(mode="decode", shapes="1x256").shapes
        ((1, 256),)
    """

    backend: str = "torch-cpu"
    mode: str = "prefill"
    shapes: tuple = ((1, 256),)
    dtype: str = "float32"
    threads: int | None = None
    repeats: int = 10
    warmup: int = 2
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        shapes = self.shapes
        if isinstance(shapes, str):
            shapes = parse_shapes(shapes)
        object.__setattr__(self, "shapes", tuple(tuple(int(x) for x in s) for s in shapes))
        if self.mode not in MODES:
            raise ProfileError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ProfileError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if not self.shapes:
            raise ProfileError("give at least one shape, e.g. 1x256")
        if self.repeats < 1 or self.warmup < 0:
            raise ProfileError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats} and "
                               f"{self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ProfileError(f"threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = [list(s) for s in self.shapes]
        return d


def uniform_grid(em: ElasticModel) -> list[tuple[str, dict[str, int]]]:
    """Every combination of a candidate index for MLP ops and one for attention ops."""
    kinds = sorted({op.kind for op in em.ops.values()})
    counts = {k: max(len(op.candidates) for op in em.ops.values() if op.kind == k)
              for k in kinds}
    grid = [{}]
    for k in kinds:
        grid = [dict(g, **{k: i}) for g in grid for i in range(counts[k])]
    out = []
    for g in grid:
        widths = {n: op.candidates[min(g[op.kind], len(op.candidates) - 1)]
                  for n, op in em.ops.items()}
        first = {k: next(widths[n] for n, op in em.ops.items() if op.kind == k) for k in kinds}
        out.append((" ".join(f"{k}={w}" for k, w in first.items()), widths))
    return out



class ModuleTimer:
    """Forward hooks that time modules while `enabled`: `modules` is a list of
    (module, ("op", op name) or ("fixed", part))."""

    def __init__(self, modules, clock):
        self.clock, self.enabled, self.marks, self.handles = clock, False, [], []
        for mod, key in modules:
            self._hook(mod, key)

    def _hook(self, mod: nn.Module, key: tuple) -> None:
        stack: list = []

        def pre(_m, _args):
            if self.enabled:
                stack.append(self.clock.mark())

        def post(_m, _args, _out):
            if self.enabled and stack:
                self.marks.append((key, stack.pop(), self.clock.mark()))

        self.handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def collect(self) -> tuple[dict[str, float], dict[str, float]]:
        """(ms per op, ms per fixed part) of the forwards since the last collect."""
        self.clock.sync()
        ops: dict[str, float] = {}
        fixed: dict[str, float] = {}
        for (what, name), start, end in self.marks:
            into = ops if what == "op" else fixed
            into[name] = into.get(name, 0.0) + self.clock.ms(start, end)
        self.marks = []
        return ops, fixed

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


METHODS = {
    "graph": "the elastic graph split into one partition per block (graphrun.py); "
             "forward hooks time every block in context over a grid of uniform widths, one "
             "warm-up forward after every switch; 'other' = whole-graph time minus the blocks",
    "layerwise": "the source Hugging Face class with per-op dense variants (runtime.py); "
                 "in-context module hooks over a grid of uniform widths, one warm-up forward "
                 "after every switch",
    "onnxruntime": "onnxruntime's kernel profiler on exported sub-networks of the uniform "
                   "grid (built from the source Hugging Face class), one after another",
}


def method_for(em: ElasticModel, backend, mode: str, dtype: str) -> str:
    """Which runtime measures: the elastic graph itself where it can (torch on the CPU,
    prefill, the dtype the model holds: every architecture), else the rebuilt Hugging Face
    class (decode, other dtypes, CUDA, onnxruntime: Hugging Face decoders whose config
    `export.hf` knows)."""
    if backend.runtime == "onnxruntime":
        return "onnxruntime"
    held = next(iter(em.parameters()), torch.empty(0)).dtype
    if mode == "prefill" and backend.device == "cpu" and DTYPES[dtype] == held:
        return "graph"
    return "layerwise"


def build_runtime(em: ElasticModel, method: str, mode: str, dtype: str, device: str):
    """The GraphModel or LayerwiseModel that `method` measures on; a clear error when the
    model has no Hugging Face class that the layerwise runtime can rebuild."""
    if method == "graph":
        return GraphModel(em)
    why = decode_unavailable(em)
    if why is None:
        try:
            return LayerwiseModel(em, dtype=DTYPES[dtype], device=device)
        except UnsupportedModelError as exc:
            why = str(exc)
    what = ("decode is unavailable for this model" if mode == "decode" else
            f"{method} measurement ({dtype}, {device}) is unavailable for this model")
    raise UnsupportedModelError(
        f"{what}: it runs sub-networks in their source Hugging Face class (for a key/value "
        f"cache), which it can rebuild for the Llama family, GPT-2, GPT-NeoX and OPT, and "
        f"here {why}. Prefill "
        "on torch-cpu at the model's own dtype measures the elastic graph itself and works "
        "for every architecture; CostModel(em).params() and .memory() need no table")


def timed_modules(net) -> list:
    """(module, key) pairs that ModuleTimer hooks for this runtime."""
    if isinstance(net, GraphModel):
        return [(mod, ("op", name)) for name, mod in net.blocks.items()]
    out = [(mod, ("op", name)) for name, variants in net.variants.items()
           for mods in variants.values() for mod in mods.values()]
    return out + [(mod, ("fixed", part)) for _, mod, part in fixed_modules(net)]


def make_runner(net, clock, mode: str, shape, seed: int):
    if isinstance(net, GraphModel):
        return GraphRunner(net, clock, shape, seed=seed)
    return Runner(net, clock, mode, shape, seed=seed)


def current_fingerprint(em: ElasticModel, config: ProfileConfig, threads: int) -> dict:
    backend = get_backend(config.backend)
    return {"machine": backend.machine(threads), "backend": config.backend,
            "dtype": config.dtype, "mode": config.mode,
            "shapes": [list(s) for s in config.shapes], "model": model_signature(em)}


def profile(em: ElasticModel, config: ProfileConfig = ProfileConfig(), *, path=None,
            progress: bool = True, echo=print, clock=None) -> LatencyTable:
    """Measure the latency table of `em` on this machine (see the module docstring).

    With `path`, the table is written there and partial results to `path.partial` as
    rounds finish; an interrupted run resumes from them. `clock` replaces the backend's
    clock (tests inject a fake one to check the arithmetic exactly).

    Example:
        >>> table = profile(em, ProfileConfig(shapes="1x256"), path="lut.json")  # doctest: +SKIP
    """
    backend = get_backend(config.backend)
    if config.dtype not in backend.dtypes:
        raise ProfileError(f"backend {config.backend} measures {list(backend.dtypes)}, not "
                           f"{config.dtype}")
    threads_before = torch.get_num_threads()
    threads = config.threads or threads_before
    torch.set_num_threads(threads)
    try:
        return _profile(em, config, backend, threads, path, progress, echo,
                        clock if clock is not None else backend.clock())
    finally:
        torch.set_num_threads(threads_before)


@contextlib.contextmanager
def programs_kept(em: ElasticModel, n: int):
    """Keep at least `n` static programs while `n` sets of widths are measured in turn;
    otherwise each switch rebuilds one (untimed, but 0.2-0.5 s for SmolLM2)."""
    before = em.programs_kept
    em.programs_kept = max(before, n)
    try:
        yield
    finally:
        em.programs_kept = before


def _profile(em, config, backend, threads, path, progress, echo, clock) -> LatencyTable:
    t_start = time.perf_counter()
    fingerprint = current_fingerprint(em, config, threads)
    busy_warning(echo)
    method = method_for(em, backend, config.mode, config.dtype)
    settings = dict(config.to_dict(), threads=threads, method=METHODS[method])
    before = em.widths
    net = build_runtime(em, method, config.mode, config.dtype, backend.device)
    partial_path = Path(str(path) + ".partial") if path else None
    samples, spent = _load_partial(partial_path, fingerprint, settings, echo)
    configs = uniform_grid(em)
    total = len(config.shapes) * config.repeats * len(configs)
    done = sum(len(v) for v in samples.values())
    bar = _bar(total, done, progress, f"profile {config.mode}")

    def save():
        if partial_path:
            _save_partial(partial_path, fingerprint, settings, samples,
                          spent + time.perf_counter() - t_start)

    try:
        with programs_kept(em, len(configs)):
            if method == "onnxruntime":
                onnxrt.measure(net, config, configs, samples, threads,
                               lambda shape: Runner(net, clock, config.mode, shape,
                                                    seed=config.seed),
                               bar, save)
            else:
                _measure_torch(net, clock, config, configs, samples, bar, save)
    finally:
        bar.close()
        if method != "graph":
            net.set(em.full_widths())
        em.set_widths(before)
    seconds = spent + time.perf_counter() - t_start
    settings["load_average"] = _load_average()
    why = decode_unavailable(em) if config.mode == "prefill" else None
    settings["decode"] = ("measured" if config.mode == "decode" else
                          "available" if why is None else f"unavailable: {why}")
    table = build_table(em, fingerprint, settings, configs, samples, seconds)
    if path:
        table.save(path)
        if partial_path and partial_path.exists():
            partial_path.unlink()
    return table


def _measure_torch(net, clock, config, configs, samples, bar, save) -> None:
    """Interleaved rounds over the grid; `save()` after every round."""
    timer = ModuleTimer(timed_modules(net), clock)
    try:
        for shape in config.shapes:
            key = shape_key(shape)
            have = samples.setdefault(key, [])
            runner = make_runner(net, clock, config.mode, shape, config.seed)
            start_round = len(have) // len(configs)
            del have[start_round * len(configs):]
            for r in quiet_gc(range(start_round, config.repeats)):
                order = list(enumerate(configs))
                if r % 2:
                    order.reverse()  # alternate the order so slow drift cancels
                for i, (_, widths) in order:
                    net.set(widths)
                    runner.prepare(i)
                    for _ in range(config.warmup if r == start_round else 1):
                        runner.run(i)
                    timer.enabled = True
                    runner.run_parts(i)
                    timer.enabled = False
                    ops, fixed = timer.collect()
                    e2e = runner.run(i)
                    have.append({"config": i, "e2e": e2e, "ops": ops, "fixed": fixed})
                    bar.update(1)
                save()
    finally:
        timer.remove()


def fit_whole(ops: np.ndarray, rest: np.ndarray) -> tuple[float, list[float]]:
    """Fit the grid's end-to-end medians less the timed fixed parts (`rest`) as
    other + scale x (sum of the block entries, `ops`).

    Returns (scale, residuals other_i = rest_i - scale x ops_i). Hooks time a block in
    context but not exactly its share of a whole forward: in decode, where an op takes a
    tenth of a millisecond, a constant "other" (scale 1) left SmolLM2's smallest
    sub-networks 6-13 % too expensive next to the full model in every check. Against the
    same check measurements a fitted scale lowered the ratio errors a little every time
    (decode median 3.2 -> 2.8 %, prefill 4.2 -> 3.6 %), but 12 noisy anchors leave it
    uncertain by about 0.1 (docs/PROFILE.md).

    The scale is the Theil-Sen slope (median of the pairwise slopes), so one slow anchor
    cannot swing it: least squares once fitted a tiny model's table, one of whose anchors
    took ten times the others, into a negative full-model latency. A slope outside
    0.5-2, fewer than 3 grid points or blocks that do not vary give scale 1.
    """
    ops, rest = np.asarray(ops, dtype=float), np.asarray(rest, dtype=float)
    scale = 1.0
    if len(ops) >= 3 and np.ptp(ops) > 0:
        i, j = np.triu_indices(len(ops), 1)
        apart = ops[i] != ops[j]
        slope = float(np.median((rest[j] - rest[i])[apart] / (ops[j] - ops[i])[apart]))
        if 0.5 <= slope <= 2.0:
            scale = slope
    return scale, [float(r - scale * o) for o, r in zip(ops, rest)]


def build_table(em, fingerprint, settings, configs, samples, seconds) -> LatencyTable:
    """Turn raw samples {shape: [{config, e2e, ops, fixed}]} into a LatencyTable."""
    rows = op_rows(em)
    row_of = {op: rid for rid, row in rows.items() for op in row["ops"]}
    entries: dict = {rid: {} for rid in rows}
    fixed: dict = {}
    anchors: dict = {}
    block_scale: dict = {}
    for key, recs in samples.items():
        pools: dict = {}
        parts: dict = {}
        e2e: dict = {}
        for rec in recs:
            widths = configs[rec["config"]][1]
            for op, ms in rec["ops"].items():
                pools.setdefault((row_of[op], widths[op]), []).append(ms)
            for part, ms in rec["fixed"].items():
                parts.setdefault(part, []).append(ms)
            e2e.setdefault(rec["config"], []).append(rec["e2e"])
        for (rid, w), pool in pools.items():
            entries[rid].setdefault(key, {})[str(w)] = stats(pool)
        for by_shape in entries.values():  # widths in ascending order in the file
            if key in by_shape:
                by_shape[key] = dict(sorted(by_shape[key].items(), key=lambda kv: int(kv[0])))
        fixed[key] = {p: stats(v) for p, v in parts.items()}
        timed = sum(v["median_ms"] for v in fixed[key].values())
        ops, whole = [], []
        for i, times in e2e.items():
            widths = configs[i][1]
            ops.append(sum(entries[row_of[op]][key][str(w)]["median_ms"]
                           for op, w in widths.items()))
            whole.append(float(np.median(times)))
        scale, other = fit_whole(ops, np.asarray(whole) - timed)
        for by_shape in entries.values():
            for entry in by_shape.get(key, {}).values():
                for stat in ("median_ms", "p25_ms", "p75_ms"):
                    entry[stat] = entry[stat] * scale if entry[stat] is not None else None
        fixed[key]["other"] = stats(other)
        block_scale[key] = scale
        anchors[key] = [{"label": configs[i][0], "widths": list(configs[i][1].values()),
                         "measured": stats(v)} for i, v in sorted(e2e.items())]
    data = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
            "settings": settings, "rows": rows, "entries": entries, "fixed": fixed,
            "anchors": anchors, "block_scale": block_scale, "seconds": round(seconds, 1)}
    table = LatencyTable(data)
    cost = CostModel(em, table)
    names = list(em.ops)
    full = list(em.full_widths().values())
    for key, items in anchors.items():
        full_pred = cost.latency(None, shape=key)
        full_meas = next((a["measured"]["median_ms"] for a in items if a["widths"] == full),
                         None)
        data.setdefault("full", {})[key] = {"predicted_ms": full_pred, "measured_ms": full_meas}
        for a in items:
            a["predicted_ms"] = cost.latency(dict(zip(names, a["widths"])), shape=key)
            # budgets are fractions of the full model: what validation compares
            a["predicted_fraction"] = a["predicted_ms"] / full_pred
            if full_meas:
                a["measured_fraction"] = a["measured"]["median_ms"] / full_meas
    return table


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def busy_warning(echo) -> None:
    """Say so when other processes load the CPU: timings taken now will be noisy."""
    load = _load_average()
    if load and load[0] > 0.5 * (os.cpu_count() or 1):
        echo(f"warning: the 1-minute load average is {load[0]} on {os.cpu_count()} cores; "
             "other processes will distort the timings (run on an otherwise idle machine)")


def quiet_gc(rounds):
    """Iterate with Python's cyclic garbage collector paused (its pauses land at random in
    timed forwards); it runs once between rounds."""
    import gc

    was = gc.isenabled()
    try:
        for r in rounds:
            gc.collect()
            gc.disable()
            yield r
    finally:
        if was:
            gc.enable()


def _bar(total: int, done: int, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="fwd", dynamic_ncols=True,
                disable=not progress)


def _load_partial(path, fingerprint, settings, echo) -> tuple[dict, float]:
    if path is None or not path.is_file():
        return {}, 0.0
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        data = {}
    if data.get("fingerprint") != fingerprint or data.get("settings") != settings:
        echo(f"ignoring {path}: it was measured with other settings or on another setup")
        return {}, 0.0
    n = sum(len(v) for v in data["samples"].values())
    echo(f"resuming from {path} ({n} timed forwards kept)")
    return data["samples"], float(data.get("seconds", 0.0))


def _save_partial(path, fingerprint, settings, samples, seconds) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "settings": settings,
                               "samples": samples, "seconds": seconds}))
    os.replace(tmp, path)
