"""CoDyRA: continual dynamic rank-selective LoRA.

Lu et al., "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models with
Dynamic Rank-Selective LoRA", arXiv:2412.01004; official code Artificer-AI-Lab/CoDyRA.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from models.gate_lora import GateLoRAConv2d, GateLoRALinear, GateLoRAMixin
from models.inject import Target, count_parameters

from .base import AdapterPluginMixin, ClassMaskMixin, MethodStrategy, unwrap
from .recipe import TrainingRecipe

__all__ = ["CoDyRAPlugin", "CoDyRA", "THRESHOLDS", "threshold_"]

THRESHOLDS = ("code", "soft")


@torch.no_grad()
def threshold_(w: torch.Tensor, tau: float, kind: str = "code") -> torch.Tensor:
    """Shrink the gates ``w`` in place by ``tau``.

    ``code``: the official three in-place lines (``p[p > τ] -= τ; p[p < -τ] += τ; p[|p| < τ] = 0``), which zero
    every gate with ``|w| < 2τ`` and shrink the others by τ; ``soft``: the paper's proximal operator
    ``sign(w) · max(|w| - τ, 0)``.
    """
    if kind == "code":
        w[w > tau] -= tau
        w[w < -tau] += tau
        w[w.abs() < tau] = 0
    elif kind == "soft":
        w.copy_(torch.sign(w) * torch.clamp(w.abs() - tau, min=0))
    else:
        raise ValueError(f"Unknown threshold {kind!r}; choose one of {', '.join(THRESHOLDS)}.")
    return w


class CoDyRAPlugin(ClassMaskMixin, AdapterPluginMixin, SupervisedPlugin, supports_distributed=True):
    """Gate-LoRA on every targeted weight, ``ΔW = B diag(w) A``, with a threshold on the gates ``w``.

    Per experience of T iterations (as in the official code): A, B and w train with the strategy's optimizer; the
    threshold τ steps through ``linspace(0, max_kappa, lambda_num)``, its index rising at every iteration
    ``i ≥ dense`` with ``i % ((T - dense) // lambda_num) == 0`` (``dense = dense_fraction · T``), and after each
    update with ``i > dense`` every gate is thresholded (:func:`threshold_`). At the end of the experience the ranks
    whose gate is zero are dropped, ``B diag(w) A`` is merged into the base weight, and A, B, w restart at full rank
    (w ~ N(0, 1)) for the next experience. Inference is the plain merged backbone. ``rank_history`` keeps, after
    every experience, the ranks kept per module (``{module name: rank}``).

    Follows Artificer-AI-Lab/CoDyRA @ c1691e4c4c8a331acaaeb7dfa5e37bcb974cf0c8: ``models/codyra.py`` L646
    (``lambdas = linspace(0, max_kappa, lambda_num)``), L691-692 (``dense_iters``, ``lambda_step_iters``), L701-704
    (threshold index), L789-795 (the three in-place threshold lines after ``optimizer.step()``), L752-753 (logits of
    earlier tasks' classes set to -inf: cross-entropy over the current task's classes); ``loralib/codyra.py``
    L112-168 (prune zero gates, merge ``(B * gate) @ A`` with no scaling, restart); ``runner_codyra.sh``: r 16,
    max_kappa 5e-3, dense 0.5. Training recipe in :class:`CoDyRA`. Deviations kept:

    * the loss is the strategy's (masked) cross-entropy over a classifier head: CLIP's image-to-text logits over
      class-name embeddings and its text-to-image term do not exist for CNN/ViT classifiers;
    * any Linear/Conv2d can be targeted (convs gate the rows of A: r for ``kxk_1x1``, r·k for ``loralib``);
    * ``threshold="soft"`` offers the paper's proximal operator instead of the code's.

    :param target_modules, exclude_modules, conv_mode, trainable_modules: see :func:`models.add_lora`.
    :param r: initial rank of every gate-LoRA (16).
    :param alpha: ``None`` keeps the code's scale of 1.
    :param dropout: adapter input dropout (0).
    :param max_kappa: final threshold (the runner's 5e-3).
    :param dense_fraction: share of the iterations trained without thresholding (0.5).
    :param lambda_num: number of threshold values (50).
    :param gate_init: ``randn`` (official code) or ``ones``.
    :param threshold: ``code`` (the official in-place lines: zero below 2τ, shrink the rest by τ) or ``soft``
        (the paper's ``sign(w) · max(|w| - τ, 0)``).
    :param masked_loss: cross-entropy over the current experience's classes only (as the official loss).
    """

    _state_attrs = ("adapted_modules", "rank_history", "seen_classes")
    _layer_type, _layer_desc = GateLoRAMixin, "gate-LoRA"

    def __init__(
        self,
        *,
        target_modules: Optional[Target] = "auto",
        r: int = 16,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        max_kappa: float = 5e-3,
        dense_fraction: float = 0.5,
        lambda_num: int = 50,
        gate_init: Literal["randn", "ones"] = "randn",
        threshold: Literal["code", "soft"] = "code",
        masked_loss: bool = True,
    ):
        super().__init__()
        if threshold not in THRESHOLDS:
            raise ValueError(f"Unknown threshold {threshold!r}; choose one of {', '.join(THRESHOLDS)}.")
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
        self.threshold, self.masked_loss = threshold, masked_loss
        self.taus = torch.linspace(0, max_kappa, lambda_num).tolist()
        self.adapted_modules: list[str] = []
        self.rank_history: list[dict[str, int]] = []
        self.seen_classes: list[int] = []
        self._current_classes: list[int] = []
        self._dense = 0.0
        self._tau_every = 0

    def _layers(self, model):
        return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, GateLoRAMixin)]

    def before_training_exp(self, strategy, **kwargs):
        self._note_classes(strategy)
        self.start_schedule(strategy.train_epochs * len(strategy.dataloader))
        for _, layer in self._layers(strategy.model):  # fresh adapters start with fresh optimizer state
            for p in layer.adapter_parameters():
                strategy.optimizer.state.pop(p, None)

    def start_schedule(self, total: int) -> None:
        """Set the threshold schedule for an experience of ``total`` iterations."""
        self._dense = self.dense_fraction * total
        self._tau_every = int((total - self._dense) // self.lambda_num)
        if self._tau_every <= 0 and not getattr(self, "_warned_short", False):
            self._warned_short = True
            warnings.warn(f"CoDyRA: an experience of {total} iterations leaves {total - self._dense:.0f} after the "
                          f"dense phase, fewer than lambda_num={self.lambda_num}: the threshold never rises (as in the "
                          "official code) and no rank is pruned; train longer or lower lambda_num.", stacklevel=2)

    def current_tau(self, iteration: int) -> float:
        """The threshold applied after update number ``iteration`` (0-based) of the experience: 0 up to
        ``dense`` (included), then ``taus[k]`` with k the number of iterations ``dense ≤ j ≤ iteration`` with
        ``j % step == 0`` (0 for ever when the experience is shorter than ``lambda_num`` steps, as the code)."""
        if iteration <= self._dense or self._tau_every <= 0:
            return 0.0
        first = math.ceil(self._dense)
        k = iteration // self._tau_every - (first - 1) // self._tau_every
        return self.taus[min(k, self.lambda_num - 1)]

    @torch.no_grad()
    def after_update(self, strategy, **kwargs):
        tau = self.current_tau(strategy.clock.train_exp_iterations)
        if tau <= 0:
            return
        for _, layer in self._layers(strategy.model):
            threshold_(layer.lora_gate, tau, self.threshold)

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

    Recipe (Artificer-AI-Lab/CoDyRA @ c1691e4, ``models/codyra.py`` L639-643, L710): a new AdamW per task, lr 5e-4
    (``runner_codyra.sh``), weight decay 0, **betas (0.9, 0.9999)**, cosine per iteration without warm-up
    (``utils.cosine_lr``); batch 64. The CoDyRA options are those of :class:`CoDyRAPlugin`.
    """

    name = "codyra"
    recipe = TrainingRecipe(optimizer="adamw", lr=5e-4, weight_decay=0.0, betas=(0.9, 0.9999), lr_schedule="cosine",
                            source="Artificer-AI-Lab/CoDyRA@c1691e4 models/codyra.py L639-643; runner_codyra.sh")
    plugin_class = CoDyRAPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        target_modules: Optional[Target] = "auto",
        r: int = 16,
        alpha: Optional[float] = None,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        max_kappa: float = 5e-3,
        dense_fraction: float = 0.5,
        lambda_num: int = 50,
        gate_init: Literal["randn", "ones"] = "randn",
        threshold: Literal["code", "soft"] = "code",
        masked_loss: bool = True,
        **base_kwargs,
    ):
        super().__init__(
            method_plugin=CoDyRAPlugin(
                target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                exclude_modules=exclude_modules, trainable_modules=trainable_modules, max_kappa=max_kappa,
                dense_fraction=dense_fraction, lambda_num=lambda_num, gate_init=gate_init,
                threshold=threshold, masked_loss=masked_loss,
            ),
            model=model,
            optimizer=optimizer,
            **base_kwargs,
        )
