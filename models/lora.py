"""LoRA layers that wrap a frozen base layer (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
ICLR 2022).

Each layer keeps the pretrained ``base_layer`` untouched (PEFT style: wrapping, not subclassing), adds a low-rank
update ``ΔW = scaling · B A`` and exposes explicit :meth:`LoRALayer.merge` / :meth:`LoRALayer.unmerge`. Nothing
happens on ``.eval()`` / ``.train()``: Avalanche toggles modes around every evaluation, so an implicit merge would
keep rewriting the base weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["LoRALayer", "LoRALinear", "LoRAConv2d", "CONV_MODES", "lora_scaling", "lora_linear", "lora_conv2d"]

CONV_MODES = ("kxk_1x1", "loralib")


def lora_scaling(r: int, alpha: float | None, rslora: bool = False) -> float:
    """The factor in front of ``B A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023).

    ``alpha=None`` means ``alpha = r`` (scale 1 without rsLoRA).
    """
    _check_rank_alpha(r, alpha)
    alpha = float(r) if alpha is None else float(alpha)
    return alpha / math.sqrt(r) if rslora else alpha / r


def _check_rank_alpha(r, alpha) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}.")
    if alpha is not None and not (float(alpha) > 0 and math.isfinite(float(alpha))):
        raise ValueError(f"LoRA alpha must be a positive finite number (or None for alpha = r), got {alpha!r}.")


class LoRALayer(nn.Module):
    """Base class: a frozen ``base_layer`` plus trainable ``lora_A`` / ``lora_B``.

    Subclasses define the parameter shapes, :meth:`delta_weight` and :meth:`_lora_forward`.

    :param base_layer: the layer to adapt; its parameters are frozen (``requires_grad=False``).
    :param r: rank of the update.
    :param alpha: LoRA alpha; ``None`` means ``alpha = r`` (scale 1).
    :param dropout: dropout probability on the adapter's input (0 keeps dropout off the path).
    :param rslora: use ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    def __init__(
        self, base_layer: nn.Module, *, r: int, alpha: float | None = None, dropout: float = 0.0, rslora: bool = False
    ):
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
        self.base_layer = base_layer
        self.r = r
        self.alpha = float(r) if alpha is None else float(alpha)
        self.rslora = bool(rslora)
        self.scaling = lora_scaling(r, alpha, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    # -- the layer type's low-rank algebra, for any pair of factors (variants reuse it for banks, gates, ...) --
    def _lora_delta(self, A: Tensor, B: Tensor) -> Tensor:
        """Unscaled ``B A`` in the base weight's shape."""
        raise NotImplementedError

    def _lora_apply(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """Unscaled ``B A`` applied to ``x`` (same result as a base-layer pass with weight ``_lora_delta(A, B)``)."""
        raise NotImplementedError

    def _stack_factors(self, As: list[Tensor], Bs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """One pair ``(A, B)`` with ``B A = Σ_i B_i A_i``: the factors stacked along the rank (variants that sum
        several adapters run them as one low-rank pass)."""
        return torch.cat(As, 0), torch.cat(Bs, 1)

    def _effective_factors(self) -> tuple[Tensor, Tensor, float | Tensor]:
        """``(A, B, scale)`` of the update ``scale · B A``; variants (gates, magnitudes) override only this."""
        return self.lora_A, self.lora_B, self.scaling

    def delta_weight(self) -> Tensor:
        """``scaling · B A`` in the base weight's shape (what :meth:`merge` adds)."""
        A, B, s = self._effective_factors()
        return self._lora_delta(A, B) * s

    def _lora_forward(self, x: Tensor) -> Tensor:
        A, B, s = self._effective_factors()
        return self._lora_apply(x, A, B) * s

    def _lora_add(self, out: Tensor, x: Tensor) -> Tensor:
        """``out + scale · B A x``; layer types fuse it."""
        return out + self._lora_forward(x)

    # -- shared behaviour ---------------------------------------------------------------------------------------
    def reset_lora_parameters(self) -> None:
        """Fresh adapter for the next task: A Kaiming-uniform, B zeros, so ``ΔW = 0``.

        Done in place, so an optimizer that holds ``lora_A`` / ``lora_B`` keeps training them (clear its state for
        them if the previous task's moments must not carry over). If the layer was merged, the merged update stays
        in the base weight for good and the layer counts as unmerged again.
        """
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        self.merged = False

    def merge(self) -> None:
        """Add ``delta_weight()`` into the base weight. Idempotent: a merged layer is left as it is."""
        if self.merged:
            return
        with torch.no_grad():
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``delta_weight()`` from the base weight. Idempotent: an unmerged layer is left as it is."""
        if not self.merged:
            return
        with torch.no_grad():
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def merge_and_reset(self) -> None:
        """Merge, then start a fresh adapter (the incremental-merge protocol's end of task)."""
        self.merge()
        self.reset_lora_parameters()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._through_weight():
            # e.g. inference: one pass with W + ΔW (ΔW is small to form) instead of the base pass plus two low-rank
            A, B, s = self._effective_factors()
            return self._forward_with_weight(x, self._weight_plus(A, B, s))
        return self._train_forward(x)

    def _train_forward(self, x: Tensor) -> Tensor:
        """The pass with gradients: the base pass plus the low-rank ones; layer types fuse them."""
        return self._lora_add(self.base_layer(x), self.lora_dropout(x))

    def _forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base layer's computation with another weight."""
        raise NotImplementedError

    def _weight_plus(self, A: Tensor, B: Tensor, s) -> Tensor:
        """``W + s · B A`` in the base weight's shape; layer types form it in one fused product-and-add."""
        return self.base_layer.weight + self._lora_delta(A, B) * s

    def _through_weight(self) -> bool:
        """Whether to apply the update as one pass with ``W + ΔW`` (always without gradients; in training where the
        layer type finds it cheaper than the low-rank passes). Needs no dropout on the adapter's input."""
        return isinstance(self.lora_dropout, nn.Identity) and not torch.is_grad_enabled()

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


class _LoRALinearFunction(torch.autograd.Function):
    """``y = x (W + B' A)ᵀ + b`` (``B' = s·B``) and its gradients, reading the full-size activation ``x`` and output
    gradient ``g`` as few times as the math allows (on a CPU a LoRA layer's cost is memory traffic, not arithmetic):

    * forward: ``W' = W + B' A`` (out × in: the size of a weight, not of an activation), ``y = x W'ᵀ + b`` (the
      frozen layer's own GEMM: no separate read-add-write of ``y``), ``h = x Aᵀ`` (N × r, saved);
    * backward: ``grad_x = g W'`` (the frozen layer's own input-gradient GEMM; LoRA's term ``(g B') A`` rides in
      it, no second product to accumulate), ``u = g B'``, ``grad_A = uᵀ x``, ``grad_B' = gᵀ h``.

    Autograd over ``base(x) + B'(A x)`` does the same arithmetic with one more pass over ``y`` in the forward and,
    in the backward, a separate N × in input-gradient product plus its accumulation.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, Bs: Tensor) -> Tensor:
        w = torch.addmm(weight, Bs, A)
        y = F.linear(x, w, bias)
        h = F.linear(x, A)
        ctx.save_for_backward(x, w, A, Bs, h)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable  # a second derivative through it raises instead of silently missing terms
    def backward(ctx, g: Tensor):
        x, w, A, Bs, h = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        if need_x:
            grad_x = (g2 @ w).view(x.shape)
        # the skinny products in the operand layouts BLAS streams fastest (measured on CPU, N = 4160, d = 768, r = 8:
        # g (Bᵀ)ᵀ with Bᵀ contiguous 1.1 ms against 4.5 ms for g B; (hᵀ g)ᵀ 0.8 ms against 7.6 ms for gᵀ h)
        if need_A:
            grad_A = F.linear(g2, Bs.t().contiguous()).t() @ x2
        if need_B:
            grad_B = (h.reshape(-1, h.shape[-1]).t() @ g2).t()
        if need_w:  # a trainable base weight (this library freezes it): the gradient of x Wᵀ
            grad_w = g2.t() @ x2
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, grad_A, grad_B


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale=1.0) -> Tensor:
    """``F.linear(x, weight, bias) + scale · (x Aᵀ) Bᵀ`` with gradients for every input that requires one, through
    :class:`_LoRALinearFunction` (the scale is put on the small ``B`` first, so a learnt scale gets its gradient
    from autograd). Under autocast it falls back to the unfused expression, which autocast knows how to cast."""
    Bs = B * scale
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias) + F.linear(F.linear(x, A), Bs)
    return _LoRALinearFunction.apply(x, weight, bias, A, Bs)


class _LoRAConvFunction(torch.autograd.Function):
    """The k×k / 1×1 LoRA conv (HF PEFT's shape) and its gradients, with the frozen conv's own passes carrying the
    update, as :class:`_LoRALinearFunction` does for Linear (``B'`` = s·B, grouped per the base conv's groups):

    * forward: ``W' = W + B' A`` (per group, weight-sized), ``y = conv(x, W') + b``, ``h = conv_A(x)`` (r channels,
      saved);
    * backward: ``grad_x = conv_inputgrad(g, W')`` (the frozen conv's own; LoRA's term rides in it),
      ``u = B'ᵀ g`` (1×1, r channels), ``grad_A = conv_weightgrad(x, u)``, ``grad_B' = conv_weightgrad(h, g)`` (1×1).

    Autograd over ``base(x) + conv1x1_B'(conv_A(x))`` computes the full-size 1×1 output and adds it in the forward,
    and runs A's k×k input-gradient conv (N × in × H × W) and its accumulation in the backward; training through
    ``conv(x, W + ΔW)`` under autograd instead pays the base conv's full weight gradient. ``x`` arrives padded when
    the conv pads other than with zeros (``padding`` is then 0).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, Bs, stride, padding, dilation, groups):
        out_c = weight.shape[0]
        w = torch.baddbmm(weight.reshape(groups, out_c // groups, -1), Bs.reshape(groups, out_c // groups, -1),
                          A.reshape(groups, A.shape[0] // groups, -1)).reshape(weight.shape)
        y = F.conv2d(x, w, bias, stride, padding, dilation, groups)
        h = F.conv2d(x, A, None, stride, padding, dilation, groups)
        ctx.save_for_backward(x, w, A, Bs, h)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, w, A, Bs, h = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        if need_x:
            grad_x = torch.nn.grad.conv2d_input(x.shape, w, g, stride, padding, dilation, groups)
        if need_A:
            u = F.conv_transpose2d(g, Bs, groups=groups)  # B'ᵀ g: the 1×1 conv's input gradient
            grad_A = torch.nn.grad.conv2d_weight(x, A.shape, u, stride, padding, dilation, groups)
        if need_B:
            grad_B = torch.nn.grad.conv2d_weight(h, Bs.shape, g, 1, 0, 1, groups)
        if need_w:  # a trainable base weight (this library freezes it)
            grad_w = torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding, dilation, groups)
        if need_b and ctx.has_bias:
            grad_b = g.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None, None


def lora_conv2d(x: Tensor, conv: nn.Conv2d, A: Tensor, B: Tensor, scale=1.0) -> Tensor:
    """``conv(x) + scale · conv1x1_B(conv_A(x))`` (A a k×k conv with ``conv``'s stride, padding, dilation, padding
    mode and groups; B a 1×1 conv grouped alike), through :class:`_LoRAConvFunction`. Under autocast it falls back
    to the unfused expression."""
    Bs = B * scale
    if torch.is_autocast_enabled(x.device.type):
        return conv(x) + F.conv2d(conv._conv_forward(x, A, None), Bs, groups=conv.groups)
    padding = conv.padding
    if conv.padding_mode != "zeros":  # what nn.Conv2d does: pad by hand, then convolve without padding
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = (0, 0)
    if isinstance(padding, str):  # "same" / "valid": a string nn.Conv2d resolves per call
        return conv(x) + F.conv2d(conv._conv_forward(x, A, None), Bs, groups=conv.groups)
    return _LoRAConvFunction.apply(x, conv.weight, conv.bias, A, Bs, conv.stride, padding, conv.dilation,
                                   conv.groups)


class LoRALinear(LoRALayer):
    """LoRA around an ``nn.Linear``: ``y = base(x) + scaling · B(A(dropout(x)))``.

    ``lora_A`` has shape (r, in_features), ``lora_B`` (out_features, r).
    """

    def __init__(self, base_layer: nn.Linear, *, r: int, alpha=None, dropout=0.0, rslora=False):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}.")
        _check_rank_alpha(r, alpha)
        d_out, d_in = base_layer.weight.shape
        if r > min(d_in, d_out):
            raise ValueError(
                f"LoRA rank r={r} exceeds min(in_features, out_features) = {min(d_in, d_out)} of "
                f"Linear({d_in}, {d_out}); use r <= {min(d_in, d_out)}."
            )
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, d_in, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, device=w.device, dtype=w.dtype))
        self.reset_lora_parameters()

    def _lora_delta(self, A: Tensor, B: Tensor) -> Tensor:
        return B @ A

    def _lora_apply(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return F.linear(F.linear(x, A), B)

    def _forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.base_layer.bias)

    def _weight_plus(self, A: Tensor, B: Tensor, s) -> Tensor:
        if isinstance(s, Tensor):  # a learnt magnitude: on the small factor, then one addmm
            return torch.addmm(self.base_layer.weight, B * s, A)
        return torch.addmm(self.base_layer.weight, B, A, alpha=s)

    def _train_forward(self, x: Tensor) -> Tensor:
        if not isinstance(self.lora_dropout, nn.Identity):  # the adapter sees another input than the base layer
            return super()._train_forward(x)
        A, B, s = self._effective_factors()
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, A, B, s)

    def _lora_add(self, out: Tensor, x: Tensor) -> Tensor:
        # one fused addmm: the scale goes on the small B, the sum into the product's output
        A, B, s = self._effective_factors()
        h = F.linear(x, A)
        d_out = out.shape[-1]
        return torch.addmm(out.reshape(-1, d_out), h.reshape(-1, h.shape[-1]), (B * s).t()).view(out.shape)


class LoRAConv2d(LoRALayer):
    """LoRA around an ``nn.Conv2d``, in one of two shapes (``conv_mode``):

    * ``"kxk_1x1"`` (HF PEFT): A is a k×k conv in→r with the base conv's stride, padding, dilation and padding
      mode; B is a 1×1 conv r→out. ``ΔW`` has rank ≤ r in its (out, in·k·k) unfolding. Grouped convs are supported
      when ``r`` is a multiple of ``groups`` (A and B are then grouped too, so ``ΔW`` has the base weight's shape).
    * ``"loralib"`` (microsoft/LoRA ``ConvLoRA``, used by the ConvLoRA papers): A is (r·k, in·k), B (out·k, r·k),
      and ``B @ A`` is viewed as (out, in, k, k); its rank is ≤ r·k. Needs a square kernel and ``groups == 1``.
      The forward pass convolves once with ``W + ΔW``.
    """

    def __init__(self, base_layer: nn.Conv2d, *, r: int, alpha=None, dropout=0.0, rslora=False, conv_mode="kxk_1x1"):
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps nn.Conv2d, got {type(base_layer).__name__}.")
        if conv_mode not in CONV_MODES:
            raise ValueError(f"Unknown conv_mode {conv_mode!r}; choose one of {', '.join(CONV_MODES)}.")
        _check_rank_alpha(r, alpha)
        out_c, in_per_group, kh, kw = base_layer.weight.shape
        g = base_layer.groups
        in_c = in_per_group * g
        desc = f"Conv2d({in_c}, {out_c}, kernel_size=({kh}, {kw}), groups={g})"
        if conv_mode == "loralib":
            if g != 1:
                raise ValueError(
                    f"conv_mode='loralib' cannot adapt the grouped/depthwise {desc}: its (out·k, in·k) reshape is only "
                    "valid for groups=1. Use conv_mode='kxk_1x1' or exclude this layer (exclude_modules)."
                )
            if kh != kw:
                raise ValueError(f"conv_mode='loralib' needs a square kernel, got {desc}; use conv_mode='kxk_1x1'.")
            if r > min(in_c, out_c):
                raise ValueError(f"LoRA rank r={r} exceeds min(in, out) = {min(in_c, out_c)} of {desc} (loralib mode).")
        else:
            if r % g != 0:
                raise ValueError(
                    f"conv_mode='kxk_1x1' on the grouped {desc} needs r to be a multiple of groups={g}, got r={r}; "
                    "or exclude this layer (exclude_modules)."
                )
            max_r = g * min(out_c // g, in_per_group * kh * kw)
            if r > max_r:
                raise ValueError(f"LoRA rank r={r} exceeds the largest rank {max_r} that {desc} allows; use r <= {max_r}.")
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        self.conv_mode = conv_mode
        w = base_layer.weight
        kw_ = dict(device=w.device, dtype=w.dtype)
        if conv_mode == "loralib":
            self.lora_A = nn.Parameter(torch.empty(r * kh, in_c * kh, **kw_))
            self.lora_B = nn.Parameter(torch.empty(out_c * kh, r * kh, **kw_))
        else:
            self.lora_A = nn.Parameter(torch.empty(r, in_per_group, kh, kw, **kw_))
            self.lora_B = nn.Parameter(torch.empty(out_c, r // g, 1, 1, **kw_))
        self.reset_lora_parameters()

    def _lora_delta(self, A: Tensor, B: Tensor) -> Tensor:
        w = self.base_layer.weight
        if self.conv_mode == "loralib":
            return (B @ A).view(w.shape)
        g = self.base_layer.groups
        # per group: B_g (out/g, r_g) @ A_g (r_g, in/g·k·k)
        a = A.reshape(g, A.shape[0] // g, -1)
        b = B.reshape(g, w.shape[0] // g, B.shape[1])
        return torch.bmm(b, a).reshape(w.shape)

    def _stack_factors(self, As: list[Tensor], Bs: list[Tensor]) -> tuple[Tensor, Tensor]:
        g = self.base_layer.groups
        if self.conv_mode == "loralib" or g == 1:
            return super()._stack_factors(As, Bs)
        # grouped: A's output channels are group-major, so each group's ranks of every adapter must stay together
        A = torch.cat([a.reshape(g, a.shape[0] // g, *a.shape[1:]) for a in As], 1)
        return A.reshape(-1, *As[0].shape[1:]), torch.cat(Bs, 1)

    def _lora_apply(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        base = self.base_layer
        if self.conv_mode == "loralib":
            return base._conv_forward(x, self._lora_delta(A, B), None)
        # A reuses the base conv's stride/padding/dilation/padding_mode/groups; B is a 1×1 conv
        return F.conv2d(base._conv_forward(x, A, None), B, groups=base.groups)

    def _train_forward(self, x: Tensor) -> Tensor:
        if self.conv_mode == "loralib" or not isinstance(self.lora_dropout, nn.Identity):
            return super()._train_forward(x)
        A, B, s = self._effective_factors()
        return lora_conv2d(x, self.base_layer, A, B, s)

    def _lora_add(self, out: Tensor, x: Tensor) -> Tensor:
        if self.conv_mode == "loralib":
            return out + self._lora_forward(x)
        A, B, s = self._effective_factors()
        base = self.base_layer
        # the scale goes on the small 1×1 weight; the conv output is not saved for backward, so add in place
        return out.add_(F.conv2d(base._conv_forward(x, A, None), B * s, groups=base.groups))

    def _forward_with_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)

    def _weight_plus(self, A: Tensor, B: Tensor, s) -> Tensor:
        w = self.base_layer.weight
        if isinstance(s, Tensor):
            B, s = B * s, 1.0
        if self.conv_mode == "loralib":
            return torch.addmm(w.view(B.shape[0], A.shape[1]), B, A, alpha=s).view(w.shape)
        g = self.base_layer.groups
        a = A.reshape(g, A.shape[0] // g, -1)
        b = B.reshape(g, w.shape[0] // g, B.shape[1])
        return torch.baddbmm(w.reshape(g, w.shape[0] // g, -1), b, a, alpha=s).reshape(w.shape)

    def _merged_weight_training(self) -> bool:
        """Train through ``conv(x, W + ΔW)`` under autograd (the base conv's full weight gradient, then the small
        products down to A and B) rather than the fused low-rank function when A's k×k conv to r channels is
        relatively costly: it costs r/out of the base conv, forward and weight gradient. Measured on CPU
        (``experiments.bench_speed``: the CIFAR ResNet-32 at r = 8, out 16-64, 1.66× the frozen floor fused and
        1.2× through the weight), the weight form wins from r/out >= 1/8. The loralib shape's B A (r·k, in·k)
        does not factor into two convs: it always goes through its weight."""
        return self.conv_mode == "loralib" or 8 * self.r >= self.base_layer.out_channels

    def _through_weight(self) -> bool:
        return isinstance(self.lora_dropout, nn.Identity) and (
            not torch.is_grad_enabled() or self._merged_weight_training())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, conv_mode={self.conv_mode!r}"
