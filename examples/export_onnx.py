"""Export one budget of a saved elastic model to ONNX and run it in onnxruntime.

    python examples/huggingface_model.py            # makes runs/example-elastic
    python examples/export_onnx.py [runs/example-elastic]
"""

import sys

import numpy as np
import onnxruntime as ort
import torch

import flextron_fx
from flextron_fx.export import to_onnx


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "runs/example-elastic"
    em = flextron_fx.load(folder)
    path = to_onnx(em, "runs/example-half.onnx", 0.5, overwrite=True)  # checked on export
    print(f"wrote {path}: {path.stat().st_size / 2**20:.2f} MiB")

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 100, (3, 20))  # batch and sequence length are dynamic
    (logits, *_) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad(), em.at(0.5):
        expected = em(ids)
    expected = getattr(expected, "logits", expected).numpy()
    print(f"onnxruntime logits {logits.shape}, max difference to PyTorch "
          f"{np.abs(logits - expected).max():.1e}")


if __name__ == "__main__":
    main()
