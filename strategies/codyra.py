"""CoDyRA: continual dynamic rank-selective LoRA.

Lu et al., "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with
Dynamic Rank-Selective LoRA", arXiv:2412.01004; official code Artificer-AI-Lab/CoDyRA.
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from models.gate_lora import GateLoRAConv2d, GateLoRALinear, GateLoRAMixin
from models.inject import Target, count_parameters

from .base import AdapterPluginMixin, MethodStrategy, unwrap

__all__ = ["CoDyRAPlugin", "CoDyRA"]


class CoDyRAPlugin(AdapterPluginMixin, SupervisedPlugin, supports_distributed=True):
    """Gate-LoRA on every targeted weight, ``ΔW = B diag(w) A``, with a proximal soft threshold on ``w``.

    Per experience (as in the official code): A, B and w train with the strategy's optimizer (the paper uses AdamW,
    lr 5e-4, betas (0.9, 0.9999), no weight decay). After the dense phase (the first ``dense_fraction`` of the
    experience's iterations) every update is followed by ``w <- sign(w) · max(|w| - τ, 0)``; τ steps through
    ``linspace(0, max_kappa, lambda_num)``, advancing every ``(T - dense) / lambda_num`` iterations, so it ramps
    linearly to ``max_kappa`` over the rest of the experience. τ is a threshold, not multiplied by the learning rate.
    At the end of the experience the ranks whose gate is zero are dropped, ``B diag(w) A`` is merged into the base
    weight, and A, B, w restart at full rank for the next experience. Inference is the plain merged backbone.

    Adapted from the paper's CLIP setting: the loss is the strategy's cross-entropy over a classifier head (CLIP's
    image-text losses do not apply to CNN/ViT classifiers), and any Linear/Conv2d can be targeted (convs gate the
    rows of A: r for ``kxk_1x1``, r·k for ``loralib``). ``rank_history`` keeps, after every experience, the ranks
    kept per module (``{module name: rank}``).

    :param target_modules, exclude_modules, conv_mode, trainable_modules: see :func:`models.add_lora`.
    :param r: initial rank of every gate-LoRA (paper: 16).
    :param alpha: ``None`` keeps the paper's scale of 1.
    :param max_kappa: final soft threshold (paper's runner: 5e-3).
    :param dense_fraction: share of the iterations trained without thresholding (0.5).
    :param lambda_num: number of threshold steps (50).
    :param gate_init: ``"randn"`` (official code) or ``"ones"``.
    """

    _state_attrs = ("adapted_modules", "rank_history")
    _layer_type, _layer_desc = GateLoRAMixin, "gate-LoRA"

    def __init__(
        self,
        *,
        target_modules: Optional[Target] = None,
        r: int = 16,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        max_kappa: float = 5e-3,
        dense_fraction: float = 0.5,
        lambda_num: int = 50,
        gate_init: str = "randn",
    ):
        super().__init__()
        if max_kappa < 0:
            raise ValueError(f"max_kappa must be >= 0, got {max_kappa}.")
        if not 0 <= dense_fraction < 1:
            raise ValueError(f"dense_fraction must be in [0, 1), got {dense_fraction}.")
        if lambda_num < 1:
            raise ValueError(f"lambda_num must be >= 1, got {lambda_num}.")
        self.lora_kwargs = dict(
            target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
            exclude_modules=exclude_modules, trainable_modules=trainable_modules,
            linear_cls=GateLoRALinear, conv_cls=GateLoRAConv2d, layer_kwargs=dict(gate_init=gate_init),
        )
        self.max_kappa, self.dense_fraction, self.lambda_num = max_kappa, dense_fraction, lambda_num
        self.taus = torch.linspace(0, max_kappa, lambda_num).tolist()
        self.adapted_modules: list[str] = []
        self.rank_history: list[dict[str, int]] = []
        self._dense_iters = 0
        self._tau_every = 1

    def _layers(self, model):
        return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, GateLoRAMixin)]

    def before_training_exp(self, strategy, **kwargs):
        total = strategy.train_epochs * len(strategy.dataloader)
        self._dense_iters = int(self.dense_fraction * total)
        self._tau_every = max(1, (total - self._dense_iters) // self.lambda_num)
        for _, layer in self._layers(strategy.model):  # fresh adapters start with fresh optimizer state
            for p in layer.adapter_parameters():
                strategy.optimizer.state.pop(p, None)

    def current_tau(self, iteration: int) -> float:
        """The threshold after update number ``iteration`` (0-based) of the experience; 0 in the dense phase."""
        if iteration < self._dense_iters:
            return 0.0
        return self.taus[min((iteration - self._dense_iters) // self._tau_every, self.lambda_num - 1)]

    @torch.no_grad()
    def after_update(self, strategy, **kwargs):
        tau = self.current_tau(strategy.clock.train_exp_iterations)
        if tau <= 0:
            return
        for _, layer in self._layers(strategy.model):
            w = layer.lora_gate
            w.copy_(torch.sign(w) * torch.clamp(w.abs() - tau, min=0))

    def current_ranks(self, model) -> dict[str, int]:
        return {n: m.kept_rank() for n, m in self._layers(model)}

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        self.rank_history.append(self.current_ranks(strategy.model))
        for _, layer in self._layers(strategy.model):
            # zero gates contribute nothing to B diag(w) A: merging the gated product drops the pruned ranks
            layer.merge_and_reset()

    def parameter_report(self, model: nn.Module) -> dict:
        """Merged: the adapters (restarted at full rank) are training state only."""
        c = count_parameters(model)
        return dict(stored=c["total"] - c["adapter"], inference=c["total"] - c["adapter"])


class CoDyRA(MethodStrategy):
    """Avalanche strategy: ``SupervisedTemplate`` plus :class:`CoDyRAPlugin` (Lu et al., arXiv:2412.01004).

    The CoDyRA options are those of :class:`CoDyRAPlugin`; the rest those of ``SupervisedTemplate``. Pass an AdamW
    optimizer over ``model.parameters()`` to follow the paper.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        target_modules: Optional[Target] = None,
        r: int = 16,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        max_kappa: float = 5e-3,
        dense_fraction: float = 0.5,
        lambda_num: int = 50,
        gate_init: str = "randn",
        **base_kwargs,
    ):
        super().__init__(
            method_plugin=CoDyRAPlugin(
                target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                exclude_modules=exclude_modules, trainable_modules=trainable_modules, max_kappa=max_kappa,
                dense_fraction=dense_fraction, lambda_num=lambda_num, gate_init=gate_init,
            ),
            model=model,
            optimizer=optimizer,
            **base_kwargs,
        )
