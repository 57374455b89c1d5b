"""Growing network: a full copy of the backbone's last stage per task, the early stages shared and frozen.

The growing baseline that per-task adapters are compared against: the effects-of-LoRA study
(evertonaleixo/effects-of-lora-on-catastrophic-forgetting) sets per-task ConvLoRA (85 % at +45 % parameters) against
SeNA-CNN (Zacarias and Alexandre, "SeNA-CNN: Overcoming Catastrophic Forgetting in Convolutional Neural Networks by
Selective Network Augmentation", ANNPR 2018, arXiv:1802.08250; 84 % at +82 %), which adds to a shared trunk one branch
of the last layers per task. Here the branch is a trained copy of the last stage (the blocks from the last downsampling
on), started from the pretrained weights for every task.

No official code is followed (neither SeNA-CNN's nor the study's growing network is in the study's repository).
Deviations from SeNA-CNN, kept: the branch is a full copy of the pretrained last stage rather than new layers of its
own shape (so it is defined for any backbone, and the comparison with per-task adapters on the same layers is
direct); the recipe is the fine-tuning baseline's (SGD 0.01, momentum 0.9), its learning rate chosen like every row's.
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from models.heads import TaskIncrementalClassifier
from models.inject import Target, _set_submodule, count_parameters, find_head, matches
from models.task_lora import TaskCopy, set_task_routing

from .base import MethodStrategy, PluginStateMixin, unwrap
from .batchnorm import batchnorm_layers
from .linear_probe import freeze_backbone
from .recipe import TrainingRecipe

__all__ = ["GrowingPlugin", "Growing", "last_stage"]

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def _blocks(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The model's blocks in registration order: its children, with ``Sequential`` / ``ModuleList`` opened."""
    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        out += _blocks(child, full + ".") if isinstance(child, _CONTAINERS) else [(full, child)]
    return out


def _downsamples(module: nn.Module) -> bool:
    for m in module.modules():
        stride = getattr(m, "stride", 1)
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and max(
                (stride,) if isinstance(stride, int) else tuple(stride)) > 1:
            return True
    return False


def last_stage(model: nn.Module, *, skip_head: bool = True) -> list[str]:
    """``grow_modules="auto"``: the names of the blocks of the last stage, from the last block that downsamples (a
    conv or pooling of stride > 1; after it when it is a parameter-free pooling) to the end, parameter-free blocks
    and, with ``skip_head``, the classifier head (:func:`~models.inject.find_head`) left out; e.g. ``layer3.0`` …
    ``layer3.4`` of a CIFAR ResNet-32, ``features.14`` … ``features.18.1`` of torchvision's MobileNetV2. Blocks are
    the model's children in registration order, ``Sequential`` / ``ModuleList`` containers opened.

    :param skip_head: leave the head out; ``False`` for a backbone whose head is already gone (the backbone of a
        :class:`~models.heads.TaskIncrementalClassifier`, where the last Linear left is a hidden layer).
    :raises ValueError: when nothing downsamples after the first block (e.g. a ViT, whose patch embedding is its
        only stride): name the modules instead."""
    head = find_head(model) if skip_head else None
    head_name = head[0] if head is not None else None
    blocks = [(n, m) for n, m in _blocks(model) if n != head_name]
    has_params = [any(True for _ in m.parameters()) for _, m in blocks]
    down = [i for i, (_, m) in enumerate(blocks) if _downsamples(m)]
    start = None if not down else (down[-1] if has_params[down[-1]] else down[-1] + 1)
    stage = [] if start is None else [n for (n, _), p in zip(blocks[start:], has_params[start:]) if p]
    first = next((i for i, p in enumerate(has_params) if p), None)
    if not stage or start <= first:
        raise ValueError(f"grow_modules='auto' finds no last stage in {type(model).__name__}: no strided conv or "
                         "pooling after its first block; name the modules to copy per task with grow_modules.")
    return stage


def _check_model(model: nn.Module) -> None:
    if not isinstance(unwrap(model), TaskIncrementalClassifier):
        raise ValueError("The growing network is task-incremental (one copy and head per task, chosen by the task "
                         f"label): it needs a TaskIncrementalClassifier, not {type(unwrap(model)).__name__}; use "
                         "--task-incremental.")


