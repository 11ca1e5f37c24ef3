"""Quality measurements for dense and elastic models.

``perplexity`` (any ids -> logits function on token blocks), ``domain_loss`` (loss,
perplexity and bits per byte on a fetched text domain), ``score`` (continuation
log-likelihoods, the compute behind the lm-eval tasks in ``eval.tasks``) and ``evaluate``
(`flextron eval`: a model over budgets, domains and tasks). lm-eval is imported only when
tasks run.
"""

from flextron_fx.eval.harness import evaluate
from flextron_fx.eval.loss import domain_loss
from flextron_fx.eval.perplexity import perplexity
from flextron_fx.eval.scoring import score

__all__ = ["domain_loss", "evaluate", "perplexity", "score"]
