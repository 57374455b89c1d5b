"""Task-incremental model: a shared backbone and one head per task (Avalanche ``MultiHeadClassifier``)."""

from __future__ import annotations

import torch
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch import nn

from .inject import find_head

__all__ = ["TaskIncrementalClassifier"]


class TaskIncrementalClassifier(MultiTaskModule):
    """``backbone`` (its classifier head replaced by ``nn.Identity``) feeding a ``MultiHeadClassifier``.

    Avalanche passes the task labels (``avalanche_forward``); the features are computed once per batch and each
    sample is routed to its task's head. A new task's head is created by Avalanche's model adaptation.

    :param backbone: a classifier whose head (:func:`~models.inject.find_head`) gives the feature size.
    :param initial_out_features: classes per task.
    """

    def __init__(self, backbone: nn.Module, initial_out_features: int):
        super().__init__()
        found = find_head(backbone)
        if found is None:
            raise ValueError(f"{type(backbone).__name__} has no nn.Linear head to replace with per-task heads.")
        name, head = found
        parent_name, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, nn.Identity())
        self.backbone = backbone
        self.head = MultiHeadClassifier(head.in_features, initial_out_features=initial_out_features)

    def forward(self, x, task_labels):
        if not self.training and self.known_train_tasks_labels:
            asked = {int(task_labels)} if isinstance(task_labels, int) else set(torch.unique(task_labels).tolist())
            unknown = sorted(asked - self.known_train_tasks_labels)
            if unknown:  # MultiHeadClassifier would silently answer with an untrained head
                raise ValueError(
                    f"Task label(s) {unknown} were never trained (trained: {sorted(self.known_train_tasks_labels)}); "
                    "a task-incremental model has no head for them. Evaluate only trained tasks."
                )
        return self.head(self.backbone(x), task_labels)

    def forward_single_task(self, x, task_label):
        return self.head(self.backbone(x), task_label)
