"""The shared shape of our strategies: a ``SupervisedTemplate`` that stays correct under torchrun DDP, with the
method's plugin first."""

from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence

import torch
from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader, collate_from_data_or_kwargs
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper
from avalanche.models import MultiTaskModule
from avalanche.models.dynamic_optimizers import update_optimizer
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader

from models.inject import add_lora
from models.lora import LoRALayer

from .recipe import FreshOptimizerPlugin, TrainingRecipe, build_optimizer

__all__ = ["AdapterPluginMixin", "DistributedTemplate", "MethodStrategy", "PluginStateMixin", "unwrap", "mask_logits",
           "mask_logits_per_sample", "MaskedCriterion", "ClassMaskMixin", "experience_loader", "all_reduce_",
           "find_method_plugin"]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return DistributedHelper.unwrap_model(model)


def mask_logits(logits: torch.Tensor, classes) -> torch.Tensor:
    """``logits`` with every column outside ``classes`` set below the smallest kept logit of its row (finite, so a
    loss stays finite; no gradient reaches the masked columns)."""
    cls = torch.as_tensor(sorted(classes), device=logits.device, dtype=torch.long)
    kept = logits.index_select(1, cls)
    out = (kept.detach().amin(1, keepdim=True) - 1e3).expand_as(logits).clone()
    out[:, cls] = kept
    return out


def mask_logits_per_sample(logits: torch.Tensor, targets: torch.Tensor, current, seen) -> torch.Tensor:
    """Each sample scored over the classes of its own experience: a sample of one of the ``current`` classes over
    those classes, any other sample (replayed data) over every ``seen`` class. The other columns are set below the
    smallest kept logit of the row (finite, detached: no gradient reaches them)."""
    C = logits.shape[1]
    cur = torch.zeros(C, dtype=torch.bool, device=logits.device)
    cur[torch.as_tensor(sorted(current), dtype=torch.long, device=logits.device)] = True
    seen_mask = cur.clone()
    if len(seen):
        seen_mask[torch.as_tensor(sorted(seen), dtype=torch.long, device=logits.device)] = True
    keep = torch.where(cur[targets.long()].unsqueeze(1), cur.unsqueeze(0), seen_mask.unsqueeze(0))
    low = logits.detach().masked_fill(~keep, float("inf")).amin(1, keepdim=True) - 1e3
    return torch.where(keep, logits, low)


class MaskedCriterion(nn.Module):
    """The strategy's criterion applied to per-sample masked logits (:func:`mask_logits_per_sample`) while it
    trains; unchanged in evaluation. ``strategy.mb_output`` stays the model's raw output, so other plugins (LwF's
    distillation, metrics) see the true logits of every class."""

    def __init__(self, base, plugin, strategy):
        super().__init__()
        self.base, self.plugin, self.strategy = base, plugin, strategy

    def forward(self, logits, targets):
        if self.strategy.is_training and self.plugin.masked_loss and self.plugin._current_classes:
            logits = mask_logits_per_sample(logits, targets, self.plugin._current_classes, self.plugin.seen_classes)
        return self.base(logits, targets)


def find_method_plugin(strategy, attr: str):
    """The plugin of ``strategy`` that answers ``attr`` (e.g. ``parameter_report``, ``last_tii``): the method plugin
    of our strategies, or the first such plugin in ``strategy.plugins`` (a method plugin inside Avalanche's own
    ``Naive``, ``Replay``, ``LwF``...). ``None`` if there is none."""
    plugin = getattr(strategy, "method_plugin", None)
    if plugin is not None and hasattr(plugin, attr):
        return plugin
    return next((p for p in getattr(strategy, "plugins", []) if hasattr(p, attr)), None)


class ClassMaskMixin:
    """Class-incremental logit masking shared by the methods whose code trains one head over all classes:

    * training (``masked_loss``): the strategy's criterion becomes a :class:`MaskedCriterion`, so each sample is
      scored over the classes of its own experience: the current experience's data over its classes (InfLoRA,
      SD-LoRA, HiDe and CoDyRA train per-task heads, or mask the other classes, this way), replayed data of earlier
      experiences over every seen class; the model's output itself is not changed, so LwF's distillation sees every
      class's logit;
    * evaluation: classes of no trained experience are masked (their head rows never trained; the papers' heads
      grow with the classes, Avalanche's ``IncrementalClassifier`` masks them the same way).

    Task-incremental models (``MultiTaskModule`` heads) are left alone: their heads already hold one task's classes.
    """

    masked_loss: bool
    seen_classes: list

    def _maskable(self, strategy) -> bool:
        return not isinstance(unwrap(strategy.model), MultiTaskModule)

    def _note_classes(self, strategy) -> None:
        self._current_classes = sorted(int(c) for c in strategy.experience.classes_in_this_experience)
        self.seen_classes = sorted(set(self.seen_classes) | set(self._current_classes))

    def after_forward(self, strategy, **kwargs):  # before Avalanche computes the loss of this mini-batch
        if self.masked_loss and self._maskable(strategy) and not isinstance(strategy._criterion, MaskedCriterion):
            strategy._criterion = MaskedCriterion(strategy._criterion, self, strategy)

    def after_eval_forward(self, strategy, **kwargs):
        if self.seen_classes and self._maskable(strategy):
            strategy.mb_output = mask_logits(strategy.mb_output, self.seen_classes)


