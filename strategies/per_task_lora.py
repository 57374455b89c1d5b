"""Per-task LoRA / ConvLoRA: an independent adapter set per task, earlier tasks' adapters frozen.

The setting of the effects-of-LoRA study (evertonaleixo/effects-of-lora-on-catastrophic-forgetting: task-incremental
Split CIFAR-100 with a VGG19-BN, one ConvLoRA/LoRA per task, per-task BatchNorm copies) and of ConvLoRA (Aleem et al.,
"ConvLoRA and AdaBN based Domain Adaptation via Self-Training", ISBI 2024, arXiv:2402.04964).
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule, avalanche_forward
from torch import nn

from models.inject import Target, _set_submodule, count_parameters
from models.task_lora import TaskBatchNorm, TaskLoRAConv2d, TaskLoRALinear, TaskLoRAMixin, set_task_routing

from .base import AdapterPluginMixin, MethodStrategy, unwrap
from .recipe import TrainingRecipe

__all__ = ["PerTaskLoRAPlugin", "PerTaskLoRA"]


class PerTaskLoRAPlugin(AdapterPluginMixin, SupervisedPlugin, supports_distributed=True):
    """One LoRA adapter per task on every targeted Linear/Conv2d (both conv shapes); earlier adapters frozen.

    Task-incremental (default): the adapter is chosen by each sample's task label, in training and evaluation, and
    with a per-task head (:class:`~models.heads.TaskIncrementalClassifier`) earlier tasks' outputs stay bit-identical
    after later tasks train: zero forgetting by construction, paid for in parameters. A task label that was never
    trained is refused with a clear error.

    Class-incremental (``class_incremental=True``, no task label at test time): adapters are keyed by experience, and
    each test sample is given the adapter under which the head is most confident in one of that task's classes (max
    softmax probability over the whole head, taken on the task's classes), the other classes' logits being masked.
    This costs one forward pass per trained task.

    :param target_modules, r, alpha, dropout, conv_mode, exclude_modules, rslora, trainable_modules: see
        :func:`models.add_lora`.
    :param per_task_bn: keep a copy of every BatchNorm layer per task (as the effects-of-LoRA study does); the
        current copy trains with the adapter.
    :param class_incremental: key adapters by experience and infer the task at evaluation (see above); ``None``
        decides from the model: class-incremental unless it is a ``MultiTaskModule`` (per-task heads).
    """

    _state_attrs = ("adapted_modules", "trained_tasks", "task_classes", "current_task", "class_incremental")
    _layer_type, _layer_desc = TaskLoRAMixin, "per-task LoRA"

    def __init__(
        self,
        *,
        target_modules: Optional[Target] = "auto",
        r: int = 8,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        rslora: bool = False,
        trainable_modules="auto",
        per_task_bn: bool = False,
        class_incremental: Optional[bool] = None,
    ):
        super().__init__()
        self.lora_kwargs = dict(
            target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
            exclude_modules=exclude_modules, rslora=rslora, trainable_modules=trainable_modules,
            linear_cls=TaskLoRALinear, conv_cls=TaskLoRAConv2d,
        )
        self.per_task_bn = per_task_bn
        self.class_incremental = class_incremental
        self.adapted_modules: list[str] = []
        self.trained_tasks: list[int] = []
        self.task_classes: dict[int, list[int]] = {}
        self.current_task: int | None = None

    # -- set-up ---------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Inject the per-task layers (and BN copies) unless the model has them; called in ``before_training``."""
        if self.class_incremental is None:
            self.class_incremental = not isinstance(unwrap(model), MultiTaskModule)
        had = any(isinstance(m, TaskLoRAMixin) for m in model.modules())
        super().prepare(model)
        if had or not self.per_task_bn:
            return
        bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            raise ValueError("per_task_bn=True but the model has no BatchNorm layer.")
        for name, bn in bns:
            _set_submodule(model, name, TaskBatchNorm(bn))
            for p in bn.parameters():
                p.requires_grad_(True)

    def _task_id(self, experience) -> int:
        if self.class_incremental:
            return int(experience.current_experience)
        labels = experience.task_labels
        if len(labels) != 1:
            raise ValueError(f"PerTaskLoRAPlugin trains one task per experience; this one has task labels {labels}.")
        return int(labels[0])

    def _lora_layers(self, model):
        return [m for m in model.modules() if isinstance(m, TaskLoRAMixin)]

    def _bn_layers(self, model):
        return [m for m in model.modules() if isinstance(m, TaskBatchNorm)]

    # -- training -------------------------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        t = self._task_id(strategy.experience)
        if t in self.trained_tasks:
            raise ValueError(f"Task {t} was already trained; per-task LoRA does not revisit a task's adapter.")
        layers = self._lora_layers(strategy.model)
        if self.trained_tasks:  # a fresh adapter for the new task (task 0 has the one add_lora made)
            for layer in layers:
                layer.reset_lora_parameters()
        for layer in layers:
            strategy.optimizer.state.pop(layer.lora_A, None)
            strategy.optimizer.state.pop(layer.lora_B, None)
        for m in layers + self._bn_layers(strategy.model):
            m.current_task = t
        self.current_task = t
        self.task_classes[t] = sorted(int(c) for c in strategy.experience.classes_in_this_experience)

    def before_forward(self, strategy, **kwargs):
        if self.class_incremental:
            set_task_routing(strategy.model, self.current_task)
        else:  # each sample by its own task label: replayed samples of earlier tasks go to their frozen adapters
            set_task_routing(strategy.model, strategy.mb_task_id)

    def after_training_exp(self, strategy, **kwargs):
        t = self.current_task
        for layer in self._lora_layers(strategy.model):
            layer.store_adapter(t)
        for bn in self._bn_layers(strategy.model):
            bn.store(t)
        self.trained_tasks.append(t)

    # -- evaluation -----------------------------------------------------------------------------------------
    def _known_tasks(self) -> list[int]:
        extra = [self.current_task] if self.current_task is not None and self.current_task not in self.trained_tasks else []
        return self.trained_tasks + extra

    def before_eval_forward(self, strategy, **kwargs):
        if not self.class_incremental:
            set_task_routing(strategy.model, strategy.mb_task_id)
        elif self._known_tasks():
            set_task_routing(strategy.model, self._known_tasks()[0])
        # before any training the layers are their base layers (e.g. a forward-transfer baseline)

    def after_eval_forward(self, strategy, **kwargs):
        if self.class_incremental and self._known_tasks():
            # task labels only for a multi-task model (a class-incremental benchmark may have none)
            labels = strategy.mb_task_id if isinstance(unwrap(strategy.model), MultiTaskModule) else None
            strategy.mb_output = self.infer(strategy.model, strategy.mb_x, labels)

    @torch.no_grad()
    def infer(self, model: nn.Module, x: torch.Tensor, task_labels=None) -> torch.Tensor:
        """Class-incremental output: per sample, the logits under the task adapter that is most confident in one of
        its own classes, other tasks' classes masked below them."""
        best_score, out = None, None
        for t in self._known_tasks():
            set_task_routing(model, t)
            logits = avalanche_forward(model, x, task_labels)
            cls = torch.tensor(self.task_classes[t], device=logits.device)
            sub = logits.index_select(1, cls)
            # confidence over the whole head (not only the task's classes, where two classes always share 1)
            score = logits.softmax(1).index_select(1, cls).amax(1)
            # other tasks' classes sit below every kept logit (finite, so the eval loss stays finite)
            masked = (sub.amin(1, keepdim=True) - 1e3).expand_as(logits).clone()
            masked[:, cls] = sub
            if out is None:
                best_score, out = score, masked
            else:
                better = score > best_score
                best_score = torch.where(better, score, best_score)
                out[better] = masked[better]
        return out

    # -- accounting -----------------------------------------------------------------------------------------
    def parameter_report(self, model: nn.Module) -> dict:
        """``stored``: all that serves every trained task (backbone, every task's adapter and BN copy, heads);
        ``inference``: what one sample's forward pass uses (backbone, one task's adapter and BN copy, heads)."""
        total = count_parameters(model)["total"]
        layers, bns = self._lora_layers(model), self._bn_layers(model)
        current = sum(m.lora_A.numel() + m.lora_B.numel() for m in layers)
        current_bn = sum(p.numel() for b in bns for p in b.bn.parameters())
        per_task = {t: 0 for t in self.trained_tasks}
        for m in layers:
            for k in m.bank_A:
                per_task[int(k)] += m.bank_A[k].numel() + m.bank_B[k].numel()
        for b in bns:
            for k, snap in b.bank.items():
                per_task[int(k)] += sum(p.numel() for p in snap.parameters())
        if not self.trained_tasks:
            return dict(stored=total, inference=total)
        stored = total - current - current_bn
        # a task's sample goes through its own BN copy, never the pretrained one (kept for the pretraining task)
        pretrained_bn = sum(p.numel() for b in bns for p in b.pretrained.parameters())
        inference = stored - pretrained_bn - sum(per_task.values()) + max(per_task.values())
        return dict(stored=stored, inference=inference, per_task=per_task)


