"""InfLoRA: interference-free low-rank adaptation.

Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024, arXiv:2404.00228;
official code liangyanshuo/InfLoRA.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from torch import nn

from models.inject import Target, auto_targets, count_parameters, matches
from models.sum_lora import SumLoRAConv2d, SumLoRALinear, SumLoRAMixin

from .base import AdapterPluginMixin, ClassMaskMixin, MethodStrategy, experience_loader, unwrap
from .recipe import TrainingRecipe

__all__ = ["InfLoRAPlugin", "InfLoRA", "dualgpm_update"]


def left_singular(M: torch.Tensor, *, psd: bool = False, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and squared singular values of a square ``M``, largest first, from the symmetric
    eigendecomposition of ``M Mᵀ`` in float64 (several times faster than an SVD; the energies ``σ²`` come out
    directly). ``psd=True``: ``M`` is symmetric positive semi-definite (a covariance), so its own eigenvectors are
    its singular vectors and ``σ² = λ²``: no Gram product (d³) is formed. ``top=k``: only the k largest pairs,
    from LAPACK's subset driver ``dsyevr`` (exact to working precision; measured 15 ms against 40 ms for the full
    ``eigh`` of a 576² covariance). Robust: the matrix is symmetrised; if ``eigh`` does not converge
    (ill-conditioned covariances of wide convs) it is retried with a small diagonal jitter, and an SVD of ``M`` is
    the last resort."""
    M = M.double()
    G = M if psd else M @ M.T
    G = (G + G.T) / 2
    d = G.shape[0]
    if top is not None and top < d:
        import scipy.linalg

        try:
            lam, U = scipy.linalg.eigh(G.cpu().numpy(), subset_by_index=[d - top, d - 1], driver="evr")
        except (np.linalg.LinAlgError, ValueError):
            U, E = left_singular(M, psd=psd)
            return U[:, :top], E[:top]
        lam = torch.from_numpy(lam[::-1].copy()).to(M.device).clamp_min(0)
        return torch.from_numpy(np.ascontiguousarray(U[:, ::-1])).to(M.device), lam ** 2 if psd else lam
    try:
        lam, U = torch.linalg.eigh(G)
    except torch.linalg.LinAlgError:
        try:
            jitter = 1e-10 * float(G.diagonal().abs().mean()) + 1e-300
            lam, U = torch.linalg.eigh(G + jitter * torch.eye(len(G), dtype=G.dtype, device=G.device))
            lam = lam - jitter
        except torch.linalg.LinAlgError:
            U, S, _ = torch.linalg.svd(M)
            return U, S ** 2
    lam = lam.flip(0).clamp_min(0)
    return U.flip(1), lam ** 2 if psd else lam


_DUALGPM_TOP = 32  # eigenpairs computed first when DualGPM grows a "remove" basis (all of them if these fall short)


def dualgpm_update(F_: torch.Tensor | None, kind: str | None, H: torch.Tensor, threshold: float):
    """One DualGPM step (InfLoRA's ``update_DualGPM``) for a layer with input covariance ``H`` (d × d).

    ``kind == "remove"``: ``F_`` spans the protected input directions (new A rows must avoid them);
    ``kind == "retain"``: ``F_`` spans the allowed directions (its complement is protected). Returns the new
    ``(F_, kind)``. The protected space grows until it holds ``threshold`` of H's energy (squared singular values);
    a protected basis larger than d/2 is stored by its complement instead.
    """
    d = H.shape[0]
    H = H.double()
    F_ = None if F_ is None else F_.to(H)
    total = float((H * H).sum())  # Σσ² = ‖H‖²_F: no decomposition needed for the total energy
    if total == 0.0:
        return F_, kind
    if F_ is None:  # first task: the top directions holding `threshold` of the energy
        U, energy = left_singular(H, psd=True)
        k = int((torch.cumsum(energy, 0) / total < threshold).sum())
        F_, kind = U[:, : max(k, 1)], "remove"
    elif kind == "remove":
        M = H - F_ @ (F_.T @ H)
        start = (total - float((M * M).sum())) / total  # the energy F_ holds already (Σσ² of M = ‖M‖²_F)
        for top in (min(d, _DUALGPM_TOP), d):  # usually a few directions reach the threshold: try the top ones first
            Ur, Er = left_singular(M, top=top)
            acc, k = start, 0
            while acc < threshold and k < len(Er):
                acc += float(Er[k]) / total
                k += 1
            if acc >= threshold or top == d:
                break
        if k:
            F_ = torch.cat([F_, Ur[:, :k]], 1)[:, :d]
    else:
        Uh, Eh = left_singular(F_ @ (F_.T @ H))
        acc = float(Eh.sum()) / total  # energy still in the allowed space
        k = 0
        while acc >= 1 - threshold and k < min(len(Eh), F_.shape[1]):
            acc -= float(Eh[k]) / total
            k += 1
        if k:
            Fm = F_ - Uh[:, :k] @ (Uh[:, :k].T @ F_)
            F_ = torch.linalg.svd(Fm, full_matrices=False)[0][:, : F_.shape[1] - k]
    if kind == "remove" and F_.shape[1] > d / 2:
        Q = torch.linalg.qr(F_, mode="complete")[0]  # orthonormal F: the last d - k columns span its complement
        F_, kind = Q[:, F_.shape[1]:], "retain"
    return F_.contiguous(), kind


