"""Stiefel LoRA (EBLoRA): ``ΔW = scaling · s · U Vᵀ`` with orthonormal U, V and V orthogonal to a subspace F.

Gu, Luo et al., "Spectral Imbalance Causes Forgetting in Low-Rank Continual Adaptation" (EBLoRA), ICML 2026,
arXiv:2602.00722. ``lora_B`` holds U (d_out × r), ``lora_A`` holds Vᵀ (r × d_in, for convs r × in·k·k), ``lora_scale``
the magnitude s, and the ``subspace`` buffer F (d_in × k) the earlier tasks' gradient directions. Every singular value
of ΔW equals |scaling · s|: the spectrum is flat by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .lora import LoRAConv2d, LoRALinear

__all__ = ["StiefelLoRAMixin", "StiefelLoRALinear", "StiefelLoRAConv2d", "polar", "orthonormal_complement_basis"]


def polar(m: Tensor) -> Tensor:
    """The orthonormal factor of the polar decomposition (the closest matrix with orthonormal columns); batched
    over leading dimensions.

    Computed as ``M (MᵀM)^(-1/2)`` from the eigendecomposition of the small r × r Gram matrix in float64 (EBLoRA
    calls this on every layer after every step; an SVD of the tall M costs several times more), falling back to
    ``U Vᵀ`` of an SVD when M is near rank-deficient."""
    m64 = m.double()
    lam, Q = torch.linalg.eigh(m64.mT @ m64)
    if bool((lam[..., 0] > 1e-10 * lam[..., -1].clamp_min(1e-300)).all()):
        return (m64 @ (Q * lam.rsqrt().unsqueeze(-2)) @ Q.mT).to(m.dtype)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def orthonormal_complement_basis(n: int, r: int, F: Tensor | None = None, *, generator=None, like: Tensor) -> Tensor:
    """``r`` random orthonormal columns in R^n, orthogonal to the columns of ``F``."""
    m = torch.randn(n, r, generator=generator, dtype=torch.float64).to(like.device)
    if F is not None and F.numel():
        F64 = F.to(torch.float64)
        m = m - F64 @ (F64.T @ m)
    q, _ = torch.linalg.qr(m)
    if F is not None and F.numel():  # one more pass removes the rounding left by the first
        q = q - F64 @ (F64.T @ q)
        q, _ = torch.linalg.qr(q)
    return q.to(like.dtype)


class StiefelLoRAMixin:
    """Orthonormal factors, a learnable magnitude and a protected input subspace for a LoRA layer."""

    def _init_stiefel(self) -> None:
        self.active_r = self.r  # columns of U, V in use; fewer when F leaves fewer free input directions
        self.lora_scale = nn.Parameter(torch.zeros((), device=self.lora_A.device, dtype=self.lora_A.dtype))
        self.register_buffer("subspace", torch.zeros(self.fan_in, 0, device=self.lora_A.device,
                                                     dtype=self.lora_A.dtype))
        if self.r > self.fan_out:
            raise ValueError(f"EBLoRA rank r={self.r} exceeds the layer's output dimension {self.fan_out}.")
        self.reset_lora_parameters()

    @property
    def fan_in(self) -> int:
        return self.lora_A[0].numel()

    @property
    def fan_out(self) -> int:
        return self.lora_B.shape[0]

    def free_dim(self) -> int:
        """Input dimensions left for a new update: ``d_in - rank(F)``."""
        return self.fan_in - self.subspace.shape[1]

    def U(self) -> Tensor:
        return self.lora_B.view(self.fan_out, self.r)

    def V(self) -> Tensor:
        return self.lora_A.view(self.r, self.fan_in).T

    @torch.no_grad()
    def set_factors(self, U: Tensor, V: Tensor) -> None:
        self.lora_B.copy_(U.reshape(self.lora_B.shape))
        self.lora_A.copy_(V.T.reshape(self.lora_A.shape))

    def _effective_factors(self):
        return self.lora_A, self.lora_B, self.scaling * self.lora_scale

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Random orthonormal U, V (V ⟂ F) and s = 0, so ΔW = 0. When F leaves fewer than r free input directions
        only ``active_r = free_dim()`` columns are used (the others are zero)."""
        if not hasattr(self, "subspace"):  # called by LoRALayer.__init__ before the factors are set up
            return
        k = self.active_r = min(self.r, self.free_dim())
        U = torch.zeros(self.fan_out, self.r, dtype=self.lora_B.dtype, device=self.lora_B.device)
        V = torch.zeros(self.fan_in, self.r, dtype=self.lora_A.dtype, device=self.lora_A.device)
        if k:
            U[:, :k] = orthonormal_complement_basis(self.fan_out, k, like=self.lora_B)
            V[:, :k] = orthonormal_complement_basis(self.fan_in, k, self.subspace, like=self.lora_A)
        self.set_factors(U, V)
        self.lora_scale.zero_()
        self.merged = False

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B, self.lora_scale]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "subspace"
        if key in state_dict and state_dict[key].shape != self.subspace.shape:
            self.subspace = torch.empty_like(state_dict[key])  # F grows task after task
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class StiefelLoRALinear(StiefelLoRAMixin, LoRALinear):
    def __init__(self, base_layer: nn.Linear, **kwargs):
        super().__init__(base_layer, **kwargs)
        self._init_stiefel()


class StiefelLoRAConv2d(StiefelLoRAMixin, LoRAConv2d):
    """Needs ``conv_mode="kxk_1x1"`` and ``groups=1``: U, V are then the factors of the (out, in·k·k) unfolding."""

    def __init__(self, base_layer: nn.Conv2d, *, conv_mode: str = "kxk_1x1", **kwargs):
        if conv_mode != "kxk_1x1" or base_layer.groups != 1:
            raise ValueError(
                "EBLoRA needs conv_mode='kxk_1x1' on an ungrouped Conv2d (its Stiefel factors live on the "
                f"(out, in·k·k) unfolding); got conv_mode={conv_mode!r}, groups={base_layer.groups}. "
                "Exclude grouped convs with exclude_modules."
            )
        super().__init__(base_layer, conv_mode=conv_mode, **kwargs)
        self._init_stiefel()
