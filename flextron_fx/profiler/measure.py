"""Measure a latency table: every elastic op at every candidate width, in context.

Method. A `LayerwiseModel` (runtime.py) runs the source Hugging Face class with every op
switchable between dense variants. For each shape, a grid of uniform-width sub-networks
(every MLP candidate x every attention candidate) runs in interleaved rounds: per round
and sub-network one warm-up forward after the switch, one forward with hooks that time
every op module and every fixed module (embedding, norms, output head), and one forward
without hooks for the end-to-end time. Op timings pool over the layers sharing a row and
over rounds; the median and quartiles go into the table. "other" is what end-to-end time
leaves over after the timed modules: the glue between modules (residual adds, rotary
tables, mask building, Python dispatch), fitted as a constant over the grid. Timing ops inside the running model, rather than
each module alone, keeps what the sum predicts close to what the whole network does
(caches hold what a real forward leaves there; no per-call timer overhead is counted).

Decode: each sub-network first fills a KV cache of the shape's length with one prefill
(not timed); every timed step gets a fresh copy of that cache and runs one new token per
sequence, so the cache length stays fixed.

Progress goes to `path + ".partial"` after every round; a run started again with the same
fingerprint and settings continues from there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..elastic.model import ElasticModel
from ..errors import ProfileError
from . import onnxrt
from .backends import get_backend
from .cost import CostModel
from .runtime import LayerwiseModel, fixed_modules
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
    """Forward hooks that time every op variant and fixed module while `enabled`."""

    def __init__(self, rt: LayerwiseModel, clock):
        self.clock, self.enabled, self.marks, self.handles = clock, False, [], []
        for name, variants in rt.variants.items():
            for mod in variants.values():
                self._hook(mod, ("op", name))
        for _, mod, part in fixed_modules(rt):
            self._hook(mod, ("fixed", part))

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


class Runner:
    """Runs one forward of the current sub-network at one mode and shape, and times it."""

    def __init__(self, rt: LayerwiseModel, backend, mode: str, shape, seed: int = 0):
        self.rt, self.mode, self.clock = rt, mode, backend.clock()
        b, n = shape
        device = next(rt.model.parameters()).device
        vocab = int(getattr(rt.model.config, "vocab_size", 100))
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (b, n if mode == "prefill" else 1), generator=g)
        self.ids = self.ids.to(device)
        if mode == "decode":
            self.prompt = torch.randint(0, vocab, (b, n), generator=g).to(device)
            self.pos = torch.full((b, 1), n, dtype=torch.long, device=device)
        self._kv: dict = {}

    def prepare(self, key) -> None:
        """Decode: fill (once per sub-network `key`) the KV cache the timed steps start from."""
        if self.mode == "decode" and key not in self._kv:
            with torch.inference_mode():
                out = self.rt.model(input_ids=self.prompt, use_cache=True)
            cache = out.cache if "cache" in out else out.past_key_values
            self._kv[key] = [(layer.keys, layer.values) for layer in cache.layers]

    def cache(self, key) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Decode: the (keys, values) per layer that `prepare(key)` filled."""
        return self._kv[key]

    def run(self, key=None) -> float:
        """One forward (prefill) or one decode step; returns milliseconds."""
        with torch.inference_mode():
            if self.mode == "prefill":
                kwargs = {"input_ids": self.ids}
            else:
                from transformers import DynamicCache

                kwargs = {"input_ids": self.ids, "use_cache": True, "position_ids": self.pos,
                          "cache": DynamicCache(ddp_cache_data=self.cache(key))}
            start = self.clock.mark()
            self.rt.model(**kwargs)
            end = self.clock.mark()
        self.clock.sync()
        return self.clock.ms(start, end)


def current_fingerprint(em: ElasticModel, config: ProfileConfig, threads: int) -> dict:
    backend = get_backend(config.backend)
    return {"machine": backend.machine(threads), "backend": config.backend,
            "dtype": config.dtype, "mode": config.mode,
            "shapes": [list(s) for s in config.shapes], "model": model_signature(em)}


