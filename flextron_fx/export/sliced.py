"""A sub-network at any widths, different in every layer if need be, as a model of its
source's own Hugging Face class.

`sliced_hf(em, widths)` builds the source class (say `LlamaForCausalLM`) and gives each
layer's projections the shapes of the sliced weights (`ElasticModel.materialize`), and each
attention module the head counts it keeps, so that everything the class offers runs on
the sub-network: `generate` with a `DynamicCache` whose key/value tensors have the kept
key/value heads of each layer, `save_pretrained`, `from_pretrained`.

The model is an instance of a subclass, `Flextron<Class>`, whose config
(`Flextron<Config>`, model type `flextron_<type>`) carries the per-layer shapes
(`flextron_layout`). Importing `flextron_fx` registers these classes with
`AutoConfig` / `AutoModelForCausalLM` as soon as `transformers` is imported, so a saved
folder loads with `AutoModelForCausalLM.from_pretrained(folder)`.

This works for classes whose attention reshapes with `-1` heads or reads its head counts
from attributes of the attention module (Llama, Mistral, Qwen2, Qwen3, Gemma, GPT-2, ...);
every result is checked against the elastic graph, and a class that reads head counts from
its shared config (Phi-3's fused projection) is refused with `UnsupportedModelError`.
"""

from __future__ import annotations

import copy
import importlib.abc
import importlib.util
import logging
import sys

import torch
from torch import nn

from ..elastic.model import ElasticModel
from ..errors import UnsupportedModelError, WidthError

log = logging.getLogger(__name__)

LAYOUT = "flextron_layout"  # config field: {"shapes": {param: shape}, "attention": {...}}
PREFIX = "flextron_"

# Families registered with the auto classes: model type -> (config class, model class).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "opt": ("OPTConfig", "OPTForCausalLM"),
}


def sliced_hf(em: ElasticModel, widths=None, *, check: bool = True):
    """The sub-network at `widths` (default: the current ones; one width per op, so layers
    may differ) as an instance of `Flextron<source class>`.

    Raises `UnsupportedModelError` for a model not converted from a Hugging Face class, or
    whose class does not run at per-layer sizes, and `WidthError` for per-token widths or a
    head count that is no grouped attention (head mode "query" with uneven groups).

    Example:
        >>> small = sliced_hf(em, {"model.layers.0.mlp#1": 256})     # doctest: +SKIP
        >>> small.generate(ids, max_new_tokens=20)                  # doctest: +SKIP
        >>> small.save_pretrained("small-hf")                       # doctest: +SKIP
    """
    from ..passes.compensate import compensation_modules
    from .hf import _check_same

    base = _source_class(em)
    chosen = em.static_widths(widths)
    attention = {}
    for op in em.ops.values():
        if op.kind != "attention":
            continue
        block = em.block(op.name)
        h = chosen[op.name]
        kv = em.kv_heads(op.name, h)
        if h % kv:
            raise WidthError(f"{op.name} keeps {h} query heads over {kv} key/value heads, "
                             "which is no grouped attention a Hugging Face class can run; "
                             "pick a width that keeps whole groups, or convert with "
                             "head_mode='group'")
        attention[block.module_path] = [h, kv, block.sizes["head_dim"]]
    prefix = em.param_prefix
    sub = em.materialize(chosen)
    state = {k[len(prefix):]: v for k, v in sub.state_dict().items() if k.startswith(prefix)}
    for mod in compensation_modules(em.graph_module).values():  # to output biases
        row = mod.row(chosen[mod.block])
        if row is None:
            continue
        key = em.block(mod.block).out_proj.weight[len(prefix):].removesuffix("weight") + "bias"
        bias = state.get(key)
        state[key] = row.detach().clone() if bias is None else bias + row.to(bias.dtype)

    model = _build(em, base, state, attention)
    if check:
        try:
            _check_same(em, chosen, model)
        except RuntimeError as exc:  # e.g. a fused projection split by the config's sizes
            raise UnsupportedModelError(
                f"{base.__name__} does not run at per-layer sizes ({type(exc).__name__}: "
                f"{str(exc)[:200]}): it reads head counts or widths from its shared config. "
                "Use uniform widths with to_hf, or export to ONNX (to_onnx)") from exc
    return model


