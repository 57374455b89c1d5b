"""Joint training: every experience's data at once, the upper bound of the comparison tables."""

from __future__ import annotations

from avalanche.benchmarks.utils import concat_datasets
from avalanche.training.supervised.joint_training import JointTraining
from torch import nn

from .base import MethodStrategy
from .recipe import TrainingRecipe

__all__ = ["Joint"]


class Joint(MethodStrategy):
    """Avalanche's ``JointTraining`` (offline training on the concatenation of all experiences, one call to
    ``train`` with the whole stream) inside our template (fresh optimizer, schedule, DDP). Not a continual learner:
    the upper bound that "last ÷ joint" is measured against. ``experiments.run`` trains it once on the whole train
    stream, for the same number of epochs as the other rows (so it sees each image as often as they do).
    Default recipe: the fine-tuning baseline's (SGD 0.01, momentum 0.9)."""

    name = "joint"
    trains_jointly = True
    recipe = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9, source="Avalanche JointTraining; the fine-tuning recipe")
    plugin_class = None

    def __init__(self, *, model: nn.Module, **base_kwargs):
        super().__init__(method_plugin=None, model=model, **base_kwargs)
        self._is_fitted = False
        self._experiences: list = []

    train = JointTraining.train

    def train_dataset_adaptation(self, **kwargs):
        """All experiences' training data concatenated."""
        self.adapted_dataset = concat_datasets([e.dataset for e in self._experiences]).train()

    def model_adaptation(self, model=None):
        """Heads (and any dynamic module) adapted to every experience, not only the first."""
        current = self.experience
        try:
            for self.experience in self._experiences:
                model = super().model_adaptation(model)
        finally:
            self.experience = current
        return model
