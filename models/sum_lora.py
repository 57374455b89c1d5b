"""Summed LoRA: the frozen adapters of earlier tasks and the current one, all applied to every sample.

``ΔW = Σ_i c_i · B_i A_i + c · B A``: a bank of frozen factors (one entry per finished task, the per-task bank of
:mod:`models.task_lora`) with a coefficient each, plus the trainable current adapter. InfLoRA, O-LoRA and SD-LoRA
differ only in how the current factors train and in the coefficients (SD-LoRA's learnable magnitudes). The branches
are stacked along the rank and run as one low-rank pass (or, without gradients, as one pass with ``W + ΔW``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .lora import LoRAConv2d, LoRALayer, LoRALinear
from .task_lora import TaskLoRAMixin

__all__ = ["SumLoRAMixin", "SumLoRALinear", "SumLoRAConv2d", "LoRAMagnitudes", "SDLoRALinear", "SDLoRAConv2d",
           "sum_layers"]


class SumLoRAMixin(TaskLoRAMixin):
    """Bank of frozen earlier adapters, summed with the current one (``current_task`` set while a task trains or
    until its adapter is stored; ``None`` leaves the current adapter out)."""

    def bank_coefficient(self, task: int) -> float | Tensor:
        """``c_i`` of bank entry ``task``."""
        return self.scaling

    def current_coefficient(self) -> float | Tensor:
        return self.scaling

    def _branches(self) -> list[tuple[Tensor, Tensor, float | Tensor]]:
        out = [(self.bank_A[k], self.bank_B[k], self.bank_coefficient(int(k))) for k in self.bank_A]
        if self.current_task is not None:
            out.append((self.lora_A, self.lora_B, self.current_coefficient()))
        return out

    def _effective_factors(self):
        branches = self._branches()
        if len(branches) == 1:
            return branches[0]
        # coefficients go on the small B factors; one stacked pass computes the whole sum
        A, B = self._stack_factors([a for a, _, _ in branches], [b * c for _, b, c in branches])
        return A, B, 1.0

    def current_delta_weight(self) -> Tensor:
        """The current adapter's update alone (what this task adds)."""
        if self.current_task is None:
            return torch.zeros_like(self.base_layer.weight)
        return self._lora_delta(self.lora_A, self.lora_B) * self.current_coefficient()

    def idle_parameters(self) -> int:
        """Size of the current factors while they are out of the sum (stored already, or no task started): they
        serve nothing and are not counted as stored or inference parameters."""
        return 0 if self.current_task is not None else self.lora_A.numel() + self.lora_B.numel()

    def store_adapter(self, task: int) -> None:
        """Freeze the current adapter as bank entry ``task`` and leave it out of the sum from now on."""
        super().store_adapter(task)
        self.current_task = None

    def forward(self, x: Tensor) -> Tensor:
        if not len(self.bank_A) and self.current_task is None:
            return self.base_layer(x)
        return LoRALayer.forward(self, x)

    def merge(self) -> None:
        raise RuntimeError("Summed adapters stay separate (one frozen branch per task); they are not merged.")


class SumLoRALinear(SumLoRAMixin, LoRALinear):
    """:class:`~models.lora.LoRALinear` with a frozen bank of earlier tasks' adapters, all summed."""

    def __init__(self, base_layer: nn.Linear, **kwargs):
        super().__init__(base_layer, **kwargs)
        self._init_tasks()


class SumLoRAConv2d(SumLoRAMixin, LoRAConv2d):
    """:class:`~models.lora.LoRAConv2d` with a frozen bank of earlier tasks' adapters, all summed."""

    def __init__(self, base_layer: nn.Conv2d, **kwargs):
        super().__init__(base_layer, **kwargs)
        self._init_tasks()


class LoRAMagnitudes(nn.Module):
    """SD-LoRA's magnitudes, shared by every layer: ``current`` for the direction being learnt and one per frozen
    direction in ``past`` (keyed by task), all learnable."""

    def __init__(self, init: float = 0.8):
        super().__init__()
        self.init = float(init)
        self.current = nn.Parameter(torch.tensor(self.init))
        self.past = nn.ParameterDict()

    def freeze_current(self, task: int) -> None:
        """Direction ``task`` becomes a past one with a fresh magnitude; the current one restarts at ``init``."""
        self.past[str(task)] = nn.Parameter(torch.tensor(self.init, device=self.current.device))
        with torch.no_grad():
            self.current.fill_(self.init)

    def reset_past(self) -> None:
        """Every past magnitude back at ``init`` (SD-LoRA's code re-creates them with the backbone each task)."""
        with torch.no_grad():
            for p in self.past.values():
                p.fill_(self.init)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in state_dict:  # magnitudes of tasks this fresh module has not seen yet
            if key.startswith(f"{prefix}past.") and key[len(f"{prefix}past."):] not in self.past:
                self.past[key[len(f"{prefix}past."):]] = nn.Parameter(torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _SDLoRAMixin(SumLoRAMixin):
    """Bank entries hold unit-Frobenius-norm factors (directions); coefficients are the shared magnitudes."""

    def _init_magnitudes(self) -> None:
        # a plain attribute, not a submodule: the model registers the shared module once (see SDLoRAPlugin)
        object.__setattr__(self, "magnitudes", None)

    def _mags(self) -> LoRAMagnitudes:
        if self.magnitudes is None:
            raise RuntimeError("This SD-LoRA layer has no magnitudes attached; SDLoRAPlugin.prepare attaches them.")
        return self.magnitudes

    def bank_coefficient(self, task: int):
        return self._mags().past[str(task)]

    def current_coefficient(self):
        return self._mags().current * self.scaling

    def store_adapter(self, task: int) -> None:
        """Freeze the normalised direction ``B A / (‖B‖_F ‖A‖_F)`` as two unit-norm factors."""
        with torch.no_grad():
            a, b = self.lora_A.norm(), self.lora_B.norm()
            if a == 0 or b == 0:
                raise RuntimeError(f"Cannot normalise a zero adapter (‖A‖={float(a):g}, ‖B‖={float(b):g}): "
                                   "the task did not train it.")
        self.bank_A[str(task)] = nn.Parameter(self.lora_A.detach() / a, requires_grad=False)
        self.bank_B[str(task)] = nn.Parameter(self.lora_B.detach() / b, requires_grad=False)
        self.current_task = None


class SDLoRALinear(_SDLoRAMixin, LoRALinear):
    """SD-LoRA layer on an ``nn.Linear``: ``ΔW = Σ_i α_i B̂_i Â_i + α · s · B A``."""

    def __init__(self, base_layer: nn.Linear, **kwargs):
        super().__init__(base_layer, **kwargs)
        self._init_tasks()
        self._init_magnitudes()


class SDLoRAConv2d(_SDLoRAMixin, LoRAConv2d):
    """SD-LoRA layer on an ``nn.Conv2d``: ``ΔW = Σ_i α_i B̂_i Â_i + α · s · B A``."""

    def __init__(self, base_layer: nn.Conv2d, **kwargs):
        super().__init__(base_layer, **kwargs)
        self._init_tasks()
        self._init_magnitudes()


def sum_layers(model: nn.Module) -> list[SumLoRAMixin]:
    return [m for m in model.modules() if isinstance(m, SumLoRAMixin)]