def full_hf(em: ElasticModel):
    """`em`'s weights at full width in a `Flextron<source class>` whose parameters share
    `em`'s tensors (whatever feeds the graph's widths, routers included)."""
    prefix = em.param_prefix
    state = {k[len(prefix):]: v.detach() for k, v in em.graph_module.state_dict().items()
             if k.startswith(prefix)}
    return _build(em, _source_class(em), state, {}, share=True)


def _source_class(em: ElasticModel) -> type:
    import transformers

    if em.source.get("kind") != "hf":
        raise UnsupportedModelError(
            "a sliced Hugging Face model needs a model converted from a Hugging Face class; "
            f"this one came from {em.source.get('kind', 'a plain module')!r}. Use "
            "em.materialize() (or to_onnx) instead")
    base = getattr(transformers, em.source["class"], None)
    if base is None:
        raise UnsupportedModelError(f"transformers has no class {em.source['class']!r}; the "
                                    "model was converted with another transformers version")
    return base


def _build(em: ElasticModel, base: type, state: dict, attention: dict, *, share: bool = False):
    """A `Flextron<base>` whose parameters have the shapes in `state` and hold its tensors,
    and whose attention modules keep the head counts in `attention` ({module path:
    [heads, kv heads, head size]}); with `share`, the parameters are `state`'s tensors."""
    model_cls, config_cls = flextron_classes(base)
    raw = copy.deepcopy(em.source["config"])
    raw.pop("model_type", None)
    with torch.device("meta"):  # full sizes, without memory: which shapes differ
        have = base(base.config_class(**raw)).state_dict()
    shapes = {k: list(v.shape) for k, v in state.items()
              if k not in have or tuple(have[k].shape) != tuple(v.shape)}
    model = model_cls(config_cls(**raw, **{LAYOUT: {"shapes": shapes, "attention": attention}}))
    model.eval()
    _load(model, state, share)
    return model


def fill_tied(model: nn.Module, state: dict) -> None:
    """Give every name of a tied parameter the tensor stored under one of its names (the
    graph stores tied tables once)."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in aliases.values():
        have = [n for n in names if n in state]
        for n in names:
            if have and n not in state:
                state[n] = state[have[0]]


def _load(model: nn.Module, state: dict, share: bool = False) -> None:
    fill_tied(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=share)
    except RuntimeError as exc:
        raise UnsupportedModelError(f"the sliced weights do not fit {type(model).__name__}: "
                                    f"{exc}") from exc
    if missing or unexpected:
        raise UnsupportedModelError(
            f"the sliced weights do not fit {type(model).__name__}: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Give `model`'s parameters the shapes in `layout["shapes"]` (uninitialised) and its
    attention modules the head counts in `layout["attention"]`."""
    for key, shape in (layout.get("shapes") or {}).items():
        path, _, name = key.rpartition(".")
        old = getattr(model.get_submodule(path), name, None)
        like = old if isinstance(old, torch.Tensor) else next(model.parameters())
        set_parameter(model, key, torch.empty(shape, dtype=like.dtype, device=like.device),
                      like.requires_grad)
    for path, (heads, kv, head_dim) in (layout.get("attention") or {}).items():
        set_head_counts(model.get_submodule(path), heads, kv, head_dim)


def set_parameter(root: nn.Module, key: str, value: torch.Tensor,
                  requires_grad: bool = False) -> None:
    """Make `value` the parameter `key` of `root`, and the sizes its module keeps (a Linear's
    in/out features, GPT-2's Conv1D `nf`) those of its shape."""
    path, _, name = key.rpartition(".")
    mod = root.get_submodule(path) if path else root
    setattr(mod, name, nn.Parameter(value, requires_grad=requires_grad))
    if name == "weight" and isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = value.shape
    elif name == "weight" and hasattr(mod, "nf"):  # GPT-2's Conv1D: weight [in, out]
        mod.nf = value.shape[1]


