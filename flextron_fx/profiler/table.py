"""The latency lookup table: per elastic-op shape and candidate width, measured latency.

A table covers one backend, dtype and mode (prefill or decode) for a list of shapes, on
one machine and one elastic model; all of that is its *fingerprint*, and a table refuses
to be used where any of it differs (`FingerprintError` listing every difference). Ops of
the same kind and sizes share a *row*: all 30 MLPs of SmolLM2 are one row, and their
per-layer timings pool into its entries. A sub-network's predicted latency is the sum the
paper uses (Eq. 6-8), over every op's entry at its width, plus the fixed parts:
embedding, norms, output head, and "other" (residual adds, rotary tables, mask building,
Python dispatch), which is what end-to-end time leaves over after the timed modules.
Entries are the hooked block times times one `block_scale` per shape, fitted with "other"
so that the sum predicts the whole forwards measured at the grid (measure.fit_whole;
tables from before the fit have no `block_scale` and entries as hooked).

JSON layout (format "flextron-latency-table", version 1):

    {"format", "version", "fingerprint": {machine, backend, dtype, mode, shapes, model},
     "settings": {...how it was measured...},
     "rows": {row id: {"kind", "sizes", "candidates", "ops": [op names]}},
     "entries": {row id: {shape: {width: {"median_ms", "p25_ms", "p75_ms", "n"}}}},
     "fixed": {shape: {part: {...same stats...}}},
     "anchors": {shape: [{"label", "widths", "measured", "predicted_ms",
                          "predicted_fraction", "measured_fraction"}]},
     "full": {shape: {"predicted_ms", "measured_ms"}},  (the full model, when measured)
     "block_scale": {shape: scale of the hooked block times in the entries},
     "seconds": total measuring time}

Budgets and routers use fractions of the full model (`fraction`, `CostModel.fraction`):
a machine that runs uniformly slower or faster later changes every entry by the same
factor, so the fractions, and what `flextron profile-check` validates, still hold.

Shapes are written "BxL": batch x sequence length (prefill) or batch x KV-cache length
(decode: one new token per sequence attending over L cached ones).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..elastic.model import ElasticModel
from ..errors import FingerprintError, MissingEntryError, ProfileError

FORMAT, VERSION = "flextron-latency-table", 1
MODES = ("prefill", "decode")
FIXED_PARTS = ("embedding", "norms", "head", "other")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"1x256,4x128" -> [(1, 256), (4, 128)]."""
    out = []
    for part in str(text).split(","):
        try:
            b, n = part.strip().lower().split("x")
            shape = (int(b), int(n))
        except ValueError:
            raise ProfileError(f"bad shape {part!r}: write BATCHxLENGTH, e.g. 1x256 "
                               "(several: 1x256,4x128)") from None
        if min(shape) < 1:
            raise ProfileError(f"bad shape {part!r}: batch and length must be at least 1")
        out.append(shape)
    return out


def shape_key(shape) -> str:
    if isinstance(shape, str):
        return shape
    b, n = shape
    return f"{b}x{n}"


def describe_shape(mode: str, shape) -> str:
    b, n = parse_shapes(shape_key(shape))[0]
    if mode == "decode":
        return f"{mode} batch {b}, one new token over a {n}-token cache"
    return f"{mode} batch {b} x {n} tokens"


def stats(samples) -> dict:
    a = np.asarray(list(samples), dtype=float)
    if a.size == 0:
        return {"median_ms": None, "p25_ms": None, "p75_ms": None, "n": 0}
    p25, med, p75 = np.percentile(a, [25, 50, 75])
    return {"median_ms": float(med), "p25_ms": float(p25), "p75_ms": float(p75), "n": int(a.size)}


def op_rows(em: ElasticModel) -> dict[str, dict]:
    """Ops grouped by kind, sizes and candidates: ops in one row cost the same."""
    rows: dict[str, dict] = {}
    for name, op in em.ops.items():
        sizes = ",".join(f"{k}={v}" for k, v in sorted(op.sizes.items()))
        rid = f"{op.kind}[{sizes}]"
        row = rows.setdefault(rid, {"kind": op.kind, "sizes": dict(op.sizes),
                                    "candidates": list(op.candidates), "ops": []})
        if row["candidates"] != list(op.candidates):  # same sizes, other candidates
            rid = f"{rid}{list(op.candidates)}"
            row = rows.setdefault(rid, {"kind": op.kind, "sizes": dict(op.sizes),
                                        "candidates": list(op.candidates), "ops": []})
        row["ops"].append(name)
    return rows


