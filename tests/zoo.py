"""Tiny random-initialised models of every architecture family the analysis must handle."""

from __future__ import annotations

import math

import torch
from torch import nn


def _hf(cls_name: str, config_name: str, **kw):
    import transformers

    config = getattr(transformers, config_name)(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    # Random init leaves some parameters (norms, biases) at exactly 0 or 1, which would hide
    # permutation bugs; perturb every parameter so each neuron and head is distinguishable.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


_SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2}


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def attn(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.ones(T, T, device=x.device).tril().view(1, 1, T, T)
        att = att.masked_fill(mask == 0, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(torch.nn.functional.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """A nanoGPT-style decoder written without any library: plain modules, matmul attention."""

    def __init__(self, vocab: int = 128, n_embd: int = 64, n_head: int = 4, n_layer: int = 2):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(64, n_embd)
        self.h = nn.ModuleList(NanoBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nanogpt():
    torch.manual_seed(0)
    return NanoGPT().eval()


ZOO = {
    "llama": lambda: _hf("LlamaForCausalLM", "LlamaConfig", **_SMALL, num_attention_heads=4,
                         num_key_value_heads=2),
    "mistral": lambda: _hf("MistralForCausalLM", "MistralConfig", **_SMALL,
                           num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: _hf("Qwen2ForCausalLM", "Qwen2Config", **_SMALL, num_attention_heads=4,
                         num_key_value_heads=2),
    "gpt2": lambda: _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=128, n_embd=64, n_layer=2,
                        n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **_SMALL,
                            num_attention_heads=4),
    "opt": lambda: _hf("OPTForCausalLM", "OPTConfig", vocab_size=128, hidden_size=64,
                       ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, max_position_embeddings=64),
    "phi3": lambda: _hf("Phi3ForCausalLM", "Phi3Config", **_SMALL, num_attention_heads=4,
                        num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2),
    "gemma": lambda: _hf("GemmaForCausalLM", "GemmaConfig", **_SMALL, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=16),
    "bert": lambda: _hf("BertModel", "BertConfig", vocab_size=128, hidden_size=64,
                        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64),
    "nanogpt": nanogpt,
}


def sample_inputs(name: str, batch: int = 2, seq: int = 8):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 128, (batch, seq), generator=g),)


def _hf_extra(cls_name: str, config_name: str, **kw):
    return lambda: _hf(cls_name, config_name, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                       **kw)


_S4 = dict(_SMALL, num_attention_heads=4)

# More families, beyond the list, each with what the analysis must conclude:
# (model factory, kinds of the elastic ops, text that the reason for a dense block contains).
MORE = {
    "qwen3": (_hf_extra("Qwen3ForCausalLM", "Qwen3Config", **_S4, num_key_value_heads=2,
                        head_dim=16), ["attention", "mlp"] * 2, None),
    "gptj": (_hf_extra("GPTJForCausalLM", "GPTJConfig", vocab_size=128, n_embd=64, n_layer=2,
                       n_head=4, rotary_dim=8, n_positions=64), ["attention", "mlp"] * 2, None),
    "codegen": (_hf_extra("CodeGenForCausalLM", "CodeGenConfig", vocab_size=128, n_embd=64,
                          n_layer=2, n_head=4, rotary_dim=8, n_positions=64),
                ["attention", "mlp"] * 2, None),
    "stablelm": (_hf_extra("StableLmForCausalLM", "StableLmConfig", **_S4,
                           num_key_value_heads=2), ["attention", "mlp"] * 2, None),
    "gpt_bigcode": (_hf_extra("GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=128,
                              n_embd=64, n_layer=2, n_head=4, multi_query=True,
                              n_positions=64), ["attention", "mlp"] * 2, None),
    "olmo": (_hf_extra("OlmoForCausalLM", "OlmoConfig", **_S4, num_key_value_heads=2),
             ["attention", "mlp"] * 2, None),
    "gemma2": (_hf_extra("Gemma2ForCausalLM", "Gemma2Config", **_S4, num_key_value_heads=2,
                         head_dim=16), ["attention", "mlp"] * 2, None),
    "phi": (_hf_extra("PhiForCausalLM", "PhiConfig", **_S4), ["attention", "mlp"] * 2, None),
    # q_norm over the whole query width: heads cannot be sliced without slicing the norm
    "olmo2": (_hf_extra("Olmo2ForCausalLM", "Olmo2Config", **_S4, num_key_value_heads=2),
              ["mlp"] * 2, "reduction over a sliced axis"),
    # ALiBi: one slope per head, added to the scores
    "bloom": (_hf_extra("BloomForCausalLM", "BloomConfig", vocab_size=128, hidden_size=64,
                        n_layer=2, n_head=4), ["mlp"] * 2, "baddbmm"),
    # K and V are picked out of each KV group's slots of the fused projection (an index
    # tensor before transformers 5.25, a select since): the slots axis stays whole
    "falcon": (_hf_extra("FalconForCausalLM", "FalconConfig", vocab_size=128, hidden_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         new_decoder_architecture=True, num_kv_heads=2),
               ["mlp"] * 2, "one index of it is selected"),
    # Falcon-7B's layout: multi-query (one K/V head for all queries) with rotary embeddings
    "falcon_mq": (_hf_extra("FalconForCausalLM", "FalconConfig", vocab_size=128, hidden_size=64,
                            num_hidden_layers=2, num_attention_heads=4, alibi=False,
                            multi_query=True, new_decoder_architecture=False),
                  ["attention", "mlp"] * 2, None),
    # Falcon with ALiBi and T5's relative position bias: a per-head bias passed to the
    # attention core as its mask; the heads cannot be permuted without it
    "falcon_alibi": (_hf_extra("FalconForCausalLM", "FalconConfig", vocab_size=128,
                               hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               alibi=True, multi_query=False, new_decoder_architecture=False),
                     ["mlp"] * 2, "per-head attention mask"),
    "t5_encoder": (_hf_extra("T5EncoderModel", "T5Config", vocab_size=128, d_model=64, d_kv=16,
                             d_ff=96, num_layers=2, num_heads=4),
                   ["mlp"] * 2, "per-head attention mask"),
}