class PerTaskLoRA(MethodStrategy):
    """Avalanche strategy: ``SupervisedTemplate`` plus :class:`PerTaskLoRAPlugin` (one LoRA/ConvLoRA per task).

    Recipe: SGD, lr 0.01, momentum 0.9, constant (our choice). The effects-of-LoRA study trains with Adam lr 1e-5,
    weight decay 5e-4, up to 300 epochs with ReduceLROnPlateau and early stopping on the *test* accuracy, and a
    softmax applied twice (its ``LoraVGG19``): a recipe that cannot be followed without its flaws; ConvLoRA (Aleem
    et al.) uses Adam 1e-4 for domain adaptation.

    :param model: for task-incremental learning a :class:`~avalanche.models.MultiTaskModule` with one head per task
        (e.g. :class:`~models.heads.TaskIncrementalClassifier`).
    :param optimizer: ``None`` builds the recipe's; else an optimizer over ``model.parameters()``.
    The LoRA options are those of :class:`PerTaskLoRAPlugin`; the rest those of ``SupervisedTemplate``.
    """

    name = "per_task_lora"
    recipe = TrainingRecipe(optimizer="sgd", lr=0.01, momentum=0.9, source="this project (see the docstring)")
    plugin_class = PerTaskLoRAPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        target_modules: Optional[Target] = "auto",
        r: int = 8,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        rslora: bool = False,
        trainable_modules="auto",
        per_task_bn: bool = False,
        class_incremental: Optional[bool] = None,
        **base_kwargs,
    ):
        super().__init__(
            method_plugin=PerTaskLoRAPlugin(
                target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                exclude_modules=exclude_modules, rslora=rslora, trainable_modules=trainable_modules,
                per_task_bn=per_task_bn, class_incremental=class_incremental,
            ),
            model=model,
            optimizer=optimizer,
            **base_kwargs,
        )
