"""O-LoRA: orthogonal subspace learning for continual learning.

Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", Findings of EMNLP 2023,
arXiv:2310.14152; official code cmnfriend/O-LoRA.
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from models.inject import Target, count_parameters
from models.sum_lora import SumLoRAConv2d, SumLoRALinear, SumLoRAMixin

from .base import AdapterPluginMixin, ClassMaskMixin, MethodStrategy, unwrap
from .recipe import TrainingRecipe

__all__ = ["OLoRAPlugin", "OLoRA", "orthogonality_loss"]


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """``Σ_layers Σ |A_old A_newᵀ|``: the L1 norm of the cross-Gram between the frozen earlier tasks' A rows and the
    current A rows (zero when the new row space is orthogonal to every earlier one)."""
    total = None
    for layer in model.modules():
        if isinstance(layer, SumLoRAMixin) and len(layer.bank_A) and layer.current_task is not None:
            old = torch.cat([a.reshape(a.shape[0], -1) for a in layer.bank_A.values()], 0)
            gram = old @ layer.lora_A.reshape(layer.lora_A.shape[0], -1).T
            term = gram.abs().sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


class OLoRAPlugin(ClassMaskMixin, AdapterPluginMixin, SupervisedPlugin, supports_distributed=True):
    """A new LoRA per task, trained next to the frozen LoRA of the earlier tasks (all summed, no merge), with
    ``loss += lambda_orth · Σ |A_old A_newᵀ| + lambda_l2 · Σ (‖A_new‖ + ‖B_new‖)``: the new task's update is pushed
    into input directions orthogonal to the earlier tasks' (the constraint is on A, the down-projection: the row
    space). Growth: r per task per adapted module.

    Follows cmnfriend/O-LoRA @ 07117e1fc4a5f5ad9308a815a42cee8f46502dc8: ``src/uie_trainer_lora.py`` L96
    (``abs(lora_A · loranew_Aᵀ).sum()``), L103 (``norm(loranew_*, p=2)``), L109 (``loss + orth · lamda_1 + l2 ·
    lamda_2``); ``lamda_1 = 0.5``, ``lamda_2 = 0`` (``src/run_uie_lora.py`` L240-241, ``scripts/order_1.sh``
    L42-43); ``LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1)`` (``run_uie_lora.py`` L115-116, L394), so the scale
    is 32 / 8 = 4 for the old and the new branch alike (``src/peft/tuners/lora.py`` L463, L585-598); training recipe
    in :class:`OLoRA`. Deviations kept:

    * the paper trains a generative language model with no classifier head; here a head is trained, and in
      class-incremental runs its cross-entropy is masked to the current experience's classes by default (as InfLoRA
      and SD-LoRA do): unmasked, a single head's recency bias, not O-LoRA, decides the forgetting;
    * ``alpha`` stays 32 whatever ``r`` (as the code: the scale falls as r grows).

    :param target_modules, exclude_modules, conv_mode, trainable_modules: see :func:`models.add_lora` (the paper
        adapts T5's q and v).
    :param r: rank of each task's LoRA (8).
    :param alpha: LoRA alpha (32: scale 4 at r = 8).
    :param dropout: adapter input dropout (0.1).
    :param lambda_orth: weight of the orthogonality loss (0.5).
    :param lambda_l2: weight of the L2 norm of the new factors (0).
    :param masked_loss: cross-entropy over the current experience's classes only (see above).
    """

    _state_attrs = ("adapted_modules", "trained_tasks", "seen_classes", "orth_history")
    _layer_type, _layer_desc = SumLoRAMixin, "O-LoRA"

    def __init__(
        self,
        *,
        target_modules: Optional[Target] = "auto",
        r: int = 8,
        alpha: Optional[float] = 32.0,
        dropout: float = 0.1,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        lambda_orth: float = 0.5,
        lambda_l2: float = 0.0,
        masked_loss: bool = True,
    ):
        super().__init__()
        if lambda_orth < 0 or lambda_l2 < 0:
            raise ValueError(f"lambda_orth and lambda_l2 must be >= 0, got {lambda_orth}, {lambda_l2}.")
        self.lora_kwargs = dict(target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                                exclude_modules=exclude_modules, trainable_modules=trainable_modules,
                                linear_cls=SumLoRALinear, conv_cls=SumLoRAConv2d)
        self.lambda_orth, self.lambda_l2, self.masked_loss = lambda_orth, lambda_l2, masked_loss
        self.adapted_modules: list[str] = []
        self.trained_tasks: list[int] = []
        self.seen_classes: list[int] = []
        self.orth_history: list[float] = []  # orthogonality loss at the end of each experience
        self._current_classes: list[int] = []

    def _layers(self, model) -> list[SumLoRAMixin]:
        return [m for m in unwrap(model).modules() if isinstance(m, SumLoRAMixin)]

    def before_training_exp(self, strategy, **kwargs):
        t = int(strategy.experience.current_experience)
        self._note_classes(strategy)
        for layer in self._layers(strategy.model):
            if self.trained_tasks:  # a fresh LoRA for the new task (task 0 has the one add_lora made)
                layer.reset_lora_parameters()
            layer.current_task = t
            for p in layer.adapter_parameters():
                strategy.optimizer.state.pop(p, None)

    def before_backward(self, strategy, **kwargs):
        model = unwrap(strategy.model)
        if self.lambda_orth and self.trained_tasks:
            strategy.loss = strategy.loss + self.lambda_orth * orthogonality_loss(model).to(strategy.loss)
        if self.lambda_l2:
            norms = sum(p.norm() for m in self._layers(model) for p in (m.lora_A, m.lora_B))
            strategy.loss = strategy.loss + self.lambda_l2 * norms

    def after_training_exp(self, strategy, **kwargs):
        t = int(strategy.experience.current_experience)
        with torch.no_grad():
            self.orth_history.append(float(orthogonality_loss(unwrap(strategy.model))))
        for layer in self._layers(strategy.model):
            layer.store_adapter(t)
        self.trained_tasks.append(t)

    def parameter_report(self, model: nn.Module) -> dict:
        """Every task's LoRA is kept and summed at inference: stored = inference = backbone + all LoRA + head."""
        c = count_parameters(model)
        idle = sum(m.idle_parameters() for m in self._layers(model))
        return dict(stored=c["total"] - idle, inference=c["total"] - idle)


class OLoRA(MethodStrategy):
    """Avalanche strategy: ``SupervisedTemplate`` plus :class:`OLoRAPlugin` (Wang et al., EMNLP Findings 2023).

    Recipe (cmnfriend/O-LoRA @ 07117e1): AdamW (DeepSpeed's, ``configs/ds_configs/stage2.config`` L13-29, weight
    decay and betas the trainer's defaults 0 and (0.9, 0.999)), lr 1e-3 constant (``scripts/order_1.sh`` L24, L35-36),
    1 epoch per task. The O-LoRA options are those of :class:`OLoRAPlugin`.
    """

    name = "o_lora"
    recipe = TrainingRecipe(optimizer="adamw", lr=1e-3, weight_decay=0.0,
                            source="cmnfriend/O-LoRA@07117e1 scripts/order_1.sh L24-36, stage2.config L13-29")
    plugin_class = OLoRAPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        target_modules: Optional[Target] = "auto",
        r: int = 8,
        alpha: Optional[float] = 32.0,
        dropout: float = 0.1,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        lambda_orth: float = 0.5,
        lambda_l2: float = 0.0,
        masked_loss: bool = True,
        **base_kwargs,
    ):
        super().__init__(
            method_plugin=OLoRAPlugin(
                target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                exclude_modules=exclude_modules, trainable_modules=trainable_modules, lambda_orth=lambda_orth,
                lambda_l2=lambda_l2, masked_loss=masked_loss,
            ),
            model=model,
            optimizer=optimizer,
            **base_kwargs,
        )
