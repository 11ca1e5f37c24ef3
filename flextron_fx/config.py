"""Configuration of the flextronize pipeline: frozen, validated, JSON-serialisable data."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 1

HEAD_MODES = ("query", "group")
COMPENSATE = ("none", "mlp", "attention", "all")


@dataclass(frozen=True)
class FlextronConfig:
    """Everything `flextronize` needs besides the model and its sample inputs.

    Example:
        >>> cfg = FlextronConfig(num_candidates=3, mlp_multiple=32)
        >>> FlextronConfig.from_json(cfg.to_json()) == cfg
        True

    Attributes:
        num_candidates: nested widths per elastic op (the paper uses 4).
        mlp_multiple: MLP candidate widths are rounded to a multiple of this
            (hardware-friendly matmul shapes); capped at the layer width.
        head_mode: how attention heads shrink under grouped-query attention.
            "group" (default) drops whole KV groups together with their query heads, so
            the KV cache shrinks too; "query" keeps every KV group and drops query heads
            inside each group. Measured on SmolLM2 (docs/RESULTS.md), keeping 6 of 9
            heads after sorting costs far less perplexity in "group" mode.
        head_score: head importance, a score of `flextron_fx.passes.scores` for heads.
            "contribution" (default) is the L2 norm of each head's output after the
            output projection, summed over calibration tokens; "output_l1" is the
            paper's Eq. 3 (L1 norm of the head output); also "taylor", "fluctuation".
        mlp_score: MLP neuron importance, a score of `flextron_fx.passes.scores`:
            "activation" (default: Eq. 4 on the neuron's output, mean |h_j|),
            "fluctuation" (the variance of the neuron's output after the down
            projection, FLAP), "act_x_norm", "wanda", "taylor". Measured on SmolLM2
            with the default compensation and 512 Wikipedia calibration sequences
            (docs/RESULTS.md, "The default MLP score"): activation improves MLP 50 % on
            all eight domains against no compensation; fluctuation is 10-40 % better on
            prose like the calibration text but 2-14x worse on Korean and code.
        compensate: which blocks get per-width compensation (passes/compensate.py)
            when calibrating: each width below the full one adds back what the units it
            removes contributed; "all" (default), "mlp", "attention" or "none" (True
            means "all", False "none"). The full width is unchanged.
        compensation_rank: 128 (default): each width below the full one also corrects
            the kept columns of the output projection with a rank-r matrix, fitted by
            least squares on the calibration activations so that the cut block
            reproduces the full block's output (the bias is then the least-squares one);
            0 adds the mean output of the removed units only. Costs r * (out + kept)
            parameters per width below the full one (folded into the sliced weights by
            `materialize`), and an [in, in] float64 Gram matrix per block while
            calibrating (0.65 GB for SmolLM2-135M; a clear error before calibrating if
            they would not fit in memory). Ignored (stored as 0) when compensate is
            "none". Measured on SmolLM2 (docs/RESULTS.md, "Zero-shot quality") with
            Wikipedia calibration: MLP 50 % and heads 3/9 at about half the perplexity of
            no compensation on prose in English, German and Korean; heads 3/9 worse on
            HTML and Korean (calibrate on a mix, `flextron convert --calib-domains`, or
            pass compensate="mlp" for those).
        calibration_batch_size: sequences per forward pass while ranking.
        seed: the seed that chose the calibration data (recorded with the model); the
            passes themselves are deterministic: the same data gives the same permutation.
        debug: after every pass, lint the graph and check that the full-width model
            still computes the traced model's outputs on the sample inputs; a failure
            names the pass that broke the invariant.
    """

    num_candidates: int = 4
    mlp_multiple: int = 64
    head_mode: str = "group"
    head_score: str = "contribution"
    mlp_score: str = "activation"
    compensate: str = "all"
    compensation_rank: int = 128
    calibration_batch_size: int = 8
    seed: int = 0
    debug: bool = False
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        if not isinstance(self.num_candidates, int) or self.num_candidates < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {self.num_candidates!r}")
        if not isinstance(self.mlp_multiple, int) or self.mlp_multiple < 1:
            raise ValueError(f"mlp_multiple must be an int >= 1, got {self.mlp_multiple!r}")
        if self.head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {self.head_mode!r}")
        from .passes import scores  # the registry is the one list of score names

        for which, kind in (("head_score", "attention"), ("mlp_score", "mlp")):
            try:
                scores.check(getattr(self, which), kind)
            except ValueError as exc:
                raise ValueError(f"{which}: {exc}") from None
        if isinstance(self.compensate, bool):
            object.__setattr__(self, "compensate", "all" if self.compensate else "none")
        if self.compensate not in COMPENSATE:
            raise ValueError(f"compensate must be one of {COMPENSATE} (or True / False), got "
                             f"{self.compensate!r}")
        for name in ("calibration_batch_size", "seed", "compensation_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                # a ValueError, as for every other field of the config
                raise ValueError(  # noqa: TRY004
                    f"{name} must be an int, got {value!r} ({type(value).__name__}); "
                    f"pass e.g. {name}=8")
        if self.compensation_rank < 0:
            raise ValueError(f"compensation_rank must be >= 0, got {self.compensation_rank!r}")
        if self.compensate == "none":  # the rank corrects compensated blocks only
            object.__setattr__(self, "compensation_rank", 0)
        if self.calibration_batch_size < 1:
            raise ValueError("calibration_batch_size must be >= 1, "
                             f"got {self.calibration_batch_size!r}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is not supported by this "
                             f"flextron_fx (expects {CONFIG_VERSION}); re-run the conversion")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlextronConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FlextronConfig fields {sorted(unknown)}; "
                             f"allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> FlextronConfig:
        return cls.from_dict(json.loads(text))