def experience_loader(strategy, fraction: float = 1.0, seed: int = 0) -> DataLoader:
    """The current experience's data with its eval transforms (no augmentation), a fixed random ``fraction`` of it,
    in mini-batches of the training size: for the passes methods make outside the training loop (covariances,
    gradients, features). Every rank of a torchrun job reads the whole experience, so the results agree."""
    data = strategy.experience.dataset.eval()
    if fraction < 1.0:
        n = max(1, round(fraction * len(data)))
        g = torch.Generator().manual_seed(seed + strategy.experience.current_experience)
        data = data.subset(torch.randperm(len(data), generator=g)[:n].tolist())
    return DataLoader(data, batch_size=strategy.train_mb_size, shuffle=False)


def all_reduce_(*tensors: torch.Tensor) -> None:
    """Sum tensors over the ranks of a torchrun job, in place (nothing in a single process): e.g. gradients of a
    model that DDP does not wrap, computed on each rank's shard of the mini-batches."""
    if DistributedHelper.is_distributed:
        for t in tensors:
            torch.distributed.all_reduce(t)


class PluginStateMixin:
    """``state_dict()`` / ``load_state_dict()`` for a plugin's own bookkeeping (plain Python values), so that a
    checkpoint restores it with the model. Subclasses list the attributes in ``_state_attrs``."""

    _state_attrs: tuple = ()

    def state_dict(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in self._state_attrs}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in self._state_attrs if k not in state]
        if missing:
            raise ValueError(f"{type(self).__name__} state lacks {missing} (saved by another method?).")
        for k in self._state_attrs:
            setattr(self, k, copy.deepcopy(state[k]))


class AdapterPluginMixin(PluginStateMixin):
    """What every adapter method's plugin shares: ``prepare(model)`` injects its layers (``add_lora`` with
    ``self.lora_kwargs``) unless the model already has layers of ``_layer_type``, and runs in ``before_training``,
    before Avalanche first collects the parameters for the optimizer."""

    _layer_type: type = LoRALayer
    _layer_desc: str = "LoRA"
    lora_kwargs: dict
    adapted_modules: list

    def prepare(self, model: nn.Module) -> None:
        found = [n for n, m in unwrap(model).named_modules() if isinstance(m, self._layer_type)]
        if found:
            self.adapted_modules = found
            return
        if self.lora_kwargs["target_modules"] is None:
            raise ValueError(f"{type(self).__name__}: the model has no {self._layer_desc} layers and no "
                             "target_modules were given.")
        self.adapted_modules = add_lora(model, **self.lora_kwargs)

    def before_training(self, strategy, **kwargs):
        self.prepare(strategy.model)
        warn_unfrozen_batchnorm(strategy)


def warn_unfrozen_batchnorm(strategy) -> None:
    """Warn once when a pretrained backbone's BatchNorm (running statistics not at their initial 0 / 1) would train
    in train mode under a method that freezes the backbone: its statistics drift and the pretrained function is lost
    (measured: accuracy 0.42 -> 0.18). Per-task BatchNorm copies (they train on purpose) are left alone."""
    from models.task_lora import TaskBatchNorm

    from .batchnorm import FreezeBatchNormPlugin

    model = unwrap(strategy.model)
    if getattr(strategy, "_bn_warned", False) or any(isinstance(p, FreezeBatchNormPlugin) for p in strategy.plugins):
        return
    if strategy.clock.train_exp_counter > 0:  # only what the model came with: later, statistics are its own training
        return
    if any(isinstance(m, TaskBatchNorm) for m in model.modules()):
        return
    pretrained = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and m.running_mean is not None
                  and not (bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()))]
    if pretrained:
        strategy._bn_warned = True
        warnings.warn(f"{len(pretrained)} BatchNorm layers of this pretrained backbone (e.g. {pretrained[0]}) will "
                      "update their statistics while the method keeps the backbone frozen; add "
                      "strategies.FreezeBatchNormPlugin() to the strategy's plugins (experiments.run: --bn frozen).",
                      stacklevel=2)


