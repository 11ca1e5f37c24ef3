"""A fixed sub-network as a model of its source's own Hugging Face class.

`to_hf(em, widths)` slices the weights (`ElasticModel.materialize`) and loads them into the
source class (say `LlamaForCausalLM`) with a config whose sizes are the sub-network's, so
everything the class offers works on the sub-network: a key/value cache, `generate`,
`save_pretrained`. A config holds one size per kind for all layers, so this needs the
same width in every layer (uniform widths, as `set_widths(f)` gives) and a config whose
size fields it knows: Llama-style ones, or GPT-2's, GPT-NeoX's and OPT's, whose head size
is hidden / heads so that only the MLP width can shrink in them. Anything else a config
cannot hold (widths that differ across layers, fewer heads in those three) gives a
`Flextron<Class>` instead (export/sliced.py), which loads with `AutoModelForCausalLM`
once `flextron_fx` is imported. Compensation biases (passes/compensate.py) of the chosen widths
go to the output projections' biases; a Llama without biases gets `attention_bias` /
`mlp_bias` switched on (the other projections' biases then hold zeros), a class without
such flags (Mistral, Qwen2, ...) gives the `Flextron<Class>`, whose layout adds them. The result is
checked against the elastic graph on a short input before it is returned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..elastic.model import ElasticModel
from ..errors import UnsupportedModelError, WidthError
from ..passes.compensate import compensation_modules
from .sliced import fill_tied


@dataclass(frozen=True)
class _Fields:
    """The config fields that hold a family's MLP width and head counts. `heads` None:
    the head size is hidden size / heads (GPT-2, GPT-NeoX, OPT), so a config of the
    class cannot hold fewer heads; only the MLP width can shrink in it."""

    mlp: str
    heads: str | None = None
    kv: str | None = None


# the Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma, SmolLM, ...) and the others
_LLAMA = _Fields("intermediate_size", "num_attention_heads", "num_key_value_heads")
_FAMILY_FIELDS = {"gpt2": _Fields("n_inner"), "gpt_neox": _Fields("intermediate_size"),
                  "opt": _Fields("ffn_dim")}


def to_hf(em: ElasticModel, widths=None, *, check: bool = True):
    """The sub-network at `widths` (default: the current ones) as a Hugging Face model.

    Raises `UnsupportedModelError` for a model that did not come from a Hugging Face class
    whose config fields it knows. Widths that the source config cannot hold give the model
    of `export.sliced.sliced_hf` (per-layer sizes in its config).

    Example:
        >>> small = to_hf(em, 0.5)                                   # doctest: +SKIP
        >>> small.generate(ids, max_new_tokens=20)                  # doctest: +SKIP
    """
    import transformers

    if em.source.get("kind") != "hf":
        raise UnsupportedModelError(
            "to_hf needs a model converted from a Hugging Face class; this one came from "
            f"{em.source.get('kind', 'a plain module')!r}. Use em.materialize() instead")
    cls = getattr(transformers, em.source["class"], None)
    config, fields = _config(cls, em.source)
    chosen = em.static_widths(widths)
    mlp = {chosen[o.name] for o in em.ops.values() if o.kind == "mlp"}
    heads = {chosen[o.name] for o in em.ops.values() if o.kind == "attention"}
    full_heads = {o.candidates[-1] for o in em.ops.values() if o.kind == "attention"}
    if len(mlp) > 1 or len(heads) > 1 or (fields.heads is None and heads != full_heads):
        # a config of the source class cannot say this
        from .sliced import sliced_hf

        return sliced_hf(em, chosen, check=check)
    rows = {m.block: m.row(chosen[m.block]) for m in compensation_modules(em.graph_module).values()
            if m.row(chosen[m.block]) is not None}
    flags = _bias_flags(em, rows, config)
    if flags is None:  # the class has no config flag for an output-projection bias
        from .sliced import sliced_hf

        try:
            return sliced_hf(em, chosen, check=check)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(
                f"{em.source['class']}'s config cannot switch on the output-projection "
                "biases that compensation (passes/compensate.py) adds at these widths, and "
                f"its per-layer Flextron class does not run either ({exc}); export "
                "em.materialize() to ONNX instead, or convert with "
                "FlextronConfig(compensate='none')") from exc
    if fields.heads:
        config.head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
    sub = em.materialize(chosen)
    if heads and fields.heads:
        (h,) = heads
        kv = em.kv_heads(next(o.name for o in em.ops.values() if o.kind == "attention"), h)
        if h % kv:
            raise WidthError(f"{h} query heads over {kv} key/value heads is not a grouped "
                             "attention a Hugging Face class can express; convert with "
                             "head_mode='group' to export to one")
        setattr(config, fields.heads, h)
        setattr(config, fields.kv, kv)
    if mlp:
        (width,) = mlp
        setattr(config, fields.mlp, width)
    prefix = em.param_prefix
    state = {k[len(prefix):]: v for k, v in sub.state_dict().items() if k.startswith(prefix)}
    model = cls(config).eval()
    if rows:  # compensation biases go to the output projections' biases
        for key, value in model.state_dict().items():
            if flags and key.endswith(".bias") and key not in state:
                state[key] = torch.zeros_like(value)  # biases the flags switched on
        for block, row in rows.items():
            key = em.block(block).out_proj.weight[len(prefix):].removesuffix("weight") + "bias"
            state[key] = state[key] + row.detach().to(state[key].dtype)
    fill_tied(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that the config does not describe
        raise UnsupportedModelError(f"the sliced weights do not fit {cls.__name__}: "
                                    f"{exc}") from exc
    if missing or unexpected:
        raise UnsupportedModelError(
            f"the sliced weights do not fit {cls.__name__}: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}")
    if check:
        _check_same(em, chosen, model)
    return model


_BIAS_FLAGS = {"mlp": "mlp_bias", "attention": "attention_bias"}  # Llama's config fields


def _bias_flags(em: ElasticModel, rows: dict, config) -> list[str]:
    """Config flags to switch on so the output projections of the blocks in `rows` (blocks
    with a compensation bias at these widths) have a bias; None if the class has no such
    flag (then `sliced_hf` adds the bias parameters)."""
    flags = []
    params = dict(em.graph_module.named_parameters())
    for block in rows:
        b = em.block(block)
        if b.out_proj.weight.removesuffix("weight") + "bias" in params:  # has one already
            continue
        flag = _BIAS_FLAGS[b.kind]
        if getattr(config, flag, None) is None:
            return None
        if flag not in flags:
            flags.append(flag)
            setattr(config, flag, True)  # the other projections' biases stay zero
    return flags


def _config(cls, source: dict):
    if cls is None:
        raise UnsupportedModelError(f"transformers has no class {source['class']!r}; the "
                                    "model was converted with another transformers version")
    config = cls.config_class.from_dict(copy.deepcopy(source["config"]))
    fields = _FAMILY_FIELDS.get(config.model_type, _LLAMA)
    wanted = [f for f in (fields.mlp, fields.heads, fields.kv) if f]
    missing = [f for f in wanted if not hasattr(config, f)]
    if missing:
        raise UnsupportedModelError(
            f"{source['class']}'s config has no {missing}: to_hf knows the size fields of "
            f"Llama-style configs ({', '.join(wanted)}) and of "
            f"{', '.join(_FAMILY_FIELDS)}; use em.materialize() or an ONNX export instead")
    return config, fields


def _check_same(em: ElasticModel, widths: dict, model, tokens: int = 8) -> None:
    """The Hugging Face model and the elastic graph give the same logits on a short input."""
    vocab = min(int(getattr(model.config, "vocab_size", 100)), 1000)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), em.at(widths):
        ref = em(ids)
        got = model(input_ids=ids).logits
    ref = getattr(ref, "logits", ref[0] if isinstance(ref, (tuple, list)) else ref)
    err = (ref.float() - got.float()).abs().max().item()
    if err > 1e-3 * max(1.0, ref.abs().max().item()):
        raise UnsupportedModelError(
            f"the {type(model).__name__} built from the sliced weights does not reproduce the "
            f"elastic model (max logit difference {err:.3g}); use em.materialize() instead")