class GrowingPlugin(PluginStateMixin, SupervisedPlugin, supports_distributed=True):
    """Per-task copies of the named modules (default: the last stage), everything else frozen and shared.

    Each targeted module is wrapped in a :class:`~models.task_lora.TaskCopy`: the wrapped module trains for the
    current task, starting again from the pretrained weights at every new task, and a frozen copy of it is stored
    per task at the end of the task. Samples are routed to their task's copy by their task label, in training and
    evaluation, and each task has its own head; the trunk's BatchNorm layers stay in eval mode (their statistics
    are shared by every task), so earlier tasks' outputs stay bit-identical: zero forgetting, paid for by one copy
    of the stage per task. Task-incremental only: the model must be a
    :class:`~models.heads.TaskIncrementalClassifier` (``experiments.run --task-incremental``). Replay is refused:
    replayed samples would train the frozen tasks' heads.

    :param grow_modules: module names (a list: exact names or ``.suffix``; a string: a regular expression over the
        whole dotted name) whose copies grow, or ``"auto"``, the backbone's last stage (:func:`last_stage`).
    """

    _state_attrs = ("grown_modules", "trained_tasks", "current_task")

    def __init__(self, *, grow_modules: Optional[Target] = "auto"):
        super().__init__()
        if grow_modules is None:
            raise ValueError("GrowingPlugin: grow_modules=None copies nothing; give module names or 'auto'.")
        self.grow_modules = grow_modules
        self.grown_modules: list[str] = []
        self.trained_tasks: list[int] = []
        self.current_task: int | None = None

    # -- set-up ---------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Wrap the targeted modules in per-task copies and freeze the rest but the heads (unless done)."""
        model = unwrap(model)
        _check_model(model)
        found = [n for n, m in model.named_modules() if type(m) is TaskCopy]
        if found:
            self.grown_modules = found
            return
        if self.grow_modules == "auto":  # the backbone's head is already an Identity
            names = ["backbone." + n for n in last_stage(model.backbone, skip_head=False)]
        else:
            names = [n for n, m in model.named_modules() if n and matches(n, m, self.grow_modules)]
            # a matched module inside another matched one would be copied twice: keep the outer one
            names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
            if not names:
                raise ValueError(f"grow_modules={self.grow_modules!r} matches no module of {type(model).__name__}; "
                                 "give its module names (e.g. backbone.layer3.4) or 'auto' (the last stage).")
        freeze_backbone(model)
        for n in names:
            module = model.get_submodule(n)
            module.requires_grad_(True)
            _set_submodule(model, n, TaskCopy(module))
        self.grown_modules = names

    def before_training(self, strategy, **kwargs):
        from avalanche.training.plugins import ReplayPlugin

        if any(isinstance(p, ReplayPlugin) for p in strategy.plugins):
            raise ValueError("The growing network keeps each task's copy and head apart: replayed samples would train "
                             "earlier tasks' heads; drop the replay (--replay).")
        self.prepare(strategy.model)

    def _copies(self, model) -> list[TaskCopy]:
        return [m for m in unwrap(model).modules() if type(m) is TaskCopy]

    def _freeze_trunk_batchnorm(self, model) -> None:
        """Every BatchNorm outside the trained copies in eval mode: the trunk is shared by every task."""
        live = {id(m) for c in self._copies(model) for m in c.live.modules()}
        for m in batchnorm_layers(unwrap(model)):
            if id(m) not in live and m.training:
                m.eval()

    # -- training -------------------------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        labels = strategy.experience.task_labels
        if len(labels) != 1:
            raise ValueError(f"The growing network trains one task per experience; this one has task labels {labels}.")
        t = int(labels[0])
        if t in self.trained_tasks:
            raise ValueError(f"Task {t} was already trained; the growing network does not revisit a task's copy.")
        for copy in self._copies(strategy.model):
            if self.trained_tasks:
                copy.reset()  # every task's copy starts from the pretrained stage
            for p in copy.live.parameters():
                strategy.optimizer.state.pop(p, None)
            copy.current_task = t
        self.current_task = t

    def before_training_iteration(self, strategy, **kwargs):  # Avalanche calls model.train() around evaluations
        self._freeze_trunk_batchnorm(strategy.model)

    def before_forward(self, strategy, **kwargs):
        set_task_routing(strategy.model, strategy.mb_task_id)

    def before_eval_forward(self, strategy, **kwargs):
        set_task_routing(strategy.model, strategy.mb_task_id)

    def after_training_exp(self, strategy, **kwargs):
        for copy in self._copies(strategy.model):
            copy.store(self.current_task)
        self.trained_tasks.append(self.current_task)

    # -- accounting -----------------------------------------------------------------------------------------
    def parameter_report(self, model: nn.Module) -> dict:
        """``stored``: the shared trunk, every task's copy of the stage (the pretrained one too: it serves the
        pretraining task) and the heads; ``inference``: the trunk, one task's copy and the heads."""
        copies = self._copies(model)
        total = count_parameters(unwrap(model))["total"]
        # the trained copy duplicates the last task's stored one (before any task: the pretrained one)
        live = sum(p.numel() for c in copies for p in c.live.parameters())
        one = sum(p.numel() for c in copies for p in c.pretrained.parameters())
        stored = total - live
        if not self.trained_tasks:
            return dict(stored=stored, inference=stored)
        per_task = {t: one for t in self.trained_tasks}
        return dict(stored=stored, inference=stored - one * len(self.trained_tasks), per_task=per_task)


class Growing(MethodStrategy):
    """Avalanche strategy: ``SupervisedTemplate`` plus :class:`GrowingPlugin` (a copy of the last stage per task).

    Recipe: the fine-tuning baseline's (SGD 0.01, momentum 0.9): a copy of the stage is fine-tuned as a whole.

    :param model: a :class:`~models.heads.TaskIncrementalClassifier` (a backbone and one head per task).
    :param optimizer: ``None`` builds the recipe's; else an optimizer over ``model.parameters()``.
    The rest are those of ``SupervisedTemplate``.
    """

    name = "growing"
    recipe = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9, source="the fine-tuning recipe")
    plugin_class = GrowingPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        grow_modules: Optional[Target] = "auto",
        **base_kwargs,
    ):
        _check_model(model)
        super().__init__(method_plugin=GrowingPlugin(grow_modules=grow_modules), model=model, optimizer=optimizer,
                         **base_kwargs)
