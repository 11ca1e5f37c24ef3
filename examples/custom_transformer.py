"""Flextronize a transformer written by hand in plain PyTorch (no Hugging Face).

    python examples/custom_transformer.py

The blocks are found from the traced graph's dataflow, so any module layout works.
"""

import torch
from torch import nn

import flextron_fx


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(nn.functional.gelu(self.fc(self.norm2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=256, dim=64, heads=4, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def main():
    torch.manual_seed(0)
    model = TinyGPT().eval()  # your trained model here
    calibration = torch.randint(0, 256, (16, 32))  # token ids of text like yours
    em = flextron_fx.flextronize(model, (calibration[:2, :8],), calibration, progress=False)
    print(em.summary())

    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = em(ids)
        with em.at(0.5):  # half of every MLP and half of the heads
            half = em(ids)
            dense = em.materialize()  # a plain model with the smaller weights
    print(f"full {em.num_params(1.0):,} params, half {em.num_params(0.5):,}")
    torch.testing.assert_close(dense(ids), half)
    torch.testing.assert_close(full, model(ids), atol=1e-4, rtol=1e-4)  # sorting kept it exact
    print("ok: the sorted full model equals the original, the half one its dense copy")


if __name__ == "__main__":
    main()
