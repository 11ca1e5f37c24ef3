"""The onnxruntime backend: sub-networks exported to ONNX and timed in an InferenceSession.

Export. The per-layer Hugging Face model (runtime.py) at one mix of widths is exported by
`export.onnx.export_program` (torch's dynamo exporter, as every ONNX file of the library) at
the shape being measured: prefill takes the token ids; decode takes one new token, its
positions and the key/value cache of every layer as graph inputs. Every export is checked
against torch's logits before it is timed, so what is measured is the sub-network, sliced
for real, not an approximation of it.

Per-op times come from onnxruntime's own profiler (`SessionOptions.enable_profiling`),
which records every kernel's duration. A kernel is attributed to the elastic op or fixed
part whose module produced its output: the exporter records each node's module scope
(metadata `pkg.torch.onnx.name_scopes`), and the nodes onnxruntime fuses keep the output
names of the nodes they replace. End-to-end times come from a plain session, timed alone
before the profiled session of the same model is made, so neither the profiler's overhead
nor a second session's spinning worker threads are in them; "other" is then fitted as in
measure.py.

Sub-networks are measured one after another (each needs its own export and session), not
in interleaved rounds; the order alternates between shapes.
"""

from __future__ import annotations

import ast
import json
import os
import tempfile
import time
from collections import Counter

import numpy as np
import torch
from torch import nn

from ..errors import ProfileError
from ..export.onnx import export_program
from .runtime import LayerwiseModel, fixed_modules
from .table import shape_key

WRAP = "net"  # attribute of the export wrapper holding the model: scopes start "net."




class _Prefill(nn.Module):
    def __init__(self, model):
        super().__init__()
        setattr(self, WRAP, model)

    def forward(self, input_ids):
        return getattr(self, WRAP)(input_ids=input_ids, use_cache=False).logits


class _Decode(nn.Module):
    """One decode step with the cache as flat graph inputs: k0, v0, k1, v1, ..."""

    def __init__(self, model):
        super().__init__()
        setattr(self, WRAP, model)

    def forward(self, input_ids, position_ids, *kv):
        from transformers import DynamicCache

        pairs = [(kv[i], kv[i + 1]) for i in range(0, len(kv), 2)]
        out = getattr(self, WRAP)(input_ids=input_ids, position_ids=position_ids,
                                  cache=DynamicCache(ddp_cache_data=pairs), use_cache=True)
        return out.logits


def attribution(rt: LayerwiseModel) -> dict[str, tuple[str, str]]:
    """Module path -> ("op", op name) or ("fixed", part), for every module a node can be
    scoped to; anything else is "other"."""
    out = {path: ("op", name) for name, paths in rt.units.items() for path in paths}
    out.update({path: ("fixed", part) for path, _, part in fixed_modules(rt)})
    return out


class ExportedNetwork:
    """The current sub-network of `rt`, exported at one mode and shape, in onnxruntime.

    `run()` times one forward of the plain session (ms). With `profiled=True`,
    `run_profiled()` replaces it by a session that records kernels (so time the plain
    forwards first), and `breakdown()` returns per profiled forward ({op: ms}, {part: ms}).
    """

    def __init__(self, rt: LayerwiseModel, runner, key, *, threads: int,
                 profiled: bool = False, check: bool = True):
        self.rt, self._dir = rt, None
        runner.prepare(key)
        args = [runner.ids]
        wrapper = _Prefill(rt.model)
        if runner.mode == "decode":
            args += [runner.pos] + [t for pair in runner.cache(key) for t in pair]
            wrapper = _Decode(rt.model)
        wrapper.eval()
        args = [a.clone() for a in args]  # plain tensors: the cache was made in inference mode
        with torch.inference_mode(False), torch.no_grad():
            proto = export_program(wrapper, tuple(args))
            ref = wrapper(*args).float().numpy()
        self.scopes = _output_scopes(proto)
        blob = proto.SerializeToString()
        del proto
        self.threads = threads
        self.sessions = {"plain": self._session(blob)}
        # the profiled session is made at its first run, after the plain one has been timed
        # alone (a second session alive beside it made the plain forwards ~10 % slower)
        self._blob = blob if profiled else None
        names = [i.name for i in self.sessions["plain"].get_inputs()]
        self.feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        if check:
            got = self.sessions["plain"].run(None, self.feeds)[0]
            err = float(np.abs(got - ref).max())
            if err > 1e-3 * max(1.0, float(np.abs(ref).max())):
                raise ProfileError(f"the ONNX export of this sub-network differs from torch "
                                   f"(max logit difference {err:.3g}); onnxruntime times "
                                   "would not be of the same network")

    def _session(self, blob: bytes, profile_dir: str | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if profile_dir:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(profile_dir, "profile")
            so.optimized_model_filepath = os.path.join(profile_dir, "optimized.onnx")
        return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])

    def run(self) -> float:
        sess = self.sessions["plain"]
        start = time.perf_counter_ns()
        sess.run(None, self.feeds)
        return (time.perf_counter_ns() - start) / 1e6

    def run_profiled(self) -> None:
        if "profiled" not in self.sessions:
            if self._blob is None:
                raise ProfileError("this network was exported without profiled=True")
            del self.sessions["plain"]  # timed already; only one session alive at a time
            self._dir = tempfile.mkdtemp(prefix="flextron-ort-")
            self.sessions["profiled"] = self._session(self._blob, self._dir)
            self._blob = None
        self.sessions["profiled"].run(None, self.feeds)

    def breakdown(self) -> list[tuple[dict, dict]]:
        """End the profiler; per profiled forward (ms per op, ms per fixed part)."""
        import onnx

        path = self.sessions["profiled"].end_profiling()
        try:
            with open(path) as f:
                events = json.load(f)
            optimized = onnx.load(os.path.join(self._dir, "optimized.onnx"),
                                  load_external_data=False)
        finally:
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)
        where = attribution(self.rt)
        owner = {}
        for node in optimized.graph.node:
            owner[node.name] = _owner(where, [self.scopes.get(o) for o in node.output])
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                      if e.get("cat") == "Session" and e.get("name") == "model_run")
        out = [({}, {}) for _ in runs]
        starts = [s for s, _ in runs]
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            what = owner.get(e["name"][: -len("_kernel_time")])
            if what is None:
                continue
            i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
            if i < 0 or e["ts"] > runs[i][1]:
                continue
            into = out[i][0] if what[0] == "op" else out[i][1]
            into[what[1]] = into.get(what[1], 0.0) + e["dur"] / 1e3
        return out


