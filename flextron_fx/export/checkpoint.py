"""Save and load elastic models: weights in safetensors, everything else in JSON.

The weights file holds the permuted full-width parameters under the user's own names
(for a Hugging Face model, its state-dict keys), so it is also a valid full-width
checkpoint of the original architecture.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import FlextronConfig
from ..elastic.model import ElasticModel
from ..errors import CheckpointError

FORMAT = 1
WEIGHTS, META = "model.safetensors", "flextron.json"


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
         state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `em` to the folder `path` (replaced atomically if it exists).

    `state` replaces the graph module's own state dict (the gathered full weights of a
    sharded model).

    Example:
        >>> flextron_fx.save(em, "runs/smollm2")   # doctest: +SKIP
    """
    path = Path(path)
    if state is None:
        state = em.graph_module.state_dict(keep_vars=False)
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
        "aliases": aliases,
    }
    with atomic_folder(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / META).write_text(json.dumps(meta, indent=1, default=_jsonable))
    return path


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary folder next to `path` that replaces `path` only if the block succeeds,
    so a crash never leaves a half-written folder under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes a private folder
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')}, this flextron_fx "
                              f"reads format {FORMAT}; convert the model again")
    source = meta["source"]
    if model is None:
        if source["kind"] != "hf":
            raise CheckpointError(f"{path} holds a {source['class']} (not a Hugging Face "
                                  "model): pass model=<an instance of it> and sample_inputs")
        model = _rebuild_hf(source)
    if sample_inputs is None:
        if source["kind"] != "hf":
            raise CheckpointError("pass sample_inputs shaped like those used to convert")
        vocab = int(source["config"].get("vocab_size") or 2)
        g = torch.Generator().manual_seed(0)
        sample_inputs = (torch.randint(0, min(vocab, 1000), tuple(meta["sample_shape"]),
                                       generator=g),)
    config = FlextronConfig.from_dict(meta["config"])
    em = flextronize(model, sample_inputs, None, config=config, progress=False)
    saved_ops = [(o["name"], o["kind"], o["full"]) for o in meta["ops"]]
    ops = [(o.name, o.kind, o.full) for o in em.ops.values()]
    if ops != saved_ops:
        raise CheckpointError(f"the model given does not match {path}: it has elastic ops "
                              f"{ops[:3]}... where the checkpoint has {saved_ops[:3]}...")
    tensors = load_file(str(path / WEIGHTS))
    for alias, canonical in meta["aliases"].items():
        tensors[alias] = tensors[canonical]
    prefix = meta["param_prefix"]
    state = {prefix + k: v for k, v in tensors.items()}
    missing, unexpected = em.graph_module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    em.set_widths(meta["widths"])
    em.orders = meta.get("orders", {})
    return em


def _rebuild_hf(source: dict) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, source["class"], None)
    if cls is None:
        raise CheckpointError(f"transformers {transformers.__version__} has no class "
                              f"{source['class']}; install the version used to convert")
    cfg = dict(source["config"])
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return cls(config).eval()
