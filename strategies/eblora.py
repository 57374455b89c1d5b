"""EBLoRA: energy-balanced LoRA on the restricted Stiefel manifold.

Gu, Luo et al., "Spectral Imbalance Causes Forgetting in Low-Rank Continual Adaptation", ICML 2026,
arXiv:2602.00722; official code haodotgu/EBLoRA.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from torch import nn

from models.inject import Target, count_parameters
from models.stiefel_lora import StiefelLoRAConv2d, StiefelLoRALinear, StiefelLoRAMixin, polar

from .base import AdapterPluginMixin, MethodStrategy, experience_loader, unwrap
from .recipe import TrainingRecipe

__all__ = ["EBLoRAPlugin", "EBLoRA", "grow_subspace"]


def grow_subspace(F: torch.Tensor, Gt: torch.Tensor, threshold: float) -> torch.Tensor:
    """GPM-style growth of the orthonormal basis ``F`` (d × k) so that it captures ``threshold`` of the energy of
    ``Gt`` (d × m): for an empty F the top singular vectors reaching the threshold; otherwise the top directions of
    the residual ``Gt - F Fᵀ Gt`` until the captured energy of ``Gt`` reaches it. Capped at d columns."""
    total = float((Gt ** 2).sum())
    d = Gt.shape[0]
    if total == 0.0 or F.shape[1] >= d:
        return F
    R = Gt - F @ (F.T @ Gt) if F.shape[1] else Gt
    captured = total - float((R ** 2).sum())
    if captured / total >= threshold:
        return F
    U, S, _ = torch.linalg.svd(R.double(), full_matrices=False)
    acc = captured + torch.cumsum(S ** 2, 0)
    k = int(torch.searchsorted(acc / total, torch.tensor(threshold, dtype=acc.dtype)).item()) + 1
    k = min(k, d - F.shape[1], int((S > S[0] * 1e-6).sum()))
    if k <= 0:
        return F
    new = torch.cat([F.double(), U[:, :k]], 1)
    q, _ = torch.linalg.qr(new)  # keeps span and order, removes rounding
    return q.to(F.dtype)


class EBLoRAPlugin(AdapterPluginMixin, SupervisedPlugin, supports_distributed=True):
    """``ΔW = scaling · s · U Vᵀ`` with U, V orthonormal and V orthogonal to the earlier tasks' gradient subspace F.

    Before each experience: the mean gradient G of the loss w.r.t. every adapted (frozen) weight is computed on a
    ``grad_fraction`` subsample of the experience (eval mode, no augmentation); ``Gᵀ`` is projected off F and its
    rank-r SVD ``Gᵀ ≈ P S Qᵀ`` sets V = P, U = Q; the magnitude starts at ``s = -(alpha0 + beta0 · l/(L-1))`` for
    the l-th adapted layer (depth-aware energy scaling; the paper's configs use 0, so ΔW starts at 0).

    Each step is Riemannian AdamW: before the strategy's optimizer step the gradients of U and V are projected on
    the tangent space (and V's off F); after it, the update ``D = X_new - X_old`` is scaled by
    ``sqrt(grad_scaling / r)``, projected on the tangent space (V's off F first) and retracted with the polar
    decomposition. U and V stay orthonormal and V ⟂ F to rounding after every step; only s carries the magnitude.

    After each experience: merge, recompute G on the merged model and grow F (energy threshold), then restart the
    adapter (s = 0).

    Follows haodotgu/EBLoRA @ 5585607 (``llava/train/riemannian_adam.py`` ``pre_step`` L79-113, ``post_step``
    L116-159 with ``delta /= sqrt(shape[1] / c)``, ``shape[1] = r``; ``llava/train/llava_trainer.py`` L207-221 passes
    ``grad_scaling = float(4096)``, a constant, so every step on U and V is ``sqrt(4096 / r)`` = 16× at r = 16;
    ``svd_lowrank`` init in ``extract_gradients.py`` L270-277; energy GPM with the +1 convention, L339); training
    recipe in :class:`EBLoRA`. Deviations kept:

    * the loss is the strategy's cross-entropy over a classifier head (the paper trains LLaVA);
    * convs (``kxk_1x1``, ungrouped) use the (out, in·k·k) unfolding, where F lives in the in·k·k input space;
    * the depth-aware scale counts adapted layers (the code: transformer blocks out of 32; no effect at the
      released ``alpha0 = beta0 = 0``);
    * the gradient passes take a random ``grad_fraction`` of the experience (the code: evenly spaced samples).

    :param target_modules, exclude_modules, trainable_modules: see :func:`models.add_lora`.
    :param r: rank (paper: 16).
    :param alpha: ``None`` means the paper's ``alpha = 2r`` (scaling 2).
    :param energy_threshold: energy that F must capture (0.99).
    :param grad_fraction: share of the experience's data used for the gradient passes (0.2).
    :param alpha0: depth-aware initial magnitude, base (0).
    :param beta0: depth-aware initial magnitude, slope (0).
    :param grad_scaling: ``c`` in the ``sqrt(c / r)`` rescale of every U, V step (the code's constant 4096);
        ``None`` turns it off.
    """

    _state_attrs = ("adapted_modules", "subspace_history", "degraded")
    _layer_type, _layer_desc = StiefelLoRAMixin, "Stiefel LoRA"

    def __init__(
        self,
        *,
        target_modules: Optional[Target] = "auto",
        r: int = 16,
        alpha: Optional[float] = None,
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        energy_threshold: float = 0.99,
        grad_fraction: float = 0.2,
        alpha0: float = 0.0,
        beta0: float = 0.0,
        grad_scaling: Optional[float] = 4096.0,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < energy_threshold <= 1:
            raise ValueError(f"energy_threshold must be in (0, 1], got {energy_threshold}.")
        if not 0 < grad_fraction <= 1:
            raise ValueError(f"grad_fraction must be in (0, 1], got {grad_fraction}.")
        self.lora_kwargs = dict(
            target_modules=target_modules, r=r, alpha=2 * r if alpha is None else alpha, conv_mode="kxk_1x1",
            exclude_modules=exclude_modules, trainable_modules=trainable_modules,
            linear_cls=StiefelLoRALinear, conv_cls=StiefelLoRAConv2d,
        )
        self.energy_threshold, self.grad_fraction = energy_threshold, grad_fraction
        self.alpha0, self.beta0, self.grad_scaling, self.seed = alpha0, beta0, grad_scaling, seed
        self.adapted_modules: list[str] = []
        self.subspace_history: list[dict[str, int]] = []
        self.degraded: dict[int, dict[str, int]] = {}  # experience -> {layer: rank used} where F left < r
        self._old: list = []

    def _layers(self, model) -> list[StiefelLoRAMixin]:
        return [m for m in model.modules() if isinstance(m, StiefelLoRAMixin)]

    # -- gradients of the frozen weights --------------------------------------------------------------------
    def mean_gradients(self, strategy) -> list[torch.Tensor]:
        """Mean loss gradient w.r.t. each adapted base weight, as (d_out, d_in) matrices, on a fixed random
        ``grad_fraction`` of the current experience (eval mode: no dropout, no BatchNorm update)."""
        model = unwrap(strategy.model)  # plain forward/backward passes, outside DDP's gradient hooks
        layers = self._layers(model)
        loader = experience_loader(strategy, self.grad_fraction, self.seed)
        n = len(loader.dataset)
        weights = [m.base_layer.weight for m in layers]
        flags = [w.requires_grad for w in weights]
        was_training = model.training
        model.eval()
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        try:
            with torch.enable_grad():
                for batch in loader:
                    x, y = batch[0].to(strategy.device), batch[1].to(strategy.device)
                    t = batch[-1].to(strategy.device)
                    loss = strategy._criterion(avalanche_forward(model, x, t), y) * (len(x) / n)
                    loss.backward()
            grads = [w.grad.detach().reshape(w.shape[0], -1).clone() for w in weights]
        finally:
            for w, f in zip(weights, flags):
                w.requires_grad_(f)
            for p in model.parameters():
                p.grad = None
            model.train(was_training)
        return grads

    # -- experience start: SVD initialisation ---------------------------------------------------------------
    @torch.no_grad()
    def before_training_exp(self, strategy, **kwargs):
        layers = self._layers(strategy.model)
        grads = self.mean_gradients(strategy)
        L = len(layers)
        for depth, (layer, G) in enumerate(zip(layers, grads)):
            k = layer.active_r = min(layer.r, layer.free_dim())
            if k < layer.r:  # degrade rather than stop: this layer's update has fewer directions
                warnings.warn(
                    f"EBLoRA: {self.adapted_modules[depth]} has {layer.free_dim()} free input directions left by "
                    f"its protected subspace ({layer.subspace.shape[1]} of {layer.fan_in}); rank {k} instead of "
                    f"{layer.r} for this experience (lower energy_threshold to keep more).", stacklevel=2)
                self.degraded.setdefault(strategy.experience.current_experience, {})[
                    self.adapted_modules[depth]] = k
            F = layer.subspace
            Gt = G.T.to(torch.float64)
            if F.numel():
                F64 = F.to(torch.float64)
                Gt = Gt - F64 @ (F64.T @ Gt)
            if k == 0 or float(Gt.abs().max()) == 0.0:  # no room or no signal: a random orthonormal start
                layer.reset_lora_parameters()
            else:
                P, _, Q = torch.svd_lowrank(Gt, q=k, niter=4)
                if F.numel():  # exact orthogonality to F, then orthonormal again
                    P = P - F64 @ (F64.T @ P)
                # orthonormal again; QR may flip a column's sign, which must not break its pairing with Q's
                # column (the code's B A = Q Pᵀ, the top-k part of the gradient's SVD)
                P, R = torch.linalg.qr(P)
                P = P * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(P)
                pad = layer.r - k
                layer.set_factors(nn.functional.pad(polar(Q), (0, pad)).to(layer.lora_B.dtype),
                                  nn.functional.pad(P, (0, pad)).to(layer.lora_A.dtype))
            layer.lora_scale.fill_(-(self.alpha0 + self.beta0 * depth / max(L - 1, 1)))
            layer.merged = False
            for p in layer.adapter_parameters():
                strategy.optimizer.state.pop(p, None)

    # -- Riemannian AdamW around the strategy's optimizer step --------------------------------------------------
    # Layers of one shape are handled together (stacked, one batched product / SVD per group): a ResNet-32 has 30
    # adapted convs but 5 shapes, and per-layer small ops made EBLoRA's step 1.20x plain LoRA's.
    def _shape_groups(self, layers):
        """``[(layers, F)]``: layers with the same (fan_out, fan_in, r), their subspaces stacked with zero columns
        padding them to the group's largest (zero columns project nothing)."""
        key = [(m.fan_out, m.fan_in, m.r, m.subspace.shape[1], m.subspace.data_ptr()) for m in layers]
        if getattr(self, "_groups_key", None) != key:
            by_shape: dict = {}
            for m in layers:
                by_shape.setdefault((m.fan_out, m.fan_in, m.r), []).append(m)
            groups = []
            for ms in by_shape.values():
                k = max(m.subspace.shape[1] for m in ms)
                F = None
                if k:
                    F = torch.zeros(len(ms), ms[0].fan_in, k, dtype=ms[0].subspace.dtype, device=ms[0].subspace.device)
                    for j, m in enumerate(ms):
                        F[j, :, : m.subspace.shape[1]] = m.subspace
                groups.append((ms, F))
            self._groups, self._groups_key = groups, key
        return self._groups

    @torch.no_grad()
    def before_update(self, strategy, **kwargs):
        self._old = []
        for ms, F in self._shape_groups(self._layers(strategy.model)):
            U = torch.stack([m.U() for m in ms])
            V = torch.stack([m.V() for m in ms])
            self._old.append((U, V))  # stack copies: the step cannot change them
            if all(m.lora_B.grad is not None for m in ms):
                gU = torch.stack([m.lora_B.grad.view(m.fan_out, m.r) for m in ms])
                gU -= U @ (gU.mT @ U)
                for m, g in zip(ms, gU):
                    m.lora_B.grad.view(m.fan_out, m.r).copy_(g)
            if all(m.lora_A.grad is not None for m in ms):
                gV = torch.stack([m.lora_A.grad.view(m.r, m.fan_in).T for m in ms])
                if F is not None:
                    gV -= F @ (F.mT @ gV)
                gV -= V @ (gV.mT @ V)
                for m, g in zip(ms, gV):
                    m.lora_A.grad.view(m.r, m.fan_in).T.copy_(g)

    @torch.no_grad()
    def after_update(self, strategy, **kwargs):
        for (ms, F), (U0, V0) in zip(self._shape_groups(self._layers(strategy.model)), self._old):
            c = math.sqrt(self.grad_scaling / ms[0].r) if self.grad_scaling else 1.0
            D = (torch.stack([m.U() for m in ms]) - U0) * c
            D -= U0 @ (D.mT @ U0)
            U = polar(U0 + D)
            D = (torch.stack([m.V() for m in ms]) - V0) * c
            if F is not None:
                D -= F @ (F.mT @ D)
            D -= V0 @ (D.mT @ V0)
            M = V0 + D
            if F is not None:
                M -= F @ (F.mT @ M)
            V = polar(M)
            for m, u, v in zip(ms, U, V):
                if m.active_r < m.r:  # columns out of use stay zero (the polar factor completes them arbitrarily)
                    u[:, m.active_r:] = 0
                    v[:, m.active_r:] = 0
                m.set_factors(u, v)
        self._old = []

    # -- experience end: merge, grow F, restart ----------------------------------------------------------------
    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        layers = self._layers(strategy.model)
        for layer in layers:
            layer.merge()
        grads = self.mean_gradients(strategy)
        sizes = {}
        for name, layer, G in zip(self.adapted_modules, layers, grads):
            layer.subspace = grow_subspace(layer.subspace, G.T.to(layer.subspace.dtype), self.energy_threshold)
            sizes[name] = layer.subspace.shape[1]
            layer.lora_scale.zero_()  # the merged update now lives in the base weight
            layer.merged = False
        self.subspace_history.append(sizes)

    def parameter_report(self, model: nn.Module) -> dict:
        """``stored`` adds the subspaces F (needed to train further tasks); inference is the merged backbone."""
        c = count_parameters(model)
        f = sum(m.subspace.numel() for m in self._layers(model))
        return dict(stored=c["total"] - c["adapter"] + f, inference=c["total"] - c["adapter"])


class EBLoRA(MethodStrategy):
    """Avalanche strategy: ``SupervisedTemplate`` plus :class:`EBLoRAPlugin` (Gu, Luo et al., ICML 2026).

    Recipe (haodotgu/EBLoRA @ 5585607, ``scripts/Train_UCIT/Task*.sh`` L64-67): AdamW lr 2e-4, weight decay 0.1,
    cosine per iteration with a 3 % linear warm-up (the transformers trainer's ``warmup_ratio 0.03``); the
    Riemannian projection and polar retraction wrap that optimizer's step. The EBLoRA options are those of
    :class:`EBLoRAPlugin`.
    """

    name = "eblora"
    recipe = TrainingRecipe(optimizer="adamw", lr=2e-4, weight_decay=0.1, lr_schedule="cosine", warmup=0.03,
                            source="haodotgu/EBLoRA@5585607 scripts/Train_UCIT/Task*.sh L64-67")
    plugin_class = EBLoRAPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        target_modules: Optional[Target] = "auto",
        r: int = 16,
        alpha: Optional[float] = None,
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        energy_threshold: float = 0.99,
        grad_fraction: float = 0.2,
        alpha0: float = 0.0,
        beta0: float = 0.0,
        grad_scaling: Optional[float] = 4096.0,
        **base_kwargs,
    ):
        super().__init__(
            method_plugin=EBLoRAPlugin(
                target_modules=target_modules, r=r, alpha=alpha, exclude_modules=exclude_modules,
                trainable_modules=trainable_modules, energy_threshold=energy_threshold, grad_fraction=grad_fraction,
                alpha0=alpha0, beta0=beta0, grad_scaling=grad_scaling,
            ),
            model=model,
            optimizer=optimizer,
            **base_kwargs,
        )