def model_signature(em: ElasticModel) -> dict:
    """What identifies the elastic model a table was measured for."""
    # key/value heads per candidate: the same head counts cost differently in head mode
    # "group" (fewer KV heads) and "query" (all KV heads kept)
    ops = [[n, op.kind, op.full, list(op.candidates), sorted(op.sizes.items()),
            [em.kv_heads(n, w) for w in op.candidates] if op.kind == "attention" else []]
           for n, op in em.ops.items()]
    cfg = em.source.get("config", {}) if em.source.get("kind") == "hf" else {}
    extra = {k: cfg.get(k) for k in ("hidden_size", "vocab_size", "num_hidden_layers")}
    blob = json.dumps([em.source.get("class"), extra, ops], sort_keys=True, default=str)
    return {"class": em.source.get("class", em.source.get("kind")), "ops": len(ops),
            "hash": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class LatencyTable:
    """A measured latency lookup table (see the module docstring for the format).

    Example:
        >>> table = LatencyTable.load("lut.json", backend="torch-cpu")  # doctest: +SKIP
        >>> table.op_latency("model.layers.0.mlp#1", 768, "1x256")    # doctest: +SKIP
        1.93
    """

    def __init__(self, data: dict, source: str = "<memory>"):
        if data.get("format") != FORMAT:
            raise ProfileError(f"{source} is not a latency table (format "
                               f"{data.get('format')!r}, expected {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ProfileError(f"{source} is a version {data.get('version')} latency table; "
                               f"this flextron_fx reads version {VERSION}: profile again")
        self.data, self.source = data, source
        self._op_row = {op: rid for rid, row in data["rows"].items() for op in row["ops"]}

    # ---- identity ---------------------------------------------------------------------
    @property
    def fingerprint(self) -> dict:
        return self.data["fingerprint"]

    @property
    def mode(self) -> str:
        return self.fingerprint["mode"]

    @property
    def shapes(self) -> list[str]:
        return [shape_key(s) for s in self.fingerprint["shapes"]]

    def require(self, **expected) -> None:
        """Raise FingerprintError unless every given fingerprint field matches.

        Fields: machine (dict), backend, dtype, mode, model (dict), shapes (each given
        shape must be in the table). Every difference is listed, not just the first.
        """
        fp = self.fingerprint
        diffs = []
        for key, want in expected.items():
            if want is None:
                continue
            if key not in fp:
                raise ProfileError(f"unknown fingerprint field {key!r}; fields: {sorted(fp)}")
            have = fp[key]
            if key == "shapes":
                have_keys = {shape_key(s) for s in have}
                missing = [shape_key(s) for s in want if shape_key(s) not in have_keys]
                if missing:
                    diffs.append(f"shapes: table has {sorted(have_keys)}, asked for {missing}")
            elif isinstance(want, dict) and isinstance(have, dict):
                fw, fh = _flat(want), _flat(have)
                for k in sorted(set(fw) | set(fh)):
                    if fw.get(k) != fh.get(k):
                        diffs.append(f"{key}.{k}: table {fh.get(k)!r}, here {fw.get(k)!r}")
            elif want != have:
                diffs.append(f"{key}: table {have!r}, here {want!r}")
        if diffs:
            raise FingerprintError(
                f"the latency table {self.source} was measured for a different setup: "
                + "; ".join(diffs) + ". Measure one for this setup with `flextron profile` "
                "(its fingerprint says where a table is valid)")

    def check_model(self, em: ElasticModel) -> None:
        self.require(model=model_signature(em))

    # ---- lookups ----------------------------------------------------------------------
    def row_of(self, op: str) -> str:
        if op not in self._op_row:
            raise MissingEntryError(f"the latency table {self.source} has no row for op {op!r};"
                                    " it was measured for another model (profile this one)")
        return self._op_row[op]

    def _shape(self, shape) -> str:
        key = shape_key(shape if shape is not None else self.shapes[0])
        if shape is None and len(self.shapes) > 1:
            raise ProfileError(f"the table holds several shapes {self.shapes}; say which")
        return key

    def op_latency(self, op: str, width: int, shape=None, stat: str = "median_ms") -> float:
        """Measured latency (ms) of `op` at `width` query heads or neurons and `shape`."""
        key = self._shape(shape)
        rid = self.row_of(op)
        by_shape = self.data["entries"].get(rid, {})
        entry = by_shape.get(key, {}).get(str(width))
        if entry is None or entry.get(stat) is None:
            have_w = sorted(int(w) for w in by_shape.get(key, {}))
            raise MissingEntryError(
                f"the latency table {self.source} has no entry for op {op} (row {rid}) at "
                f"width {width} and shape {key} ({self.mode}); it has widths {have_w} at "
                f"shapes {sorted(by_shape)}. Profile with this width and shape")
        return entry[stat]

    def full_ms(self, shape=None) -> float:
        """Predicted latency (ms) of the full model: every op at full width plus fixed."""
        key = self._shape(shape)
        fixed = sum(self.fixed_ms(key).values())
        ops = 0.0
        for row in self.data["rows"].values():
            widest = max(int(w) for w in row["candidates"])
            ops += len(row["ops"]) * self.op_latency(row["ops"][0], widest, key)
        return fixed + ops

    def fraction(self, op: str, width: int, shape=None) -> float:
        """`op` at `width` as a fraction of the full model's predicted latency."""
        return self.op_latency(op, width, shape) / self.full_ms(shape)

    def fixed_ms(self, shape=None, stat: str = "median_ms") -> dict[str, float]:
        key = self._shape(shape)
        parts = self.data["fixed"].get(key)
        if parts is None:
            raise MissingEntryError(f"the latency table {self.source} has no fixed parts at "
                                    f"shape {key} ({self.mode}); it has {self.shapes}")
        return {p: v[stat] for p, v in parts.items() if v.get(stat) is not None}

    # ---- files ------------------------------------------------------------------------
    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, path)
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path, **expected) -> LatencyTable:
        """Read a table; with `expected` fingerprint fields, refuse a different setup."""
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"no latency table at {path}; measure one with "
                               "`flextron profile RUN_DIR --json PATH`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path} is not valid JSON ({exc}); profile again") from exc
        table = cls(data, source=str(path))
        table.require(**expected)
        return table
