"""Keep a pretrained backbone's BatchNorm layers fixed while training.

A frozen backbone is not enough: in ``train()`` mode BatchNorm normalises with batch statistics and overwrites its
running statistics, so the pretrained function drifts although no weight trains (measured when this project was
planned: 83% retention of the pretraining task with BN frozen, 22-30% without).
"""

from __future__ import annotations

from avalanche.core import SupervisedPlugin
from torch import nn

__all__ = ["FreezeBatchNormPlugin", "freeze_batchnorm", "batchnorm_layers"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm(model: nn.Module, freeze_affine: bool = True) -> int:
    """Put every BatchNorm layer in eval mode (running statistics fixed) and, by default, freeze its affine
    parameters. Returns the number of layers. Call it again after anything that calls ``model.train()``."""
    layers = batchnorm_layers(model)
    for m in layers:
        m.eval()
        if freeze_affine:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    return len(layers)


class FreezeBatchNormPlugin(SupervisedPlugin, supports_distributed=True):
    """Keeps every BatchNorm layer of the strategy's model in eval mode with fixed parameters during training.

    Avalanche calls ``model.train()`` before each training experience and restores modes after periodic
    evaluation, so the layers are put back in eval mode before every training iteration (a cheap loop).

    :param freeze_affine: also freeze BatchNorm's weight and bias (``requires_grad=False``).
    """

    def __init__(self, *, freeze_affine: bool = True):
        super().__init__()
        self.freeze_affine = freeze_affine

    def before_training_exp(self, strategy, **kwargs):
        freeze_batchnorm(strategy.model, self.freeze_affine)

    def before_training_iteration(self, strategy, **kwargs):
        for m in batchnorm_layers(strategy.model):
            if m.training:
                m.eval()
