"""Elastic continued training (paper section 3.1, Eq. 5)."""

from .loop import TrainConfig, plot_run, read_metrics, train_elastic, validation_settings
from .sampling import make_sampler

__all__ = ["TrainConfig", "make_sampler", "plot_run", "read_metrics", "train_elastic",
           "validation_settings"]
