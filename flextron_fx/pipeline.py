"""flextronize(): the whole conversion, one named stage per line."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .analyze import analyze
from .config import FlextronConfig
from .elastic.model import ElasticModel
from .errors import FlextronError, UnsupportedModelError
from .passes.compensate import compensate, compensated_kinds, compensation_tables
from .passes.elasticize import elasticize
from .passes.permute import permute, sort_order
from .passes.rank import measure, score_blocks
from .passes.scores import needs
from .trace import trace

log = logging.getLogger(__name__)


def flextronize(model: nn.Module, sample_inputs, calibration=None, *,
                config: FlextronConfig | None = None, progress: bool = True,
                resume: str | os.PathLike | None = None,
                dynamic_shapes=None) -> ElasticModel:
    """Turn a trained model into an elastic one with importance-sorted neurons and heads.

    `sample_inputs` is a tuple whose first tensor has the batch axis first, with batch >= 2:
    [batch, seq >= 2] token ids for language models, [batch, channels, height, width]
    pixels for vision models; `calibration` is a tensor of real inputs shaped the same
    except for the batch (the paper uses 512 sequences). Without calibration data the
    blocks keep their stored order.
    Which input dims may vary is inferred (the batch always; the sequence length of token
    ids and of [batch, seq, features] tensors; see `flextron_fx.trace.trace`); pass
    `dynamic_shapes` (torch.export's format, e.g. `({0: Dim("batch"), 1: Dim("seq")},)`) to
    choose them yourself. A model whose code fixes the sequence length is traced for the
    sample's length only, with a warning; other lengths then raise `InputShapeError`.
    With calibration data, every width below the full one of the blocks that
    `config.compensate` names (by default all) also adds back what the units it drops
    contributed: a bias and a rank-`config.compensation_rank` correction of the kept
    output-projection columns, fitted by least squares (`passes/compensate.py`).
    `resume` names a file for calibration progress, so an interrupted conversion picks
    up where it stopped. The user's model is not modified.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(),
        ...                         torch.nn.Linear(64, 8))
        >>> em = flextronize(m, (torch.randn(2, 4, 8),), torch.randn(16, 4, 8), progress=False)
        >>> em.set_widths(0.5); em(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """
    config = config or FlextronConfig()
    traced = trace(model, sample_inputs, dynamic_shapes=dynamic_shapes)
    gm = traced.graph_module
    check = _invariant_check(gm, traced.sample_inputs, config.debug)
    analysis = analyze(gm, traced.sample_inputs)
    check("analyze")
    blocks = analysis.blocks
    for s in analysis.skipped:
        log.warning("left dense: %s (%s)", s.reason, s.module_path or s.node)
    if not blocks:
        why = "; ".join(f"{s.module_path or s.node}: {s.reason}" for s in analysis.skipped[:3])
        raise UnsupportedModelError(
            f"found no MLP or attention block to make elastic in {type(model).__name__}"
            + (f" ({why})" if why else " (no linear layer feeds another through element-wise "
               "ops or an attention core)")
            + ". flextron_fx needs blocks of the form linear -> element-wise -> linear or "
            "q/k/v projections -> attention -> output projection.")
    orders, tables = {}, {}
    if calibration is not None and config.head_score == "fluctuation" \
            and config.compensate not in ("attention", "all"):
        log.warning("head_score='fluctuation' keeps the heads whose output varies most and "
                    "relies on compensation for the rest; without compensate='attention' "
                    "the cut models are far worse (docs/RESULTS.md, 'Zero-shot quality')")
    if calibration is not None:
        stats = measure(gm, analysis, blocks, calibration,
                        measures=needs(config.mlp_score, config.head_score)
                        | ({"gram"} if config.compensation_rank else set()),
                        batch_size=config.calibration_batch_size,
                        sample_inputs=traced.sample_inputs, progress=progress, resume=resume,
                        gram_kinds=compensated_kinds(config))
        scores = score_blocks(gm, blocks, stats, mlp_score=config.mlp_score,
                              head_score=config.head_score)
        orders = {b.name: sort_order(b, scores[b.name]) for b in blocks}
        check("rank")
        permute(gm, analysis, blocks, orders)
        check("permute")
        if config.compensate != "none":
            tables = compensation_tables(gm, analysis, blocks, stats, orders, config)
    elasticize(gm, analysis, blocks, config)
    check("elasticize")
    if tables:
        compensate(gm, blocks, tables)
        check("compensate")
    em = ElasticModel(gm, blocks, config, source=_source(model, traced.is_hf),
                      sample_shape=tuple(traced.sample_inputs[0].shape),
                      param_prefix=traced.param_prefix)
    em.skipped = analysis.skipped
    em.orders = {b.name: {_axis_name(b, c): idx.tolist()
                          for c, idx in orders.get(b.name, {}).items()} for b in blocks}
    return em


def _axis_name(block, cls: int) -> str:
    return next(k for k, v in block.classes.items() if v == cls)


def _invariant_check(gm, sample_inputs, enabled: bool):
    """With config.debug: lint and compare full-width outputs after each pass."""
    if not enabled:
        return lambda name: None
    with torch.no_grad():
        reference = gm(*sample_inputs)

    def check(name: str) -> None:
        try:
            gm.graph.lint()
        except Exception as exc:
            raise FlextronError(f"pass {name!r} left an invalid graph: {exc}") from exc
        with torch.no_grad():
            out = gm(*sample_inputs)
        err = (out - reference).abs().max().item()
        if not err <= 1e-4 * max(1.0, reference.abs().max().item()):
            raise FlextronError(f"pass {name!r} changed the full-width outputs "
                                f"(max abs difference {err:.3g})")
        log.info("pass %s: graph lints, outputs unchanged (max diff %.2g)", name, err)

    return check


def _source(model: nn.Module, is_hf: bool) -> dict:
    if is_hf:
        return {"kind": "hf", "class": type(model).__name__, "config": model.config.to_dict()}
    return {"kind": "module", "class": type(model).__name__}


__all__ = ["flextronize"]
