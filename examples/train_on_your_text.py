"""Train an elastic model on your own text so that every sub-network gets good (Eq. 5).

    python examples/huggingface_model.py            # makes runs/example-elastic
    python examples/train_on_your_text.py [runs/example-elastic] [your.txt]

Training checkpoints into runs/example-train; started again, it resumes where it stopped.
"""

import sys
from pathlib import Path

import torch

import flextron_fx
from flextron_fx.train import TrainConfig, train_elastic


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "runs/example-elastic"
    text = Path(sys.argv[2]).read_text() if len(sys.argv) > 2 else __doc__ * 40
    em = flextron_fx.load(folder)
    vocab = em.graph_module.get_parameter(next(
        n for n, p in em.graph_module.named_parameters() if p.dim() == 2)).shape[0]
    ids = torch.tensor([b % vocab for b in text.encode()])  # bytes as tokens; use your tokenizer
    seq = 32
    blocks = ids[: len(ids) // seq * seq].view(-1, seq)
    train, heldout = blocks[:-4], blocks[-4:]
    run = Path("runs/example-train")
    summary = train_elastic(em, train, run,
                            TrainConfig(steps=6, batch=4, samples=2, eval_every=3,
                                        checkpoint_every=3),
                            heldout=heldout, progress=False, resume=run.exists())
    losses = {name: round(loss, 3) for name, loss in summary["val"].items()}
    print(f"{summary['step']} steps; held-out loss per sub-network: {losses}")


if __name__ == "__main__":
    main()