def set_head_counts(attention: nn.Module, heads: int, kv: int, head_dim: int) -> None:
    """Give a Hugging Face attention module `heads` query and `kv` key/value heads, in
    whichever of the attributes its class reads (`split_size`: GPT-2's fused qkv)."""
    for attr, value in (("num_key_value_groups", heads // kv), ("num_heads", heads),
                        ("num_attention_heads", heads), ("num_key_value_heads", kv),
                        ("split_size", heads * head_dim)):
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, value)


_CLASSES: dict[type, tuple[type, type]] = {}


def flextron_classes(base: type) -> tuple[type, type]:
    """(Flextron<base>, Flextron<base config>): `base` and its config with per-layer sizes
    (`flextron_layout`), model type `flextron_<type>`, registered with the auto classes."""
    if base in _CLASSES:
        return _CLASSES[base]
    from transformers import AutoConfig, AutoModelForCausalLM

    base_config = base.config_class
    config_cls = _config_class(base_config)

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_layout(self, getattr(config, LAYOUT, None) or {})

    model_cls = type(f"Flextron{base.__name__}", (base,), {
        "config_class": config_cls, "__init__": __init__, "__module__": __name__,
        "__doc__": f"{base.__name__} with per-layer sizes (flextron_fx)."})
    _register(AutoConfig, config_cls.model_type, config_cls)
    try:
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    except ValueError:  # a lazy stand-in (`register`) was there first
        AutoModelForCausalLM._model_mapping._extra_content[config_cls] = model_cls
    _CLASSES[base] = model_cls, config_cls
    return model_cls, config_cls


_CONFIGS: dict[type, type] = {}


def _config_class(base_config: type) -> type:
    if base_config not in _CONFIGS:
        _CONFIGS[base_config] = type(
            f"Flextron{base_config.__name__}", (base_config,),
            {"model_type": PREFIX + base_config.model_type, "__module__": __name__})
    return _CONFIGS[base_config]


def _register(auto, model_type: str, config_cls: type) -> None:
    try:
        auto.register(model_type, config_cls, exist_ok=True)
    except ValueError:  # registered by another copy of this module: keep the first
        pass


def register() -> None:
    """Register the config classes of `FAMILIES` with `AutoConfig`, and a stand-in with
    `AutoModelForCausalLM` that builds `Flextron<Class>` when first used (importing every
    family's modelling code now would take seconds)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_name, model_name in FAMILIES.values():
        base_config = getattr(transformers, config_name, None)
        if base_config is None:
            continue
        config_cls = _config_class(base_config)
        _register(AutoConfig, config_cls.model_type, config_cls)
        stand_in = type(f"Flextron{model_name}", (), {
            "config_class": config_cls, "_base": model_name,
            "from_pretrained": classmethod(_stand_in_from_pretrained),
            "_from_config": classmethod(_stand_in_from_config),
            "from_config": classmethod(_stand_in_from_config)})
        try:
            AutoModelForCausalLM.register(config_cls, stand_in, exist_ok=True)
        except ValueError:
            pass


def _real(stand_in) -> type:
    import transformers

    return flextron_classes(getattr(transformers, stand_in._base))[0]


def _stand_in_from_pretrained(cls, *args, **kwargs):
    return _real(cls).from_pretrained(*args, **kwargs)


def _stand_in_from_config(cls, config, **kwargs):
    return _real(cls)._from_config(config, **kwargs)


def _register_quietly() -> None:
    try:
        register()
    except Exception as exc:  # noqa: BLE001 -- registering must never break an import
        log.warning("flextron_fx could not register its Hugging Face classes: %s", exc)


class _OnTransformersImport(importlib.abc.MetaPathFinder):
    """Runs `register` right after `transformers` is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_quietly()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register the auto classes now if `transformers` is imported, else when it is."""
    if "transformers" in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _OnTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnTransformersImport())