def _patches(x: torch.Tensor, conv: nn.Conv2d, positions: Optional[int], gen: torch.Generator) -> torch.Tensor:
    """``(batch, L, in·kh·kw)``: the k×k input patches of ``conv`` (``F.unfold``'s order), at every output position or
    at ``positions`` random ones, gathered directly (unfolding every position first would cost more than the
    covariance saved)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    H, W = x.shape[-2:]
    ho, wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if positions is None or ho * wo <= positions:
        return F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw)).transpose(1, 2)
    keep = torch.randperm(ho * wo, generator=gen)[:positions].to(x.device)
    rows = (keep // wo)[:, None] * sh + torch.arange(kh, device=x.device) * dh  # (K, kh)
    cols = (keep % wo)[:, None] * sw + torch.arange(kw, device=x.device) * dw  # (K, kw)
    xp = F.pad(x, (pw, pw, ph, ph))
    p = xp[:, :, rows[:, :, None], cols[:, None, :]]  # (B, C, K, kh, kw)
    return p.permute(0, 2, 1, 3, 4).reshape(x.shape[0], positions, -1)


def _hooked_pass(strategy, layers, make_hook, batches) -> None:
    """The model in eval mode over ``batches`` of ``(x, task labels)`` with ``make_hook(name, layer)`` as a
    forward pre-hook on every layer; hooks removed and the mode restored afterwards."""
    model = unwrap(strategy.model)
    handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in layers]
    was_training = model.training
    model.eval()
    try:
        for x, t in batches:
            avalanche_forward(model, x.to(strategy.device), t.to(strategy.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


class InfLoRAPlugin(ClassMaskMixin, AdapterPluginMixin, SupervisedPlugin, supports_distributed=True):
    """One LoRA branch per task, summed with the frozen branches of earlier tasks; the new branch's A is *designed*
    from the task's input covariance projected by DualGPM and frozen, only B (and the head) trains.

    Before each experience the input covariance ``H`` of every adapted layer is accumulated on the experience's data
    (eval transforms, under the model so far; convs use their k×k input patches) and
    ``A = (top-r left singular vectors of H')ᵀ / sqrt(3)`` with ``H' = H`` on the first task, ``H - F Fᵀ H`` for a
    "remove" layer and ``F Fᵀ H`` for a "retain" one, so B A cannot touch the inputs of earlier tasks. After each
    experience the covariance is taken again and DualGPM grows the protected space to the energy threshold
    ``eps_t = lamb + (lame - lamb) · t / T``. All branches are summed at inference (no task identity needed).

    Follows liangyanshuo/InfLoRA @ e08b00edd54f2f10cf2f9826eae7d44fdcb6354b: covariance ``E[xᵀx]`` over all tokens
    (``models/vit_inflora.py`` L237), ``A = U[:, :r].T / sqrt(3)`` (``methods/inflora.py`` L127, L154), remove /
    retain projections (L149, L152), B from zero (``vit_inflora.py`` L206-207), only B and the task's head train
    (L103-108), threshold ``(lame - lamb) · t / T + lamb`` (L322) with ``k = #(cumsum < eps)`` (L332), cross-entropy
    over the current task's classes (L220-225); training recipe in :class:`InfLoRA`. Deviations kept:

    * the covariances use the experience's eval transforms (the official passes read the augmented train loader);
    * A is projected once more exactly onto the allowed space (the official code takes the top-r singular vectors of
      the projected covariance as they are: when that covariance has rank < r, the extra vectors are arbitrary and
      can point into protected inputs; otherwise the projection changes nothing but rounding), and a first-task
      basis larger than d/2 is stored by its complement (the official code would store it as "retain" and then
      fail its assert);
    * any Linear or ungrouped conv can be adapted (the paper: K and V of every ViT block), with one A per layer;
    * each covariance pass reads only the images it needs: ``cov_samples`` rows per input dimension in every
      adapted layer (``cov_samples · d`` rows; a ViT layer gets all tokens of each image read, a conv layer random
      k×k patch positions, a new draw per batch). A conv's patches have d = in·k·k dimensions, so the full
      product costs d/out ≈ k² times the conv itself at every position: over the whole experience the two passes
      cost several times the training (291 s against 80-96 s for the other methods on the retention protocol;
      with ``cov_samples=20`` and the top-r / top-32 eigenpairs below, InfLoRA's whole run is 1.3× merged LoRA's).
      ``cov_samples=0`` reads every image and position, as the official code. (Not a deviation: the designed A
      and DualGPM's growth take only the eigenpairs they use, from LAPACK's subset driver, exact to rounding.)

    :param target_modules, exclude_modules, trainable_modules: see :func:`models.add_lora` (Linear and ungrouped
        ``kxk_1x1`` Conv2d; the paper adapts K and V of every ViT block).
    :param r: rank of each task's branch (``configs/cifar100_inflora.json`` L28: 10).
    :param alpha: ``None`` means ``alpha = r`` (scale 1, as the official code, which has no scaling).
    :param lamb: first DualGPM energy threshold (L29: 0.95).
    :param lame: last DualGPM energy threshold (L30: 1.0).
    :param n_tasks: T in the threshold schedule; ``None`` takes the length of the training stream.
    :param cov_fraction: share of each experience used for the covariance passes (1.0, as the paper).
    :param cov_samples: rows per input dimension of each layer's covariance (its estimate of E[x xᵀ] is unbiased
        either way); 0: every image (of ``cov_fraction``) and position, as the official code.
    :param masked_loss: cross-entropy over the current experience's classes only (the paper's per-task heads).
    """

    _state_attrs = ("adapted_modules", "trained_tasks", "seen_classes", "subspaces", "subspace_kinds",
                    "subspace_history", "n_tasks")
    _layer_type, _layer_desc = SumLoRAMixin, "InfLoRA"

    def __init__(
        self,
        *,
        target_modules: Optional[Target] = "auto",
        r: int = 10,
        alpha: Optional[float] = None,
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        lamb: float = 0.95,
        lame: float = 1.0,
        n_tasks: Optional[int] = None,
        cov_fraction: float = 1.0,
        cov_samples: int = 20,
        masked_loss: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if cov_samples is None or cov_samples < 0:
            raise ValueError(f"cov_samples must be >= 1, or 0 for every image and position; got {cov_samples}.")
        self.cov_samples = cov_samples
        if not 0 < lamb <= lame <= 1:
            raise ValueError(f"InfLoRA needs 0 < lamb <= lame <= 1, got lamb={lamb}, lame={lame}.")
        if not 0 < cov_fraction <= 1:
            raise ValueError(f"cov_fraction must be in (0, 1], got {cov_fraction}.")
        self.lora_kwargs = dict(target_modules=target_modules, r=r, alpha=alpha, conv_mode="kxk_1x1",
                                exclude_modules=exclude_modules, trainable_modules=trainable_modules,
                                linear_cls=SumLoRALinear, conv_cls=SumLoRAConv2d)
        self.lamb, self.lame, self.n_tasks = lamb, lame, n_tasks
        self.cov_fraction, self.masked_loss, self.seed = cov_fraction, masked_loss, seed
        self.adapted_modules: list[str] = []
        self.trained_tasks: list[int] = []
        self.seen_classes: list[int] = []
        self.subspaces: dict[str, torch.Tensor] = {}
        self.subspace_kinds: dict[str, str] = {}
        self.subspace_history: list[dict] = []
        self._current_classes: list[int] = []

    def prepare(self, model: nn.Module) -> None:
        model = unwrap(model)
        if not self._named_layers(model):  # check the convs before injecting anything
            target, exclude = self.lora_kwargs["target_modules"], self.lora_kwargs["exclude_modules"]
            if isinstance(target, str) and target == "auto":
                target = auto_targets(model)
            for name, conv in model.named_modules():
                if (isinstance(conv, nn.Conv2d) and target is not None and matches(name, conv, target)
                        and not (exclude is not None and matches(name, conv, exclude))
                        and (conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str))):
                    raise ValueError(
                        f"InfLoRA designs A from the input patches of '{name}', which needs an ungrouped conv with "
                        f"numeric zero padding ({conv}); exclude it (exclude_modules)."
                    )
        super().prepare(model)
        for _, layer in self._named_layers(model):
            layer.lora_A.requires_grad_(False)  # designed, never trained

    def _named_layers(self, model):
        return [(n, m) for n, m in model.named_modules() if isinstance(m, SumLoRAMixin)]

    # -- input covariances ----------------------------------------------------------------------------------
    @torch.no_grad()
    def input_covariances(self, strategy) -> dict[str, torch.Tensor]:
        """``E[x xᵀ]`` of every adapted layer's input (its k×k patches for a conv) on the current experience."""
        model = unwrap(strategy.model)
        layers = self._named_layers(model)
        cov = {n: None for n, _ in layers}
        count = {n: 0 for n, _ in layers}
        gen = torch.Generator().manual_seed(self.seed + 7919 * len(self.subspace_history))
        fraction, positions = self.cov_fraction, {n: None for n, _ in layers}
        if self.cov_samples:  # the images (and conv positions) that give cov_samples · d rows per layer
            available = max(1, round(self.cov_fraction * len(strategy.experience.dataset)))
            shapes = self._input_shapes(strategy, layers)  # {name: (d, rows per image)}
            images = min(available, max(math.ceil(self.cov_samples * d / L) for d, L in shapes.values()))
            fraction = self.cov_fraction * images / available
            for n, layer in layers:
                d, L = shapes[n]
                if isinstance(layer.base_layer, nn.Conv2d):
                    positions[n] = min(L, math.ceil(self.cov_samples * d / images))

        def hook(name, layer):
            def fn(_module, args):
                x = args[0].detach()
                if isinstance(layer.base_layer, nn.Conv2d):
                    x = _patches(x, layer.base_layer, positions[name], gen)
                x = x.reshape(-1, x.shape[-1])
                h = (x.T @ x).double()  # the product in the input's precision, the sum over batches in double
                cov[name] = h if cov[name] is None else cov[name] + h
                count[name] += x.shape[0]
            return fn

        batches = ((b[0], b[-1]) for b in experience_loader(strategy, fraction, self.seed))
        _hooked_pass(strategy, layers, hook, batches)
        return {n: cov[n] / max(count[n], 1) for n in cov}

    @torch.no_grad()
    def _input_shapes(self, strategy, layers) -> dict:
        """``{name: (d, rows per image)}`` of every adapted layer's covariance, from one image."""
        shapes = {}

        def hook(name, layer):
            def fn(_module, args):
                x = args[0]
                if isinstance(layer.base_layer, nn.Conv2d):
                    x = _patches(x, layer.base_layer, None, None)
                shapes[name] = (x.shape[-1], x[:1].reshape(-1, x.shape[-1]).shape[0])
            return fn

        batch = next(iter(experience_loader(strategy, 1.0, self.seed)))
        _hooked_pass(strategy, layers, hook, [(batch[0][:1], batch[-1][:1])])
        return shapes

    # -- experience start: design A ---------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        t = int(strategy.experience.current_experience)
        if self.n_tasks is None:
            self.n_tasks = len(strategy.experience.origin_stream)
        self._note_classes(strategy)
        model = unwrap(strategy.model)
        covs = self.input_covariances(strategy)
        with torch.no_grad():
            for name, layer in self._named_layers(model):
                H = covs[name]
                F_, kind = self.subspaces.get(name), self.subspace_kinds.get(name)
                if F_ is not None:
                    F_ = F_.to(H)
                    H = H - F_ @ (F_.T @ H) if kind == "remove" else F_ @ (F_.T @ H)
                U = left_singular(H, psd=F_ is None, top=layer.r)[0]
                A = U.T
                if F_ is not None:  # exactly inside the allowed space (directions of zero energy included)
                    A = A - (A @ F_) @ F_.T if kind == "remove" else (A @ F_) @ F_.T
                layer.lora_A.copy_((A / math.sqrt(3)).reshape(layer.lora_A.shape).to(layer.lora_A))
                layer.lora_B.zero_()
                layer.current_task = t
                for p in layer.adapter_parameters():
                    strategy.optimizer.state.pop(p, None)

    # -- experience end: DualGPM, freeze the branch -----------------------------------------------------------
    def after_training_exp(self, strategy, **kwargs):
        t = int(strategy.experience.current_experience)
        covs = self.input_covariances(strategy)  # under the trained model, as the paper
        T = max(self.n_tasks or 1, 1)
        threshold = self.lamb + (self.lame - self.lamb) * t / T
        sizes = {}
        for name, layer in self._named_layers(unwrap(strategy.model)):
            F_, kind = dualgpm_update(self.subspaces.get(name), self.subspace_kinds.get(name), covs[name], threshold)
            self.subspaces[name], self.subspace_kinds[name] = F_.float().cpu(), kind
            d = F_.shape[0]
            sizes[name] = F_.shape[1] if kind == "remove" else d - F_.shape[1]  # protected dimensions
            layer.store_adapter(t)
        self.trained_tasks.append(t)
        self.subspace_history.append(dict(threshold=threshold, protected=sizes))

    def parameter_report(self, model: nn.Module) -> dict:
        """``stored``: backbone, every task's branch (A and B), head, and the DualGPM bases (kept for later tasks);
        ``inference``: the same without the bases (every branch is summed at inference)."""
        c = count_parameters(model)
        layers = [m for _, m in self._named_layers(model)]
        idle = sum(m.idle_parameters() for m in layers)
        bases = sum(f.numel() for f in self.subspaces.values())
        return dict(stored=c["total"] - idle + bases, inference=c["total"] - idle)


