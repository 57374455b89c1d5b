"""Gate-LoRA (CoDyRA): ``ΔW = scaling · B diag(w) A`` with a learnable per-rank importance vector ``w``.

Lu et al., "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language Models
with Dynamic Rank-Selective LoRA" (CoDyRA), arXiv:2412.01004. A soft threshold on ``w`` (see
:class:`strategies.codyra.CoDyRAPlugin`) drives unimportant ranks to exactly zero; those ranks vanish from ΔW.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoRAConv2d, LoRALinear

__all__ = ["GateLoRAMixin", "GateLoRALinear", "GateLoRAConv2d", "GATE_INITS"]

GATE_INITS = ("randn", "ones")


class GateLoRAMixin:
    """Adds ``lora_gate`` (one entry per row of A: r, or r·k for loralib convs) to a LoRA layer."""

    def _init_gate(self, gate_init: str) -> None:
        if gate_init not in GATE_INITS:
            raise ValueError(f"Unknown gate_init {gate_init!r}; choose one of {', '.join(GATE_INITS)}.")
        self.gate_init = gate_init
        self.lora_gate = nn.Parameter(torch.empty(self.lora_A.shape[0], device=self.lora_A.device,
                                                  dtype=self.lora_A.dtype))
        self._reset_gate()

    def _reset_gate(self) -> None:
        with torch.no_grad():
            if self.gate_init == "randn":  # the official code's init (N(0, 1))
                self.lora_gate.normal_()
            else:
                self.lora_gate.fill_(1.0)

    def _effective_factors(self):
        gated_A = self.lora_A * self.lora_gate.view(-1, *([1] * (self.lora_A.ndim - 1)))
        return gated_A, self.lora_B, self.scaling

    def reset_lora_parameters(self) -> None:
        super().reset_lora_parameters()
        if hasattr(self, "lora_gate"):
            self._reset_gate()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B, self.lora_gate]

    def kept_rank(self) -> int:
        """Ranks whose gate is not exactly zero."""
        return int(torch.count_nonzero(self.lora_gate.detach()))


class GateLoRALinear(GateLoRAMixin, LoRALinear):
    def __init__(self, base_layer: nn.Linear, *, gate_init: str = "randn", **kwargs):
        super().__init__(base_layer, **kwargs)
        self._init_gate(gate_init)


class GateLoRAConv2d(GateLoRAMixin, LoRAConv2d):
    def __init__(self, base_layer: nn.Conv2d, *, gate_init: str = "randn", **kwargs):
        super().__init__(base_layer, **kwargs)
        self._init_gate(gate_init)