class DistributedTemplate(SupervisedTemplate):
    """``SupervisedTemplate`` that trains correctly under ``torchrun`` (PyTorch DDP through Avalanche's
    ``DistributedHelper``) while adapters and heads keep being added; identical to it in a single process.

    Avalanche 0.6 shards the data but neither wraps the model nor reduces metrics, and a model wrapped once misses
    parameters created later. So: after every model adaptation in training the model is unwrapped, adapted and
    wrapped again (evaluation runs unwrapped); the optimizer is updated with the unwrapped model's parameter names;
    rank 0's buffers (BatchNorm statistics) are broadcast at the end of each experience; and every rank evaluates the
    whole eval stream (no ``DistributedSampler``), so the reported metrics equal a single-process evaluation. Used as Avalanche's naive fine-tuning by ``experiments.run``.
    """

    def model_adaptation(self, model=None):
        model = unwrap(self.model if model is None else model)
        model = super().model_adaptation(model)
        if DistributedHelper.is_distributed and self.is_training:
            model = DistributedHelper.wrap_model(model)
        return model

    def _after_training_exp(self, **kwargs):
        if DistributedHelper.is_distributed:
            # DDP syncs buffers at the start of a forward pass, so the last pass leaves each rank with its own
            # BatchNorm statistics: take rank 0's before the plugins merge, store or evaluate anything
            for b in unwrap(self.model).buffers():
                torch.distributed.broadcast(b, src=0)
        super()._after_training_exp(**kwargs)

    def make_optimizer(self, reset_optimizer_state=False, remove_params=False, verbose_optimizer=False, **kwargs):
        self.optimized_param_id = update_optimizer(
            self.optimizer,
            dict(unwrap(self.model).named_parameters()),
            self.optimized_param_id,
            reset_state=reset_optimizer_state,
            remove_params=remove_params,
            verbose=verbose_optimizer,
        )

    def make_eval_dataloader(self, num_workers=0, shuffle=False, pin_memory=None, persistent_workers=False, **kw):
        args = self._obtain_common_dataloader_parameters(
            batch_size=self.eval_mb_size, num_workers=num_workers, shuffle=shuffle, pin_memory=pin_memory,
            persistent_workers=persistent_workers,
        )
        collate_from_data_or_kwargs(self.adapted_dataset, args)
        self.dataloader = SingleDatasetDataLoader(self.adapted_dataset, distributed_sampling=False, **args)


class MethodStrategy(DistributedTemplate):
    """``SupervisedTemplate`` whose plugin list starts with ``method_plugin`` (kept as ``self.method_plugin``).

    Subclasses set ``name`` (the ``--method`` of ``experiments.run``) and ``recipe`` (the method's
    :class:`~strategies.recipe.TrainingRecipe`, from its official code), build their plugin from their own keyword-only
    options and pass the template's arguments through.

    :param optimizer: ``None`` (default) builds the method's own optimizer over ``model.parameters()`` from
        ``recipe`` (type, effective learning rate, betas, weight decay) and adds its learning-rate schedule
        (:class:`~strategies.recipe.LRSchedulePlugin`); an optimizer given here is used as it is, with no schedule
        unless you add one.
    :param reset_optimizer_state: start every experience with an empty optimizer state, as the official code's new
        optimizer per task (:class:`~strategies.recipe.FreshOptimizerPlugin`); ``False`` keeps Avalanche's way
        (state carried across experiences).
    :param eval_mb_size: ``None`` means ``train_mb_size``, as in Avalanche's ``Naive``.
    """

    name: str = ""
    recipe: TrainingRecipe = TrainingRecipe()

    def __init__(
        self,
        *,
        method_plugin: Optional[SupervisedPlugin],
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device="cpu",
        plugins: Optional[Sequence[SupervisedPlugin]] = None,
        evaluator=default_evaluator,
        eval_every: int = -1,
        reset_optimizer_state: bool = True,
        **base_kwargs,
    ):
        self.method_plugin = method_plugin
        extra = []
        if optimizer is None:
            optimizer = build_optimizer(self.recipe, model.parameters(), train_mb_size)
            extra.append(self.recipe.schedule_plugin())
        if reset_optimizer_state:
            extra.append(FreshOptimizerPlugin())
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=train_mb_size if eval_mb_size is None else eval_mb_size,
            device=device,
            plugins=[p for p in [method_plugin, *extra, *(plugins or [])] if p is not None],
            evaluator=evaluator,
            eval_every=eval_every,
            **base_kwargs,
        )
