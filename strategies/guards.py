"""Stop training at the first non-finite loss, saying where, instead of training on NaNs."""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper

__all__ = ["FiniteLossPlugin", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; ``experience`` and ``iteration`` say where."""

    def __init__(self, value: float, experience: int, epoch: int, iteration: int):
        self.value, self.experience, self.epoch, self.iteration = value, experience, epoch, iteration
        super().__init__(
            f"training loss is {value} at experience {experience}, epoch {epoch}, iteration {iteration} of that "
            "epoch; lower the learning rate (or alpha), or check the data for NaNs."
        )


class FiniteLossPlugin(SupervisedPlugin, supports_distributed=True):
    """Raises :class:`NonFiniteLossError` before the backward pass of a NaN/inf loss, so no weight is updated
    with it. Costs one device-to-host sync per iteration (and, under DDP, one tiny all-reduce so all ranks stop)."""

    def before_backward(self, strategy, **kwargs):
        loss = strategy.loss
        if not isinstance(loss, torch.Tensor):
            return
        bad = (~torch.isfinite(loss.detach())).any().to(torch.int32).reshape(1)
        if DistributedHelper.is_distributed:  # every rank stops together, or the others wait forever
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteLossError(
                float(loss.detach().float().sum()), strategy.experience.current_experience,
                strategy.clock.train_exp_epochs, strategy.clock.train_epoch_iterations,
            )
