"""Every script in examples/ runs, start to finish, as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# huggingface_model.py saves runs/example-elastic, which the others read
AFTER = {"export_onnx.py": "max difference to PyTorch",
         "export_hf_generate.py": "generated [",
         "pick_for_budget.py": "params=0.01 refused",
         "routers.py": "dynamic routers at T=0.7",
         "train_on_your_text.py": "6 steps; held-out loss per sub-network"}


def _run(script: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == \
        {"custom_transformer.py", "huggingface_model.py", *AFTER}


def test_custom_transformer(tmp_path):
    assert "ok: the sorted full model equals the original" in \
        _run("custom_transformer.py", tmp_path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("examples")
    out = _run("huggingface_model.py", cwd)
    assert "MLP width 50%" in out and (cwd / "runs" / "example-elastic").is_dir()
    return cwd


@pytest.mark.parametrize("script", sorted(AFTER))
def test_examples_on_the_saved_model(workdir, script):
    assert AFTER[script] in _run(script, workdir)
