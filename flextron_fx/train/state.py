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

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import state_dict as dcp

from .._atomic import replace_folder, write_atomic
from ..errors import CheckpointError, TrainingError
from ..export.checkpoint import unique_tensors

log = logging.getLogger(__name__)

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
    check_still_held(run, step)
    tensors, aliases = unique_tensors(model_sd)
    optim_tensors = {f"{name}::{field}": torch.as_tensor(value).detach().clone().cpu()
                     for name, fields in optim_sd["state"].items()
                     for field, value in fields.items()}
    rng = {"sampler": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = dict(info, step=step, aliases=aliases, param_groups=optim_sd["param_groups"],
                 scheduler=scheduler.state_dict())
    with replace_folder(path) as tmp:
        save_file(tensors, str(tmp / MODEL))
        save_file(optim_tensors, str(tmp / OPTIM))
        save_file(rng, str(tmp / RNG))
        (tmp / STATE).write_text(json.dumps(state, indent=1))
    write_atomic(checkpoint_dir(run) / "latest", path.name)
    for old in _listing(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(checkpoint_dir(run) / old, ignore_errors=True)
    return path


def read_state(path: Path) -> dict:
    """The `state.json` of a training checkpoint; `CheckpointError` if it is damaged."""
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, STATE, f"it cannot be read as JSON ({exc})") from exc
    if not isinstance(state, dict):
        raise _damaged(path, STATE, f"it holds a {type(state).__name__}, not an object")
    for key in _STATE_KEYS:
        if key not in state:
            raise _damaged(path, STATE, f"the entry {key!r} is missing")
    return state


_STATE_KEYS = ("step", "tokens", "elapsed_s", "config", "aliases", "param_groups", "scheduler")


def _tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / name))
    except (OSError, SafetensorError) as exc:
        raise _damaged(path, name, f"it cannot be read ({exc})") from exc