class InfLoRA(MethodStrategy):
    """Avalanche strategy: ``SupervisedTemplate`` plus :class:`InfLoRAPlugin` (Liang & Li, CVPR 2024).

    Recipe (liangyanshuo/InfLoRA @ e08b00e): a new Adam per task, lr 5e-4, betas (0.9, 0.999), no weight decay
    (``methods/inflora.py`` L168, L179; ``configs/cifar100_inflora.json`` L20-27), ``CosineSchedule`` stepped once
    per epoch, ``lr · cos(99π · e / (200 (K - 1)))`` (``utils/schedulers.py`` L54, ``inflora.py`` L238); 20 epochs,
    batch 128 on CIFAR-100. The InfLoRA options are those of :class:`InfLoRAPlugin`.
    """

    name = "inflora"
    recipe = TrainingRecipe(optimizer="adam", lr=5e-4, lr_schedule="cosine-inflora", schedule_step="epoch",
                            source="liangyanshuo/InfLoRA@e08b00e methods/inflora.py L168-180, utils/schedulers.py L54")
    plugin_class = InfLoRAPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        target_modules: Optional[Target] = "auto",
        r: int = 10,
        alpha: Optional[float] = None,
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        lamb: float = 0.95,
        lame: float = 1.0,
        n_tasks: Optional[int] = None,
        cov_fraction: float = 1.0,
        cov_samples: int = 20,
        masked_loss: bool = True,
        **base_kwargs,
    ):
        super().__init__(
            method_plugin=InfLoRAPlugin(
                target_modules=target_modules, r=r, alpha=alpha, exclude_modules=exclude_modules,
                trainable_modules=trainable_modules, lamb=lamb, lame=lame, n_tasks=n_tasks,
                cov_fraction=cov_fraction, cov_samples=cov_samples, masked_loss=masked_loss,
            ),
            model=model,
            optimizer=optimizer,
            **base_kwargs,
        )
