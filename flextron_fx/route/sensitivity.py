"""What routing one token to a smaller candidate would cost, for every op, token and
candidate at once: the first-order change of the loss, from one forward and one backward
pass at full width.

In routed mode a token at candidate k of an op changes only that op's output at that
token: y_k(t) = region(x_t, k) plus the op's compensation row for k, where x_t is what the
op's `ElasticRegion` reads at full width (the MLP input; attention: every head's context,
of which the token keeps its own heads). So with g(t) the loss's gradient at the op's
output, g(t) . (y_k(t) - y(t)) is the first-order change of the whole sequence's loss when
only token t runs the op at k. A router that lowers the loss gives width where this is
large; the benchmark `token_shares.py` compares domains by it.
"""

from __future__ import annotations

import torch

from ..elastic.compensation import Compensation
from ..elastic.ops import ElasticRegion
from ..errors import WidthError
from ..passes.inject_routers import routers_of
from .train import token_losses


def _summed_next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return token_losses(logits, ids).sum()


def token_excess(em, ids: torch.Tensor,
                 loss_fn=_summed_next_token_loss) -> dict[str, torch.Tensor]:
    """{op: [batch, seq, K]}: the first-order change of `loss_fn(logits, ids)` (default:
    the summed next-token loss) if token (b, t) alone ran the op at candidate k, every
    other token and op at full width. The last column (full width) is 0.

    Ops without an `ElasticRegion` (blocks that could not be fused) are left out. The
    model runs at full width; its widths are restored afterwards.
    """
    if routers_of(em):
        raise WidthError("token_excess measures the elastic model without routers: call "
                         "remove_routers(em) first (routers replace the width nodes)")
    regions = {m.block: m for m in em.graph_module.modules() if isinstance(m, ElasticRegion)}
    comps = {m.block: m for m in em.graph_module.modules() if isinstance(m, Compensation)}
    names = [n for n in em.ops if n in regions]
    # a zero leaf added to every op's output makes it require grad (also for a frozen
    # backbone) without changing a value
    zero = torch.zeros((), dtype=torch.float32, requires_grad=True)
    seen: dict[str, dict] = {}

    def on_region(name):
        def hook(module, args, out):
            x, _, *params = args
            seen[name] = {"x": x.detach(), "params": [p.detach() for p in params]}
            return out if name in comps else _mark(name, out)
        return hook

    def on_comp(name):
        def hook(module, args, out):
            return _mark(name, out)
        return hook

    def _mark(name, out):
        out = out + zero.to(out.dtype)
        seen[name]["y"] = out
        return out

    handles = [regions[n].register_forward_hook(on_region(n)) for n in names]
    handles += [comps[n].register_forward_hook(on_comp(n)) for n in names if n in comps]
    try:
        with em.at(1.0), torch.inference_mode(False), torch.enable_grad():
            out = em(ids)
            loss = loss_fn(getattr(out, "logits", out), ids)
            grads = torch.autograd.grad(loss, [seen[n]["y"] for n in names])
    finally:
        for h in handles:
            h.remove()
    result = {}
    with torch.no_grad():
        for name, g in zip(names, grads):
            s, region = seen[name], regions[name]
            y, last = s["y"].detach(), len(region.candidates) - 1
            cols = []
            for k in range(last):
                yk = region.uniform(s["x"], k, last, s["params"])
                if name in comps:
                    yk = comps[name](yk, region.candidates[k])
                cols.append(((yk - y) * g).sum(-1))
            cols.append(torch.zeros(y.shape[:-1], dtype=g.dtype, device=g.device))
            # some blocks see tokens flattened ([batch * seq, d], e.g. GPT-2's Conv1D)
            result[name] = torch.stack(cols, -1).reshape(*ids.shape[:2], last + 1)
    return result