def profile(em: ElasticModel, config: ProfileConfig = ProfileConfig(), *, path=None,
            progress: bool = True, echo=print) -> LatencyTable:
    """Measure the latency table of `em` on this machine (see the module docstring).

    With `path`, the table is written there and partial results to `path.partial` as
    rounds finish; an interrupted run resumes from them.

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
        return _profile(em, config, backend, threads, path, progress, echo)
    finally:
        torch.set_num_threads(threads_before)


def _profile(em, config, backend, threads, path, progress, echo) -> LatencyTable:
    t_start = time.perf_counter()
    fingerprint = current_fingerprint(em, config, threads)
    busy_warning(echo)
    settings = dict(config.to_dict(), threads=threads, method=(
        "onnxruntime's kernel profiler on exported sub-networks of the uniform grid, one "
        "after another" if backend.runtime == "onnxruntime" else
        "in-context module hooks over a grid of uniform widths; one warm-up forward after "
        "every switch"))
    partial_path = Path(str(path) + ".partial") if path else None
    samples, spent = _load_partial(partial_path, fingerprint, settings, echo)
    rt = LayerwiseModel(em, dtype=DTYPES[config.dtype], device=backend.device)
    configs = uniform_grid(em)
    total = len(config.shapes) * config.repeats * len(configs)
    done = sum(len(v) for v in samples.values())
    bar = _bar(total, done, progress, f"profile {config.mode}")

    def save():
        if partial_path:
            _save_partial(partial_path, fingerprint, settings, samples,
                          spent + time.perf_counter() - t_start)

    try:
        if backend.runtime == "onnxruntime":
            onnxrt.measure(rt, config, configs, samples, threads,
                           lambda shape: Runner(rt, backend, config.mode, shape,
                                                seed=config.seed),
                           bar, save)
        else:
            _measure_torch(rt, backend, config, configs, samples, bar, save)
    finally:
        bar.close()
        rt.set(em.full_widths())
    seconds = spent + time.perf_counter() - t_start
    settings["load_average"] = _load_average()
    table = build_table(em, fingerprint, settings, configs, samples, seconds)
    if path:
        table.save(path)
        if partial_path and partial_path.exists():
            partial_path.unlink()
    return table


def _measure_torch(rt, backend, config, configs, samples, bar, save) -> None:
    """Interleaved rounds over the grid; `save()` after every round."""
    timer = ModuleTimer(rt, backend.clock())
    try:
        for shape in config.shapes:
            key = shape_key(shape)
            have = samples.setdefault(key, [])
            runner = Runner(rt, backend, config.mode, shape, seed=config.seed)
            start_round = len(have) // len(configs)
            del have[start_round * len(configs):]
            for r in quiet_gc(range(start_round, config.repeats)):
                order = list(enumerate(configs))
                if r % 2:
                    order.reverse()  # alternate the order so slow drift cancels
                for i, (_, widths) in order:
                    rt.set(widths)
                    runner.prepare(i)
                    for _ in range(config.warmup if r == start_round else 1):
                        runner.run(i)
                    timer.enabled = True
                    runner.run(i)
                    timer.enabled = False
                    ops, fixed = timer.collect()
                    e2e = runner.run(i)
                    have.append({"config": i, "e2e": e2e, "ops": ops, "fixed": fixed})
                    bar.update(1)
                save()
    finally:
        timer.remove()


def build_table(em, fingerprint, settings, configs, samples, seconds) -> LatencyTable:
    """Turn raw samples {shape: [{config, e2e, ops, fixed}]} into a LatencyTable."""
    rows = op_rows(em)
    row_of = {op: rid for rid, row in rows.items() for op in row["ops"]}
    entries: dict = {rid: {} for rid in rows}
    fixed: dict = {}
    anchors: dict = {}
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
        # "other": per grid point, median end-to-end time minus the sum of the medians of
        # its parts, then the median over grid points. Fitting it to medians (not per
        # forward) also absorbs the gap between a median of sums and a sum of medians
        # (timing noise is skewed to the slow side).
        timed = sum(v["median_ms"] for v in fixed[key].values())
        other = []
        for i, times in e2e.items():
            widths = configs[i][1]
            ops = sum(entries[row_of[op]][key][str(w)]["median_ms"] for op, w in widths.items())
            other.append(float(np.median(times)) - timed - ops)
        fixed[key]["other"] = stats(other)
        anchors[key] = [{"label": configs[i][0], "widths": list(configs[i][1].values()),
                         "measured": stats(v)} for i, v in sorted(e2e.items())]
    data = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
            "settings": settings, "rows": rows, "entries": entries, "fixed": fixed,
            "anchors": anchors, "seconds": round(seconds, 1)}
    table = LatencyTable(data)
    cost = CostModel(em, table)
    names = list(em.ops)
    for key, items in anchors.items():
        for a in items:
            a["predicted_ms"] = cost.latency(dict(zip(names, a["widths"])), shape=key)
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
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        progress = False
    if not progress:
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, initial=done, desc=desc, unit="fwd", dynamic_ncols=True)


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
