"""Trains a tiny Llama elastically; run by tests/test_train.py as a subprocess (plain or
under torchrun). Usage: train_script.py RUN_DIR STEPS [--resume] [--sleep S] [--parallel P]
[--batch B]"""

from __future__ import annotations

import argparse
import os
import sys
import time

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
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--parallel", default="auto")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    _init_distributed()
    em = tiny_elastic()
    if args.sleep:  # slow each forward down so a test can kill the run between checkpoints
        em.register_forward_pre_hook(lambda *_: time.sleep(args.sleep))
    config = TrainConfig(steps=args.steps, batch=args.batch, samples=2, loss="lm+kd",
                         lr=1e-3, warmup=2, checkpoint_every=2, eval_every=3)
    train_elastic(em, tokens(), args.run, config, heldout=tokens(8, seed=1),
                  resume=args.resume, parallel=args.parallel, progress=False)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
