import importlib.util

import pytest

from flextron_fx import models


def test_available_lists_smollm2():
    assert "smollm2-135m" in models.available()


def test_unknown_model_names_the_available_ones():
    with pytest.raises(ValueError, match="smollm2-135m") as e:
        models.load("gpt-17")
    assert "gpt-17" in str(e.value)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXTRON_CACHE", str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FLEXTRON_CACHE")
    assert models.cache_root().parts[-2:] == (".cache", "flextron_fx")


def test_missing_gguf_dependency_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"flextron_fx\[demo\]"):
        models.load("smollm2-135m", cache_dir=tmp_path)  # empty cache: must convert


@pytest.mark.slow
def test_smollm2_is_a_working_llama():
    from transformers import LlamaForCausalLM

    from flextron_fx.data import calibration_and_heldout
    from flextron_fx.eval import perplexity

    model, tok = models.load("smollm2-135m")
    assert isinstance(model, LlamaForCausalLM) and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.hidden_size) == (30, 9, 3, 1536, 576)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _, held, _ = calibration_and_heldout(tok, seq_len=256, n_calib=1, n_heldout_tokens=4 * 256)
    r = perplexity(model, held, batch_size=4)
    assert r["tokens"] == 4 * 255
    assert 5 < r["ppl"] < 40, r
