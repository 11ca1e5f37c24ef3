"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `RUN/checkpoints/step-NNNNNNN/` holding

- `model.safetensors`: the full (gathered) weights under the graph module's names;
- `optimizer.safetensors`: every optimizer state tensor, keyed `<param name>::<field>`;
- `rng.safetensors`: the sampler's generator and torch's CPU (and CUDA) RNG states;
- `state.json`: step, tokens seen, elapsed seconds, the optimizer's param groups, the
  scheduler state and the training config.

Folders are written to a temporary name and renamed, and `RUN/checkpoints/latest` names
the newest one, so a run killed at any moment resumes from the last complete checkpoint.
Data order and sub-network samples are functions of the step and the restored RNG, so a
resumed run repeats the uninterrupted one step for step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import state_dict as dcp

from ..errors import TrainingError
from ..export.checkpoint import atomic_folder, unique_tensors

MODEL, OPTIM, RNG, STATE = ("model.safetensors", "optimizer.safetensors", "rng.safetensors",
                            "state.json")
_FULL = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def latest(run: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoint_dir(run) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run) / pointer.read_text().strip()
    if not (path / STATE).is_file():
        raise TrainingError(f"{pointer} names {path.name}, which is missing or incomplete; "
                            f"point it at one of {_listing(run)} or start a new run")
    return path


def _listing(run: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir(run).glob("step-*"))


def full_model_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights as full CPU tensors (gathered across ranks when sharded)."""
    model_sd, _ = dcp.get_state_dict(module, [], options=_FULL)
    return model_sd


def save_checkpoint(run: Path, step: int, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, gen: torch.Generator,
                    info: dict, *, write: bool = True, keep: int = 2) -> Path:
    """Write checkpoint `step`; every rank must call this (it gathers), rank 0 writes."""
    model_sd, optim_sd = dcp.get_state_dict(module, optimizer, options=_FULL)
    path = checkpoint_dir(run) / f"step-{step:07d}"
    if not write:
        return path
    tensors, aliases = unique_tensors(model_sd)
    optim_tensors = {f"{name}::{field}": torch.as_tensor(value).detach().clone().cpu()
                     for name, fields in optim_sd["state"].items()
                     for field, value in fields.items()}
    rng = {"sampler": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = dict(info, step=step, aliases=aliases, param_groups=optim_sd["param_groups"],
                 scheduler=scheduler.state_dict())
    with atomic_folder(path) as tmp:
        save_file(tensors, str(tmp / MODEL))
        save_file(optim_tensors, str(tmp / OPTIM))
        save_file(rng, str(tmp / RNG))
        (tmp / STATE).write_text(json.dumps(state, indent=1))
    pointer = checkpoint_dir(run) / "latest"
    tmp_pointer = pointer.with_suffix(".tmp")
    tmp_pointer.write_text(path.name)
    os.replace(tmp_pointer, pointer)
    for old in _listing(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(checkpoint_dir(run) / old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, gen: torch.Generator) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns its state.json."""
    state = json.loads((path / STATE).read_text())
    model_sd = load_file(str(path / MODEL))
    for alias, canonical in state["aliases"].items():
        model_sd[alias] = model_sd[canonical]
    optim_state: dict = {}
    for key, value in load_file(str(path / OPTIM)).items():
        name, field = key.rsplit("::", 1)
        optim_state.setdefault(name, {})[field] = value
    optim_sd = {"state": optim_state, "param_groups": state["param_groups"]}
    try:
        dcp.set_state_dict(module, optimizer, model_state_dict=model_sd,
                       optim_state_dict=optim_sd, options=dcp.StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise TrainingError(f"checkpoint {path} does not fit this model or optimizer ({exc}); "
                            "resume with the same model and settings that started the run") \
            from exc
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / RNG))
    gen.set_state(rng["sampler"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
