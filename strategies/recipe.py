"""A method's training recipe (optimizer, learning rate, schedule) and the two plugins that make Avalanche train the
way the official repositories do: a fresh optimizer state and a restarted learning-rate schedule per experience.

Avalanche 0.6 builds the optimizer once and keeps its state across experiences
(``make_optimizer(reset_optimizer_state=False)``); every official LoRA continual-learning repository builds a new
optimizer for each task, and most restart a schedule (cosine per iteration or per epoch) with it. Avalanche's
``LRSchedulerPlugin`` wraps one torch scheduler whose length is fixed when it is built, while an experience's number
of iterations is only known when its data loader exists: :class:`LRSchedulePlugin` computes the factor from the
experience's own length instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Optional

import torch
from avalanche.core import SupervisedPlugin

__all__ = ["TrainingRecipe", "LRSchedulePlugin", "FreshOptimizerPlugin", "build_optimizer", "lr_factor",
           "OPTIMIZERS", "LR_SCHEDULES", "SCHEDULE_STEPS"]

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "cosine-inflora")
SCHEDULE_STEPS = ("iteration", "epoch")


def lr_factor(schedule: str, step: int, total: int, warmup: float = 0.0) -> float:
    """The learning-rate multiplier of ``step`` (0-based) out of ``total`` steps of one experience.

    * ``constant``: 1 (after the warm-up);
    * ``cosine``: linear warm-up from 0 over the first ``round(warmup · total)`` steps, then
      ``0.5 · (1 + cos(π · p))`` with ``p`` the progress after the warm-up (transformers'
      ``get_cosine_schedule_with_warmup``, used by merged LoRA and EBLoRA; CoDyRA's ``cosine_lr`` without warm-up);
    * ``cosine-inflora``: InfLoRA's ``CosineSchedule``, ``cos(99 π · step / (200 · (total - 1)))`` (1 when
      ``total == 1``), which ends at ``cos(99π/200) ≈ 0.016`` instead of 0.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"Unknown lr_schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}.")
    if schedule == "cosine-inflora":
        return 1.0 if total <= 1 else math.cos(99 * math.pi * step / (200 * (total - 1)))
    n_warm = int(round(warmup * total))
    if step < n_warm:
        return step / max(1, n_warm)
    if schedule == "constant":
        return 1.0
    progress = (step - n_warm) / max(1, total - n_warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainingRecipe:
    """How a method trains by default, as its official code does (each strategy's ``recipe`` cites its source).

    :param optimizer: ``sgd``, ``adam`` or ``adamw``.
    :param lr: learning rate (before ``lr_batch_reference`` scaling).
    :param momentum: SGD momentum.
    :param weight_decay: weight decay (AdamW's decoupled one for ``adamw``).
    :param betas: Adam/AdamW betas.
    :param lr_schedule: one of :data:`LR_SCHEDULES`, restarted every experience.
    :param warmup: share of the experience's steps spent in linear warm-up.
    :param schedule_step: the schedule advances per ``iteration`` or per ``epoch``.
    :param lr_batch_reference: if set, the effective learning rate is ``lr · batch_size / lr_batch_reference``
        (HiDe-PET's ``args.lr * batch_size / 256``).
    :param source: where these values come from.
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    lr_schedule: str = "constant"
    warmup: float = 0.0
    schedule_step: str = "iteration"
    lr_batch_reference: Optional[int] = None
    source: str = ""

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}.")
        if self.schedule_step not in SCHEDULE_STEPS:
            raise ValueError(f"Unknown schedule_step {self.schedule_step!r}; choose one of "
                             f"{', '.join(SCHEDULE_STEPS)}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a share of the steps in [0, 1), got {self.warmup}.")
        if self.weight_decay < 0 or self.momentum < 0:
            raise ValueError("weight_decay and momentum must be >= 0.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}.")

    def with_overrides(self, **values) -> "TrainingRecipe":
        """A copy with the given fields changed (``None`` values keep the recipe's)."""
        values = {k: v for k, v in values.items() if v is not None}
        if "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        return replace(self, **values)

    def effective_lr(self, batch_size: int) -> float:
        return self.lr * batch_size / self.lr_batch_reference if self.lr_batch_reference else self.lr

    def schedule_plugin(self) -> Optional["LRSchedulePlugin"]:
        """The plugin that applies this recipe's schedule (``None`` for a constant rate without warm-up)."""
        if self.lr_schedule == "constant" and self.warmup == 0:
            return None
        return LRSchedulePlugin(schedule=self.lr_schedule, warmup=self.warmup, step=self.schedule_step)

    def as_dict(self, batch_size: Optional[int] = None) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        if batch_size is not None:
            d["effective_lr"] = self.effective_lr(batch_size)
        return d


def build_optimizer(recipe: TrainingRecipe, params: Iterable[torch.nn.Parameter], batch_size: int
                    ) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params`` at the effective learning rate for ``batch_size``."""
    lr = recipe.effective_lr(batch_size)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay)


class LRSchedulePlugin(SupervisedPlugin, supports_distributed=True):
    """Sets every parameter group's learning rate to ``initial_lr · factor`` before each training iteration, with
    the factor of :func:`lr_factor` over the current experience (so the schedule restarts with every experience,
    however long it is). ``initial_lr`` is the group's rate the first time the plugin sees it (torch's own
    schedulers use the same key); a checkpoint of the optimizer keeps it.

    :param schedule: one of :data:`LR_SCHEDULES`.
    :param warmup: share of the experience's steps in linear warm-up.
    :param step: ``iteration`` (per optimizer step) or ``epoch``.
    """

    def __init__(self, *, schedule: str = "cosine", warmup: float = 0.0, step: str = "iteration"):
        super().__init__()
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"Unknown lr schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}.")
        if step not in SCHEDULE_STEPS:
            raise ValueError(f"Unknown schedule step {step!r}; choose one of {', '.join(SCHEDULE_STEPS)}.")
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup must be a share of the steps in [0, 1), got {warmup}.")
        self.schedule, self.warmup, self.step = schedule, warmup, step
        self._total = 1

    def before_training_exp(self, strategy, **kwargs):
        epochs = strategy.train_epochs
        self._total = epochs * len(strategy.dataloader) if self.step == "iteration" else epochs
        for g in strategy.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])

    def current_factor(self, strategy) -> float:
        clock = strategy.clock
        t = clock.train_exp_iterations if self.step == "iteration" else clock.train_exp_epochs
        return lr_factor(self.schedule, min(t, self._total - 1), self._total, self.warmup)

    def before_training_iteration(self, strategy, **kwargs):
        f = self.current_factor(strategy)
        for g in strategy.optimizer.param_groups:
            g["lr"] = g.setdefault("initial_lr", g["lr"]) * f


class FreshOptimizerPlugin(SupervisedPlugin, supports_distributed=True):
    """Every experience starts with an empty optimizer state (no momentum, no Adam moments, step counters at 0), as
    the new optimizer that every official LoRA continual-learning repository builds per task. Avalanche 0.6 keeps the
    state by default, so the head's moments and step count would carry into the next task and new classes' rows
    would train without Adam's bias correction."""

    def before_training_exp(self, strategy, **kwargs):
        strategy.optimizer.state.clear()
