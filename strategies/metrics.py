"""Avalanche metrics that Avalanche lacks, usable with any strategy's ``EvaluationPlugin``."""

from __future__ import annotations

from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

from models.inject import count_parameters

__all__ = ["ParameterCountPluginMetric"]


class ParameterCountPluginMetric(PluginMetric[dict]):
    """Parameter counts of the strategy's model after every training experience: ``trainable``, ``frozen``,
    ``adapter`` (LoRA tensors) and ``total`` (see :func:`models.count_parameters`).

    Emits ``ParamCount_<kind>/train_phase/Exp<e>`` values, which reach every logger.
    """

    def __init__(self):
        super().__init__()
        self._last: dict[str, int] = {}

    def result(self) -> dict:
        return dict(self._last)

    def reset(self) -> None:
        self._last = {}

    def after_training_exp(self, strategy):
        self._last = count_parameters(strategy.model)
        e = strategy.experience.current_experience
        x = strategy.clock.train_iterations
        return [MetricValue(self, f"ParamCount_{k}/train_phase/Exp{e:03d}", v, x) for k, v in self._last.items()]

    def __str__(self):
        return "ParamCount"
