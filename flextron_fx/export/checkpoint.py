"""Save and load elastic models: weights in safetensors, everything else in JSON.

The weights file holds the permuted full-width parameters under the user's own names
(for a Hugging Face model, its state-dict keys), so it is also a valid full-width
checkpoint of the original architecture. Per-width compensation biases
(passes/compensate.py), which that architecture has no place for, go to a file of their
own, `compensation.safetensors`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._atomic import recover, replace_folder
from ..config import FlextronConfig
from ..elastic.model import ElasticModel
from ..errors import CheckpointError, OutputError, WidthError
from ..passes.compensate import Table, compensate, compensation_modules

FORMAT = 1
WEIGHTS, META = "model.safetensors", "flextron.json"
COMPENSATION = "compensation.safetensors"


def unique_tensors(state: dict[str, torch.Tensor], prefix: str = ""
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors stored once and aliases of tied ones (safetensors
    refuses shared storage). Keys lose `prefix`."""
    tensors, aliases, seen = {}, {}, {}
    for key, t in state.items():
        name = key.removeprefix(prefix)
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:
            aliases[name] = seen[ptr]
            continue
        seen[ptr] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def save(em: ElasticModel, path: str | os.PathLike,
         state: dict[str, torch.Tensor] | None = None, *, overwrite: bool = False) -> Path:
    """Write `em` to the folder `path`.

    A flextron checkpoint already at `path` is replaced atomically: the new one is written
    to a temporary sibling and swapped in, so a crash at any point leaves the old or the new
    checkpoint under the name, never half of one. Any other non-empty folder (or a file) at
    `path` is refused with `OutputError` unless `overwrite=True`. `state` replaces the
    graph module's own state dict (the gathered full weights of a sharded model).

    Example:
        >>> flextron_fx.save(em, "runs/smollm2")   # doctest: +SKIP
    """
    path = Path(path)
    check_target(path, overwrite)
    if state is None:
        state = em.graph_module.state_dict(keep_vars=False)
    comp = compensation_modules(em.graph_module)
    comp_state = {k: v.detach().contiguous().cpu() for k, v in state.items()
                  if k.split(".")[0] in comp}
    state = {k: v for k, v in state.items() if k not in comp_state}
    tensors, aliases = unique_tensors(state, em.param_prefix)
    meta = {
        "format": FORMAT,
        "config": em.config.to_dict(),
        "source": em.source,
        "sample_shape": list(em.sample_shape),
        "param_prefix": em.param_prefix,
        "ops": [{"name": o.name, "kind": o.kind, "module": o.module, "full": o.full,
                 "candidates": list(o.candidates), "sizes": o.sizes} for o in em.ops.values()],
        "widths": em.widths,
        "orders": em.orders,
        "skipped": [vars(s) for s in em.skipped],
        "domains_seen": em.domains_seen,
        "aliases": aliases,
        "compensation": {name: mod.block for name, mod in comp.items()},
    }
    with replace_folder(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if comp_state:
            save_file(comp_state, str(tmp / COMPENSATION), metadata={"format": "pt"})
        (tmp / META).write_text(json.dumps(meta, indent=1, default=_jsonable))
    return path


def check_target(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse (`OutputError`) to save over anything but a flextron checkpoint or an empty
    folder, unless `overwrite`. Call it before long work whose result goes to `path`."""
    path = Path(path)
    recover(path)  # a save killed mid-swap may have moved the old checkpoint aside
    if overwrite or not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        held = sorted(p.name for p in path.iterdir())
        if not held or (path / META).is_file():
            return
        what = f"a folder holding {', '.join(held[:5])}" + (" ..." if len(held) > 5 else "")
    else:
        what = "a file" if path.is_file() else "something that is not a folder"
    raise OutputError(f"{path} is {what}, not a flextron checkpoint; saving there would "
                      "delete it. Choose a new or empty folder, or pass overwrite=True "
                      "(--overwrite on the command line) to replace it")


def _jsonable(x):
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return str(x)


def load(path: str | os.PathLike, model: torch.nn.Module | None = None,
         sample_inputs=None) -> ElasticModel:
    """Load an elastic model saved by `save`.

    Hugging Face models are rebuilt from the saved config; for any other model pass an
    instance of its class (`model`) and `sample_inputs` like those used to convert it.

    Example:
        >>> em = flextron_fx.load("runs/smollm2")   # doctest: +SKIP
    """
    from ..pipeline import flextronize

    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a saved elastic model: expected {META} and "
                              f"{WEIGHTS} inside it (written by flextron_fx.save)")
    meta = read_meta(path)
    source = meta["source"]
    if model is None:
        if source["kind"] != "hf":
            raise CheckpointError(f"{path} holds a {source.get('class')} (not a Hugging Face "
                                  "model): pass model=<an instance of it> and sample_inputs")
        model = _rebuild_hf(source)
    if sample_inputs is None:
        if source["kind"] != "hf":
            raise CheckpointError("pass sample_inputs shaped like those used to convert")
        vocab = int(source["config"].get("vocab_size") or 2)
        g = torch.Generator().manual_seed(0)
        sample_inputs = (torch.randint(0, min(vocab, 1000), tuple(meta["sample_shape"]),
                                       generator=g),)
    try:
        config = FlextronConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise _damaged(path, META, f"its config does not load ({exc})") from exc
    em = flextronize(model, sample_inputs, None, config=config, progress=False)
    saved_ops = [(o["name"], o["kind"], o["full"]) for o in meta["ops"]]
    ops = [(o.name, o.kind, o.full) for o in em.ops.values()]
    if ops != saved_ops:
        raise CheckpointError(f"the model given does not match {path}: it has elastic ops "
                              f"{ops[:3]}... where the checkpoint has {saved_ops[:3]}...")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except SafetensorError as exc:
        raise _damaged(path, WEIGHTS, f"it cannot be read ({exc}); it was probably cut "
                       "short by a full disk or an interrupted copy") from exc
    for alias, canonical in meta["aliases"].items():
        if canonical not in tensors:
            raise _damaged(path, META, f"alias {alias!r} names {canonical!r}, which "
                           f"{WEIGHTS} does not hold")
        tensors[alias] = tensors[canonical]
    prefix = meta["param_prefix"]
    state = {prefix + k: v for k, v in tensors.items()}
    state.update(_compensation(em, path, meta.get("compensation") or {}))
    try:
        missing, unexpected = em.graph_module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise CheckpointError(f"{path} does not fit the model: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    try:
        em.set_widths(meta["widths"])
    except WidthError as exc:
        raise _damaged(path, META, f"its widths do not fit the model ({exc})") from exc
    em.orders = meta.get("orders", {})
    em.domains_seen = meta.get("domains_seen", {})
    return em


def _compensation(em: ElasticModel, path: Path, saved: dict) -> dict[str, torch.Tensor]:
    """Insert the saved compensation nodes into `em`; returns their state."""
    if not saved:
        return {}
    if not isinstance(saved, dict) or not (path / COMPENSATION).is_file():
        raise _damaged(path, COMPENSATION, "flextron.json lists compensation biases but the "
                       "file holding them is missing")
    try:
        tensors = load_file(str(path / COMPENSATION))
    except SafetensorError as exc:
        raise _damaged(path, COMPENSATION, f"it cannot be read ({exc})") from exc
    tables, state = {}, {}
    for name, block in saved.items():
        if f"{name}.bias" not in tensors or block not in em.ops:
            raise _damaged(path, COMPENSATION, f"{name} (for {block}) is not in it or names "
                           "no elastic op of the model")
        mine = {k: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        pairs = sum(1 for k in mine if k.startswith(f"{name}.u."))
        try:
            factors = tuple((mine[f"{name}.u.{k}"], mine[f"{name}.v.{k}"])
                            for k in range(pairs))
        except KeyError as exc:
            raise _damaged(path, COMPENSATION, f"{name} lacks the factor {exc}") from None
        tables[block] = Table(mine[f"{name}.bias"], factors)
        state.update(mine)
    try:
        made = compensate(em.graph_module, [em.block(n) for n in em.ops], tables)
    except ValueError as exc:  # rows that do not fit the candidates
        raise CheckpointError(f"{path / COMPENSATION} does not fit the model: {exc}") from exc
    if sorted(made) != sorted(saved):
        raise CheckpointError(f"{path / COMPENSATION} does not fit the model: it holds "
                              f"{sorted(saved)[:3]}..., the model made {sorted(made)[:3]}...")
    return state


# What `load` reads from flextron.json, with the type each entry must have.
_META_KEYS = {"format": int, "config": dict, "source": dict, "sample_shape": list,
              "param_prefix": str, "ops": list, "widths": dict, "aliases": dict}


def read_meta(path: str | os.PathLike) -> dict:
    """The parsed `flextron.json` of a checkpoint folder, checked for the entries `load`
    needs; `CheckpointError` naming what is wrong otherwise."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, META, f"it is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise _damaged(path, META, f"it holds a {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')}, this flextron_fx "
                              f"reads format {FORMAT}; convert the model again")
    for key, kind in _META_KEYS.items():
        if key not in meta:
            raise _damaged(path, META, f"the entry {key!r} is missing")
        if not isinstance(meta[key], kind):
            raise _damaged(path, META, f"{key!r} is a {type(meta[key]).__name__}, not a "
                           f"{kind.__name__}")
    source = meta["source"]
    for key in ("kind", "class") + (("config",) if source.get("kind") == "hf" else ()):
        if key not in source:
            raise _damaged(path, META, f"the entry 'source' lacks {key!r}")
    if source.get("kind") == "hf" and "model_type" not in source["config"]:
        raise _damaged(path, META, "the Hugging Face config in 'source' lacks 'model_type'")
    for i, op in enumerate(meta["ops"]):
        lacking = [k for k in ("name", "kind", "full") if not isinstance(op, dict) or k not in op]
        if lacking:
            raise _damaged(path, META, f"op {i} of 'ops' lacks {lacking}")
    return meta


def _damaged(path: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path / name} is damaged: {what}. Save the model again "
                           "(flextron_fx.save, or flextron convert --out), or restore the "
                           "folder from a copy")


def _rebuild_hf(source: dict) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, source["class"], None)
    if cls is None:
        raise CheckpointError(f"transformers {transformers.__version__} has no class "
                              f"{source['class']}; install the version used to convert")
    cfg = dict(source["config"])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return cls(config).eval()
