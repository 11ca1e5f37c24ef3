"""Codegen: kernels specialised for chosen widths and for per-token routed widths.

`mlp.py` holds the PyTorch references (no Triton import), `mlp_triton.py` the Triton
kernels and launchers, `ops.py` the `torch.library` custom ops the lowering pass
(`flextron_fx.passes.lower`) puts in the graph. Importing this package imports no Triton.
"""