def _damaged(path: Path, name: str, what: str) -> CheckpointError:
    run = path.parent.parent
    older = [p for p in _listing(run) if p < path.name]
    way = (f"point {checkpoint_dir(run) / 'latest'} at {older[-1]} (the one before) and "
           "resume again, or start a new run" if older else "start a new run")
    return CheckpointError(f"training checkpoint {path / name} is damaged: {what}. To go on, "
                           f"{way}")


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, gen: torch.Generator) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns its state.json.
    A damaged file raises `CheckpointError` naming it."""
    state = read_state(path)
    model_sd = _tensors(path, MODEL)
    for alias, canonical in state["aliases"].items():
        if canonical not in model_sd:
            raise _damaged(path, STATE, f"alias {alias!r} names {canonical!r}, which "
                           f"{MODEL} does not hold")
        model_sd[alias] = model_sd[canonical]
    optim_state: dict = {}
    for key, value in _tensors(path, OPTIM).items():
        name, sep, field = key.rpartition("::")
        if not sep:
            raise _damaged(path, OPTIM, f"key {key!r} is not '<param>::<field>'")
        optim_state.setdefault(name, {})[field] = value
    optim_sd = {"state": optim_state, "param_groups": state["param_groups"]}
    rng = _tensors(path, RNG)
    if "sampler" not in rng or "torch" not in rng:
        raise _damaged(path, RNG, f"it holds {sorted(rng)}, not the 'sampler' and 'torch' "
                       "generator states")
    # The weights must match exactly (checked here); the optimizer state may lack
    # parameters that never had a gradient (Adam makes its state at the first one: with
    # `vary="mlp"` the attention blocks' compensation is never used), hence strict=False.
    names = set(dcp.get_model_state_dict(module).keys())
    if names != set(model_sd):
        missing, extra = sorted(names - set(model_sd)), sorted(set(model_sd) - names)
        raise TrainingError(f"checkpoint {path} does not fit this model (missing "
                            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                            f"{extra[:3]}{'...' if len(extra) > 3 else ''}); resume with the "
                            "same model and settings that started the run")
    try:
        dcp.set_state_dict(module, optimizer, model_state_dict=model_sd,
                           optim_state_dict=optim_sd,
                           options=dcp.StateDictOptions(full_state_dict=True, strict=False))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise TrainingError(f"checkpoint {path} does not fit this model or optimizer ({exc}); "
                            "resume with the same model and settings that started the run") \
            from exc
    # set_state_dict first gives every parameter a state (a zero-gradient step); one that
    # had none when saved must have none now, or its first real step would differ
    named = list(module.named_parameters(remove_duplicate=False))  # tied: several names
    kept = {id(p) for n, p in named if n in optim_state}
    for _, param in named:
        if id(param) not in kept:
            optimizer.state.pop(param, None)
    try:
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(rng["sampler"])
        torch.set_rng_state(rng["torch"])
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise _damaged(path, STATE, f"the scheduler or RNG state does not load ({exc})") \
            from exc
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


_LEFTOVER = re.compile(r"\.step-\d+\..+|latest\.tmp|\.latest\..+\.tmp")


def clean_leftovers(run: Path) -> list[str]:
    """Remove the half-written checkpoint folders (`.step-*`) and pointer files that a run
    killed while writing a checkpoint left in `RUN/checkpoints/`; logs and returns them.
    Call it only when no other process trains in `run`."""
    folder = checkpoint_dir(run)
    if not folder.is_dir():
        return []
    gone = sorted(p.name for p in folder.iterdir() if _LEFTOVER.fullmatch(p.name))
    for name in gone:
        p = folder / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if gone:
        log.warning("removed %d unfinished checkpoint file(s) from %s, left by a run killed "
                    "while writing: %s", len(gone), folder, ", ".join(gone))
    return gone


LOCK = ".lock"
_held: dict[Path, int] = {}  # run folder (absolute) -> inode of the lock file this process holds


@contextlib.contextmanager
def run_lock(run: Path):
    """Hold `RUN/.lock` while training in `run`: a second process that starts or resumes a
    run in the same folder is refused (`TrainingError`, naming the process that holds it)
    instead of both writing checkpoints and metrics there. The lock is the kernel's
    (`fcntl.flock`), so it goes with its process, even one killed by SIGKILL: a crashed run
    never blocks its own resume (its `.lock` file stays, unlocked). On exit the file is
    removed, and so is the folder if the lock made it and nothing else was written.
    Without `fcntl` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    if run.exists() and not run.is_dir():
        yield  # check_run_folder says what is wrong
        return
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    folder = _inode(run) if created else None
    path = run / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip()
            os.close(fd)
            raise TrainingError(
                f"{run} is in use: {holder or 'another process'} is training in it. Wait "
                "until it ends, or stop it (kill -TERM <pid> makes it save a checkpoint "
                "first), then resume") from None
        try:  # the file we locked may have been removed by its last holder meanwhile
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        _held[run.absolute()] = os.fstat(fd).st_ino
        yield
    finally:
        if _held.pop(run.absolute(), None) == _inode(path):
            path.unlink()  # while still locked: nobody else holds this file
        os.close(fd)
        if folder is not None and _inode(run) == folder and not any(run.iterdir()):
            run.rmdir()  # made by the lock, refused before anything was written


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def check_still_held(run: Path, step: int) -> None:
    """Refuse to write step `step` of a run whose folder was removed, moved or replaced
    while this process trained in it (its lock file is gone or another one): the run stops
    rather than writing the rest of itself into a new folder of that name."""
    held = _held.get(run.absolute())
    if held is not None and _inode(run / LOCK) != held:
        raise TrainingError(
            f"{run} was removed, moved or replaced while this process trained in it (at step "
            f"{step}): the run stops here instead of writing the rest of it elsewhere. Put "
            "the folder back and resume from its newest checkpoint, or start a new run")


def append_metrics(run: Path, row: dict) -> None:
    """Append `row` to `RUN/metrics.jsonl` (after `check_still_held`)."""
    check_still_held(run, row["step"])
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def holding_run_lock(train):
    """`train(em, tokens, run, ...)` run with `run_lock(run)` held (on rank 0 of a
    process group: the other ranks write nothing)."""

    @functools.wraps(train)
    def locked(em, tokens, run, *args, **kwargs):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return train(em, tokens, run, *args, **kwargs)
        with run_lock(Path(run)):
            return train(em, tokens, run, *args, **kwargs)

    return locked
