"""Export a uniform-width sub-network as a plain Hugging Face model and generate with it.

    python examples/huggingface_model.py            # makes runs/example-elastic
    python examples/export_hf_generate.py [runs/example-elastic]

The saved folder loads with `transformers` alone; `flextron_fx` is not needed to run it.
"""

import sys

import torch
from transformers import AutoModelForCausalLM

import flextron_fx
from flextron_fx.export import to_hf


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "runs/example-elastic"
    em = flextron_fx.load(folder)
    small = to_hf(em, 0.5)  # checked against the elastic model before it is returned
    small.save_pretrained("runs/example-half-hf")
    reloaded = AutoModelForCausalLM.from_pretrained("runs/example-half-hf").eval()
    prompt = torch.tensor([[1, 2, 3, 4]])
    out = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"{type(reloaded).__name__} with intermediate_size "
          f"{reloaded.config.intermediate_size}: generated {out[0, 4:].tolist()}")


if __name__ == "__main__":
    main()
