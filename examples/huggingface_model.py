"""Flextronize a Hugging Face causal LM and look at its sub-networks.

    python examples/huggingface_model.py             # a small random Llama, seconds
    python examples/huggingface_model.py --bundled   # the bundled SmolLM2-135M, about a minute

For your own model: `AutoModelForCausalLM.from_pretrained(path)` and your tokenizer.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flextron_fx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundled", action="store_true", help="use SmolLM2-135M (offline)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.bundled:
        from flextron_fx.data import calibration_and_heldout
        from flextron_fx.models import load

        model, tok = load("smollm2-135m")
        calibration, heldout, _ = calibration_and_heldout(tok, n_calib=16, seq_len=128)
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)).eval()
        calibration = torch.randint(0, 512, (16, 64))
        heldout = torch.randint(0, 512, (4, 64))

    em = flextron_fx.flextronize(model, (calibration[:2, :16],), calibration, progress=False)
    print(em.summary())

    def loss(ids):  # next-token loss of the current sub-network
        logits = em(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 ids[:, 1:].flatten()).item()

    with torch.no_grad():
        for fraction in (1.0, 0.75, 0.5):
            with em.at(fraction, kind="mlp"):
                print(f"MLP width {fraction:.0%}: {em.num_params():,} params, held-out loss "
                      f"{loss(heldout[:2]):.3f}")
    flextron_fx.save(em, "runs/example-elastic", overwrite=True)
    print("saved to runs/example-elastic (flextron_fx.load reads it back)")


if __name__ == "__main__":
    main()
