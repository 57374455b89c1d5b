"""Nearest class mean on frozen features: a baseline with no gradient step at all."""

from __future__ import annotations

from typing import Literal

import torch
from avalanche.models.utils import avalanche_forward
from torch import nn

from models import TaskIncrementalClassifier, find_head

from .base import MethodStrategy, experience_loader, unwrap
from .linear_probe import freeze_backbone
from .recipe import TrainingRecipe

__all__ = ["NearestClassMean"]


class NearestClassMean(MethodStrategy):
    """Frozen backbone + nearest-class-mean classifier (Mensink et al., TPAMI 2013; the NCM of iCaRL, Rebuffi et
    al., CVPR 2017): each experience is one pass over its training data that stores the mean feature of each of its
    classes; a test sample gets the class of the nearest mean.

    The means are written into the model's own linear head, which makes the rule exact and keeps every metric and
    the task-incremental heads working: ``argmin_c ||f − μ_c||² = argmax_c (μ_c·f − ||μ_c||²/2)`` (``euclidean``:
    row ``μ_c``, bias ``−||μ_c||²/2``) and ``argmax_c cos(f, μ_c) = argmax_c (μ_c/||μ_c||)·f`` (``cosine``). Classes
    not seen yet get bias −1e9, so they are never predicted. Nothing is optimised: the optimizer and the epochs are
    unused (one pass per experience).

    :param metric: ``euclidean`` (NCM) or ``cosine`` (nearest mean by cosine similarity).
    """

    name = "ncm"
    recipe = TrainingRecipe(optimizer="sgd", lr=0.01, source="no training (class means only)")
    plugin_class = None

    def __init__(self, *, model: nn.Module, metric: Literal["euclidean", "cosine"] = "euclidean", **base_kwargs):
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}.")
        self.metric = metric
        self._initialised: set = set()
        super().__init__(method_plugin=None, model=freeze_backbone(model), **base_kwargs)
        unwrap(self.model).requires_grad_(False)

    def _head_of(self, task: int) -> nn.Linear:
        model = unwrap(self.model)
        if isinstance(model, TaskIncrementalClassifier):
            return model.head.classifiers[str(task)].classifier
        return find_head(model)[1]

    def _train_exp(self, experience, eval_streams=None, **kwargs):
        """One pass over the experience's data (no augmentation: its eval transform) accumulating the features of
        each class, then the head rows of its classes set from their means."""
        model = unwrap(self.model)
        model.requires_grad_(False)
        model.eval()
        task = int(experience.task_labels[0]) if isinstance(model, TaskIncrementalClassifier) else 0
        head = self._head_of(task)
        feats: list = []
        hook = head.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach()))
        sums, counts = {}, {}
        try:
            with torch.no_grad():
                for batch in experience_loader(self):
                    x, y = batch[0].to(self.device), batch[1].to(self.device)
                    feats.clear()
                    avalanche_forward(model, x, batch[-1].to(self.device))
                    f = feats[0].flatten(1).double()
                    for c in y.unique().tolist():
                        sel = f[y == c]
                        sums[c] = sums.get(c, 0) + sel.sum(0)
                        counts[c] = counts.get(c, 0) + len(sel)
        finally:
            hook.remove()
        if id(head) not in self._initialised:  # a fresh head: no class may win before its mean is known
            head.weight.data.zero_()
            head.bias.data.fill_(-1e9)
            self._initialised.add(id(head))
        for c, s in sums.items():
            mu = s / counts[c]
            if self.metric == "cosine":
                head.weight.data[c] = (mu / mu.norm().clamp_min(1e-12)).to(head.weight.dtype)
                head.bias.data[c] = 0.0
            else:
                head.weight.data[c] = mu.to(head.weight.dtype)
                head.bias.data[c] = float(-0.5 * mu.pow(2).sum())
