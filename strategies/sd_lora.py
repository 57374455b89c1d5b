"""SD-LoRA: scalable decoupled LoRA.

Wu et al., "SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class Incremental Learning", ICLR 2025,
arXiv:2501.13198; official code WuYichen-97/SD-Lora-CL.
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from models.inject import Target, count_parameters
from models.sum_lora import LoRAMagnitudes, SDLoRAConv2d, SDLoRALinear, SumLoRAMixin

from .base import AdapterPluginMixin, ClassMaskMixin, MethodStrategy, unwrap
from .recipe import TrainingRecipe

__all__ = ["SDLoRAPlugin", "SDLoRA"]

MAGNITUDES = "sd_lora_magnitudes"


class SDLoRAPlugin(ClassMaskMixin, AdapterPluginMixin, SupervisedPlugin, supports_distributed=True):
    """Magnitude and direction decoupled: ``ΔW = Σ_{i<t} α_i B̂_i Â_i + α_t · s · B_t A_t`` where the earlier tasks'
    directions ``B̂_i Â_i = B_i A_i / (‖B_i‖_F ‖A_i‖_F)`` are frozen (stored as unit-norm factors) and **every**
    magnitude ``α_i`` stays learnable; the magnitudes are scalars shared by all adapted layers (a
    :class:`~models.sum_lora.LoRAMagnitudes` module registered on the model as ``sd_lora_magnitudes``), each
    starting at ``magnitude_init`` (0.8).

    A task's direction is frozen when the next experience starts (in ``before_train_dataset_adaptation``, so its new
    magnitude is a parameter before Avalanche updates the optimizer): evaluation after a task sees the model exactly
    as trained. At that point every earlier magnitude restarts at ``magnitude_init`` (``reset_magnitudes``, the
    official behaviour) or keeps its learnt value. No merge and no task identity at inference.

    Follows WuYichen-97/SD-Lora-CL @ 8bacded6eb44786db071f66fb90a87dd660d94ea: ``backbone/lora.py`` L183-191
    (``α_i^prev · B_i A_i x / (‖B_i‖ ‖A_i‖)`` for the saved directions, ``α · B A x`` for the current one, no
    alpha/r), magnitudes ``Parameter(0.8)`` for the current and 20 past directions (L326-328), all learnable;
    ``models/sdlora.py`` L109 rebuilds the backbone at every task, so every magnitude is re-created at 0.8; loss
    ``CE(logits[:, known:], y - known)`` (L225-236; the orthogonality loss is computed but not added); training
    recipe in :class:`SDLoRA`. Deviations kept:

    * any Linear/Conv2d can be adapted (the paper: Q and V of every ViT block, rank 10 hard-coded, L86);
    * ``reset_magnitudes=False`` offers the variant where magnitudes carry over (this project's earlier default).

    :param target_modules, exclude_modules, conv_mode, trainable_modules: see :func:`models.add_lora`.
    :param r: rank (10).
    :param alpha: ``None`` means ``alpha = r`` (scale 1: the code has no alpha/r).
    :param dropout: adapter input dropout (0).
    :param magnitude_init: initial value of each magnitude (0.8).
    :param reset_magnitudes: re-create every past magnitude at ``magnitude_init`` when a task starts (official).
    :param masked_loss: cross-entropy over the current experience's classes only (as the paper).
    """

    _state_attrs = ("adapted_modules", "trained_tasks", "seen_classes", "pending_task")
    _layer_type, _layer_desc = SumLoRAMixin, "SD-LoRA"

    def __init__(
        self,
        *,
        target_modules: Optional[Target] = "auto",
        r: int = 10,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        magnitude_init: float = 0.8,
        reset_magnitudes: bool = True,
        masked_loss: bool = True,
    ):
        super().__init__()
        self.lora_kwargs = dict(target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                                exclude_modules=exclude_modules, trainable_modules=trainable_modules,
                                linear_cls=SDLoRALinear, conv_cls=SDLoRAConv2d)
        self.magnitude_init, self.masked_loss = float(magnitude_init), masked_loss
        self.reset_magnitudes = reset_magnitudes
        self.adapted_modules: list[str] = []
        self.trained_tasks: list[int] = []
        self.seen_classes: list[int] = []
        self.pending_task: int | None = None  # trained, direction not frozen yet
        self._current_classes: list[int] = []

    def prepare(self, model: nn.Module) -> None:
        model = unwrap(model)
        super().prepare(model)
        mags = getattr(model, MAGNITUDES, None)
        if mags is None:
            mags = LoRAMagnitudes(self.magnitude_init).to(next(model.parameters()).device)
            model.add_module(MAGNITUDES, mags)
        for layer in self._layers(model):
            object.__setattr__(layer, "magnitudes", mags)

    def before_training(self, strategy, **kwargs):
        super().before_training(strategy, **kwargs)
        # the magnitudes are a new top-level module: Avalanche would place them in the optimizer group of their
        # nearest sibling, which is ambiguous when the optimizer has several groups ("No unique group found"); they
        # get a group of their own, with the optimizer's defaults (its constructor's lr, momentum...)
        mags = list(self.magnitudes(strategy.model).parameters())
        held = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p in mags):
            strategy.optimizer.add_param_group({"params": mags})

    def _layers(self, model) -> list[SumLoRAMixin]:
        return [m for m in unwrap(model).modules() if isinstance(m, SumLoRAMixin)]

    def magnitudes(self, model) -> LoRAMagnitudes:
        return getattr(unwrap(model), MAGNITUDES)

    def _restore_pending(self, model) -> None:
        # a checkpoint restores the factors but not which task the layers are on: the pending one is still summed in
        if self.pending_task is not None:
            for layer in self._layers(model):
                layer.current_task = self.pending_task

    def before_eval(self, strategy, **kwargs):
        self._restore_pending(strategy.model)

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        if self.pending_task is None:
            return
        self._restore_pending(strategy.model)
        t = self.pending_task
        for layer in self._layers(strategy.model):
            layer.store_adapter(t)  # the normalised direction, frozen
            layer.reset_lora_parameters()
        mags = self.magnitudes(strategy.model)
        mags.freeze_current(t)  # a new (learnable) magnitude for it
        if self.reset_magnitudes:  # the official backbone is rebuilt per task: every magnitude back at its init
            mags.reset_past()
        self.pending_task = None

    def before_training_exp(self, strategy, **kwargs):
        t = int(strategy.experience.current_experience)
        self._note_classes(strategy)
        mags = self.magnitudes(strategy.model)
        for layer in self._layers(strategy.model):
            layer.current_task = t
            for p in layer.adapter_parameters():
                strategy.optimizer.state.pop(p, None)
        strategy.optimizer.state.pop(mags.current, None)

    def after_training_exp(self, strategy, **kwargs):
        t = int(strategy.experience.current_experience)
        self.trained_tasks.append(t)
        self.pending_task = t

    def parameter_report(self, model: nn.Module) -> dict:
        """Every direction and magnitude is used at inference: stored = inference = all of it (the current factors
        are not counted before a task trains them)."""
        c = count_parameters(model)
        idle = sum(m.idle_parameters() for m in self._layers(model))
        return dict(stored=c["total"] - idle, inference=c["total"] - idle)


class SDLoRA(MethodStrategy):
    """Avalanche strategy: ``SupervisedTemplate`` plus :class:`SDLoRAPlugin` (Wu et al., ICLR 2025).

    Recipe (WuYichen-97/SD-Lora-CL @ 8bacded, ``models/sdlora.py`` L95-121): a new SGD per task, lr 8e-3, momentum
    0.9, **no weight decay** (commented out in the code; the config's 2e-4 is read only by dead code), constant lr
    (the MultiStepLR milestones 40/60 are never reached in its 20 epochs); batch 128 (``exps/sdlora_c100.json``).
    The SD-LoRA options are those of :class:`SDLoRAPlugin`.
    """

    name = "sd_lora"
    recipe = TrainingRecipe(optimizer="sgd", lr=8e-3, momentum=0.9, weight_decay=0.0,
                            source="WuYichen-97/SD-Lora-CL@8bacded models/sdlora.py L95-121")
    plugin_class = SDLoRAPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        target_modules: Optional[Target] = "auto",
        r: int = 10,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        magnitude_init: float = 0.8,
        reset_magnitudes: bool = True,
        masked_loss: bool = True,
        **base_kwargs,
    ):
        super().__init__(
            method_plugin=SDLoRAPlugin(
                target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                exclude_modules=exclude_modules, trainable_modules=trainable_modules,
                magnitude_init=magnitude_init, reset_magnitudes=reset_magnitudes, masked_loss=masked_loss,
            ),
            model=model,
            optimizer=optimizer,
            **base_kwargs,
        )
