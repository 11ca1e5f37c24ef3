"""Trains a tiny Llama elastically; run by tests/test_train.py as a subprocess (plain or
under torchrun). Usage: train_script.py RUN_DIR STEPS [--resume] [--parallel P] [--batch B]
[--kill-in-checkpoint STEP]

--kill-in-checkpoint SIGKILLs the process at a chosen point, not at a time: while it writes
the checkpoint of STEP (after its model.safetensors, before the rest)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from zoo import ZOO, sample_inputs

import flextron_fx
from flextron_fx.train import TrainConfig, train_elastic
from flextron_fx.train.command import _init_distributed


def tiny_elastic():
    torch.manual_seed(0)
    return flextron_fx.flextronize(ZOO["llama"](), sample_inputs("llama"), None,
                                   progress=False)


def tokens(n: int = 64, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("steps", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-in-checkpoint", type=int, default=None)
    p.add_argument("--parallel", default="auto")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    _init_distributed()
    em = tiny_elastic()
    if args.kill_in_checkpoint is not None:
        from flextron_fx.train import state

        real_save = state.save_file

        def save_then_die(tensors, filename, *a, **kw):
            real_save(tensors, filename, *a, **kw)
            if f"step-{args.kill_in_checkpoint:07d}" in filename:
                os.kill(os.getpid(), signal.SIGKILL)
        state.save_file = save_then_die
    config = TrainConfig(steps=args.steps, batch=args.batch, samples=2, loss="lm+kd",
                         lr=1e-3, warmup=2, checkpoint_every=2, eval_every=3)
    train_elastic(em, tokens(), args.run, config, heldout=tokens(8, seed=1),
                  resume=args.resume, parallel=args.parallel, progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
