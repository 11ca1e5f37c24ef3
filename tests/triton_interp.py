"""Run flextron_fx.codegen.mlp_triton in Triton's interpreter, without leaking the setting.

Triton reads TRITON_INTERPRET when a kernel is decorated (module import) and again in some
lazy imports of the first launches, so the variable is set around the import, a warm-up
launch, and (`interpreter()`) each test that launches kernels, and restored after: other
tests never see it. Triton itself is imported first, outside that window, so its own
library functions stay compiled-mode ones for anything else in the process (inductor's GPU
kernels); our kernels call only builtins and their own helpers, so they do not mind.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager

import torch

_NAME = "flextron_fx.codegen.mlp_triton"


@contextmanager
def interpreter():
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def load():
    import triton.language  # noqa: F401  (outside the interpreter window, see above)

    with interpreter():
        module = sys.modules.get(_NAME) or importlib.import_module(_NAME)
        assert module.INTERPRETED, f"{_NAME} was imported before without TRITON_INTERPRET=1"
        x, w = torch.ones(1, 1), torch.ones(1, 1)
        module.elastic_mlp_triton(x, 1, w, w, w, w, w, w, "silu")
        module.routed_mlp_triton(x, torch.zeros(1, 1, dtype=torch.long), [1], w, w, w, w, w, w,
                                 "silu")
    return module