def _output_scopes(proto) -> dict[str, list[str]]:
    """Value name -> module scopes of the node that produced it (outer first)."""
    out = {}
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        raw = meta.get("pkg.torch.onnx.name_scopes")
        if not raw:
            continue
        scopes = [s[len(WRAP) + 1:] for s in ast.literal_eval(raw)
                  if s.startswith(WRAP + ".")]
        for name in node.output:
            out[name] = scopes
    return out


def _owner(where: dict, scope_lists) -> tuple[str, str] | None:
    """The innermost op or fixed part among the scopes of a node's outputs; None = other."""
    for scopes in scope_lists:
        for path in reversed(scopes or []):
            if path in where:
                return where[path]
    return None


def measure(rt: LayerwiseModel, config, configs, samples: dict, threads: int, runner_for,
            bar, save) -> None:
    """Fill `samples[shape]` with `config.repeats` records per grid point, one grid point
    at a time (export, check, then warm-up and timed forwards of the plain session, then
    of the profiled one);
    `save()` after each grid point keeps the work of an interrupted run."""
    for s, shape in enumerate(config.shapes):
        have = samples.setdefault(shape_key(shape), [])
        done = Counter(rec["config"] for rec in have)
        keep = {i for i, n in done.items() if n >= config.repeats}
        have[:] = [r for r in have if r["config"] in keep]
        runner = runner_for(shape)
        order = list(enumerate(configs))
        if s % 2:
            order.reverse()
        for i, (_, widths) in order:
            if i in keep:
                continue
            rt.set(widths)
            net = ExportedNetwork(rt, runner, i, threads=threads, profiled=True)
            e2e = _timed(net, config.warmup, config.repeats, bar)  # the plain session, alone
            for _ in range(config.warmup + config.repeats):
                net.run_profiled()
            parts = net.breakdown()[config.warmup:]
            for t, (ops, fixed) in zip(e2e, parts):
                have.append({"config": i, "e2e": t, "ops": ops, "fixed": fixed})
            del net
            save()


def time_networks(rt: LayerwiseModel, nets, runner, *, threads: int, repeats: int,
                  warmup: int, bar) -> dict[int, list[float]]:
    """End-to-end ms of each (group, label, widths) in `nets`, one exported network at a
    time."""
    times = {}
    for i, (_, _, widths) in enumerate(nets):
        rt.set(widths)
        times[i] = _timed(ExportedNetwork(rt, runner, i, threads=threads), warmup, repeats,
                          bar)
    return times


def _timed(net: ExportedNetwork, warmup: int, repeats: int, bar) -> list[float]:
    """`warmup` untimed, then `repeats` timed forwards (ms) of the plain session."""
    for _ in range(warmup):
        net.run()
    out = []
    for _ in range(repeats):
        out.append(net.run())
        bar.update(1)
    return out
