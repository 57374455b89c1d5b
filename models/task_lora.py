"""Per-task LoRA: one adapter per task on each layer, routed per sample by task label.

The layer trains one *current* adapter (``lora_A`` / ``lora_B``, the same tensors for every task, so optimizers
keep them); at the end of a task a frozen copy goes into a bank keyed by the task id. A sample with task label t
uses bank entry t, or the current adapter while t is being trained. Earlier tasks' outputs are therefore
bit-identical after later tasks train (the base weight, their adapter and their head are all frozen).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .lora import LoRAConv2d, LoRALinear

__all__ = ["TaskLoRAMixin", "TaskLoRALinear", "TaskLoRAConv2d", "TaskCopy", "TaskBatchNorm", "set_task_routing",
           "task_layers", "BASE_ROUTE"]


BASE_ROUTE = -1  # route to the bare backbone: no adapter, the pretrained BatchNorm


def _routing_groups(labels, batch: int):
    """``[(task, mask or None)]``: one group without a mask when the whole batch has one task."""
    if labels is None:
        raise RuntimeError(
            "No task labels are routed to this per-task layer; call models.set_task_routing(model, labels) before "
            "the forward pass (PerTaskLoRAPlugin does it from the mini-batch's task labels)."
        )
    if isinstance(labels, int):
        return [(labels, None)]
    if labels.numel() != batch:
        raise RuntimeError(f"{labels.numel()} routed task labels for a batch of {batch}.")
    uniq = torch.unique(labels).tolist()
    if len(uniq) == 1:
        return [(int(uniq[0]), None)]
    return [(int(t), labels == t) for t in uniq]


class TaskLoRAMixin:
    """Adds a frozen bank of earlier tasks' adapters and per-sample routing to a LoRA layer."""

    def _init_tasks(self) -> None:
        self.bank_A = nn.ParameterDict()
        self.bank_B = nn.ParameterDict()
        self.current_task: int | None = None
        self.task_labels = None  # int or LongTensor (batch,), set by set_task_routing

    def trained_tasks(self) -> list[int]:
        return sorted(int(k) for k in self.bank_A.keys())

    def store_adapter(self, task: int) -> None:
        """Freeze a copy of the current adapter as task ``task``'s."""
        self.bank_A[str(task)] = nn.Parameter(self.lora_A.detach().clone(), requires_grad=False)
        self.bank_B[str(task)] = nn.Parameter(self.lora_B.detach().clone(), requires_grad=False)

    def _factors(self, task: int):
        if task == BASE_ROUTE:
            return None
        key = str(task)
        if key in self.bank_A:
            return self.bank_A[key], self.bank_B[key]
        if task == self.current_task:
            return self.lora_A, self.lora_B
        raise ValueError(
            f"Task label {task} was never trained (trained tasks: {self.trained_tasks()}"
            f"{'' if self.current_task is None else f', training: {self.current_task}'}); per-task LoRA has no "
            "adapter for it."
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.current_task is None and not len(self.bank_A):  # before any task: just the base layer
            return self.base_layer(x)
        groups = _routing_groups(self.task_labels, x.shape[0])
        if len(groups) == 1:
            if groups[0][0] == BASE_ROUTE:
                return self.base_layer(x)
            A, B = self._factors(groups[0][0])
            if self._through_weight():
                return self._forward_with_weight(x, self._weight_plus(A, B, self.scaling))
            return self.base_layer(x) + self._lora_apply(self.lora_dropout(x), A, B) * self.scaling
        out = self.base_layer(x)
        x = self.lora_dropout(x)
        delta = torch.zeros_like(out)
        for task, mask in groups:
            if task == BASE_ROUTE:
                continue
            A, B = self._factors(task)
            delta[mask] = self._lora_apply(x[mask], A, B) * self.scaling
        return out + delta

    def merge(self) -> None:
        raise RuntimeError("Per-task adapters stay separate (one per task); they are not merged into the base weight.")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved model may hold more tasks than this fresh one: create their bank entries first
        for bank in ("bank_A", "bank_B"):
            for key in state_dict:
                if key.startswith(f"{prefix}{bank}."):
                    task = key[len(f"{prefix}{bank}."):]
                    if "." not in task and task not in getattr(self, bank):
                        getattr(self, bank)[task] = nn.Parameter(torch.empty_like(state_dict[key]), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TaskLoRALinear(TaskLoRAMixin, LoRALinear):
    """:class:`~models.lora.LoRALinear` with one adapter per task (see :mod:`models.task_lora`)."""

    def __init__(self, base_layer: nn.Linear, **kwargs):
        super().__init__(base_layer, **kwargs)
        self._init_tasks()


class TaskLoRAConv2d(TaskLoRAMixin, LoRAConv2d):
    """:class:`~models.lora.LoRAConv2d` with one adapter per task (see :mod:`models.task_lora`)."""

    def __init__(self, base_layer: nn.Conv2d, **kwargs):
        super().__init__(base_layer, **kwargs)
        self._init_tasks()


class TaskCopy(nn.Module):
    """Per-task copies of a whole module, routed per sample by task label (the growing-network baseline's stage,
    and :class:`TaskBatchNorm`). The wrapped module (``self.module``) is the copy that trains; :meth:`store` freezes
    a snapshot of it as a task's; :meth:`reset` brings it back to the weights it had when wrapped (kept frozen in
    ``pretrained``, which serves route :data:`BASE_ROUTE`, the pretraining task)."""

    _live = "module"  # the attribute holding the trained copy (state-dict names: ``module.*``)

    def __init__(self, module: nn.Module):
        super().__init__()
        setattr(self, self._live, module)
        self.pretrained = copy.deepcopy(module).eval().requires_grad_(False)
        self.bank = nn.ModuleDict()
        self.current_task: int | None = None
        self.task_labels = None

    @property
    def live(self) -> nn.Module:
        return getattr(self, self._live)

    def train(self, mode: bool = True):
        super().train(mode)
        self.pretrained.eval()  # frozen copies keep fixed statistics, whatever the model's mode (e.g. a replayed
        self.bank.eval()  # sample of an earlier task routed to its copy while the current one trains)
        return self

    def trained_tasks(self) -> list[int]:
        return sorted(int(k) for k in self.bank)

    def store(self, task: int) -> None:
        """Freeze a snapshot of the trained copy as task ``task``'s."""
        self.bank[str(task)] = copy.deepcopy(self.live).eval().requires_grad_(False)

    def reset(self) -> None:
        """The trained copy back to the pretrained weights and buffers (its parameters stay the same tensors, so an
        optimizer keeps them)."""
        self.live.load_state_dict(self.pretrained.state_dict())  # copies in place, keys checked

    def _layer(self, task: int) -> nn.Module:
        if task == BASE_ROUTE:
            return self.pretrained
        if str(task) in self.bank:
            return self.bank[str(task)]
        if task == self.current_task:
            return self.live
        raise ValueError(f"Task label {task} was never trained; no copy of {type(self.live).__name__} for it "
                         f"(trained: {self.trained_tasks()}"
                         f"{'' if self.current_task is None else f', training: {self.current_task}'}).")

    def forward(self, x: Tensor) -> Tensor:
        if self.current_task is None and not len(self.bank):  # before any task: the shared module
            return self.live(x)
        groups = _routing_groups(self.task_labels, x.shape[0])
        if len(groups) == 1:
            return self._layer(groups[0][0])(x)
        out = None
        for task, mask in groups:
            y = self._layer(task)(x[mask])
            if out is None:  # the module may change the shape (a strided block)
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[mask] = y
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved model may hold more tasks than this fresh one: create their bank entries first
        for key in state_dict:
            if key.startswith(f"{prefix}bank."):
                task = key[len(f"{prefix}bank."):].split(".")[0]
                if task not in self.bank:
                    self.store(int(task))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TaskBatchNorm(TaskCopy):
    """Per-task copies of a BatchNorm layer (the effects-of-LoRA study keeps them): the wrapped ``bn`` evolves while
    tasks train (it is not reset between tasks), a frozen snapshot is stored per task, and samples are routed to
    their task's snapshot."""

    _live = "bn"

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__(bn)


def task_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (TaskLoRAMixin, TaskCopy))]


def set_task_routing(model: nn.Module, labels: int | Tensor | None) -> None:
    """Route the next forward passes: every sample (``int``) or each sample (``LongTensor``) to its task;
    :data:`BASE_ROUTE` (-1) routes to the bare backbone (no adapter, the BatchNorm as it was before any task)."""
    if isinstance(labels, Tensor):
        labels = labels.to(torch.long)
    for m in task_layers(model):
        m.task_labels = labels
