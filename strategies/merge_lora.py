"""Merged incremental LoRA: train a fresh adapter per experience, merge it into the backbone at the end.

Soutif-Cormerais, Magistri, van de Weijer, Bagdanov, "An Empirical Analysis of Forgetting in Pre-trained Models with
Incremental Low-Rank Updates", CoLLAs 2024 (PMLR 274:996-1012), arXiv:2405.18069.
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from models.inject import Target, count_parameters, lora_layers

from .base import AdapterPluginMixin, MethodStrategy
from .recipe import TrainingRecipe

__all__ = ["MergeLoRAPlugin", "MergeLoRA"]


class MergeLoRAPlugin(AdapterPluginMixin, SupervisedPlugin, supports_distributed=True):
    """Incremental low-rank updates with merging (Soutif-Cormerais et al., CoLLAs 2024).

    For every experience: a fresh adapter (A Kaiming, B zeros) on each targeted layer trains together with the
    classifier head while the backbone stays frozen; at the end of the experience the adapter is merged into the
    base weight (``W <- W + scaling · B A``) and re-initialised for the next experience. Nothing is stored per task
    and inference costs exactly the backbone's.

    Adapters are injected in ``before_training`` (unless the model already has LoRA layers), that is before
    Avalanche builds the optimizer's parameter list on the first experience, so the optimizer trains them. They are
    re-initialised in place, so later experiences keep the same tensors; their optimizer state is cleared at the
    start of each experience so that nothing of the previous task's adapter carries over.

    Follows AlbinSou/lora_cl_analysis @ dec7d3aaf9e2e6fdebdb2022de0ad8c16b94d243, ``experiments/lora_forget.py``:
    ``LoraConfig(r, lora_alpha, lora_dropout=0.1)`` (L78-83) with ``alpha = 2r`` (``scripts/lora_vit_seeds.sh`` L7:
    ``lora_alpha=$((2*i))``), merge after every task (L144-145, L223), a fresh LoRA per task (L168); training recipe
    in :class:`MergeLoRA`. Deviations kept:

    * targets: the paper adapts ViT ``attn.qkv`` or ResNet-50 ``conv3`` (L69, L74); CIFAR ResNets have no conv3,
      so ``experiments.run`` targets every 3×3 stage conv (any ``target_modules`` can be given);
    * dropout 0.1 is the ViT setting: on the ResNet the official code puts the whole backbone in eval mode
      (L149-150, L174-175), which also switches its LoRA dropout off; our CNN configs set ``dropout: 0``;
    * the paper's protocol is task-incremental (one head per task, L198-200) with the frozen pretraining head kept
      to measure its forgetting (L204, L131): run it with ``--task-incremental --retention-data``. Class-incremental
      runs of this method (the README's main job) train one head without masking, so their forgetting is mostly
      the head's recency bias, not backbone drift.

    :param target_modules: layers to adapt (see :func:`models.add_lora`); may be ``None`` if the model already has
        LoRA layers.
    :param r: LoRA rank (the paper sweeps 1 to 32; 8 here).
    :param alpha: LoRA alpha; ``None`` means the paper's ``2r`` (scale 2).
    :param dropout: adapter input dropout (paper: 0.1).
    :param conv_mode: ``"kxk_1x1"`` or ``"loralib"``.
    :param exclude_modules: layers never adapted.
    :param rslora: scale ``alpha / sqrt(r)``.
    :param trainable_modules: what trains besides the adapters (``"auto"``: the classifier head).
    """

    _state_attrs = ("adapted_modules", "merged_experiences")

    def __init__(
        self,
        *,
        target_modules: Optional[Target] = "auto",
        r: int = 8,
        alpha: Optional[float] = None,
        dropout: float = 0.1,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        rslora: bool = False,
        trainable_modules="auto",
    ):
        super().__init__()
        self.lora_kwargs = dict(
            target_modules=target_modules, r=r, alpha=2 * r if alpha is None else alpha, dropout=dropout,
            conv_mode=conv_mode, exclude_modules=exclude_modules, rslora=rslora, trainable_modules=trainable_modules,
        )
        self.adapted_modules: list[str] = []
        self.merged_experiences: list[int] = []

    def before_training_exp(self, strategy, **kwargs):
        layers = lora_layers(strategy.model)
        if not layers:
            raise RuntimeError("MergeLoRAPlugin: the model lost its LoRA layers (was it replaced after injection?).")
        in_opt = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
        params = [p for _, layer in layers for p in layer.adapter_parameters()]
        missing = [n for n, layer in layers if any(id(p) not in in_opt for p in layer.adapter_parameters())]
        if missing:
            raise RuntimeError(
                f"MergeLoRAPlugin: the optimizer does not hold the adapters of {missing[:5]}; build the strategy "
                "with an optimizer over model.parameters() or let Avalanche's make_optimizer add them."
            )
        for p in params:  # a fresh adapter starts with fresh optimizer state
            strategy.optimizer.state.pop(p, None)

    def after_training_exp(self, strategy, **kwargs):
        with torch.no_grad():
            for _, layer in lora_layers(strategy.model):
                layer.merge_and_reset()
        self.merged_experiences.append(strategy.experience.current_experience)

    def parameter_report(self, model: nn.Module) -> dict:
        """Merged: the fresh adapters are training state only; serving needs the backbone and head."""
        c = count_parameters(model)
        return dict(stored=c["total"] - c["adapter"], inference=c["total"] - c["adapter"])


class MergeLoRA(MethodStrategy):
    """Avalanche strategy for merged incremental LoRA: ``SupervisedTemplate`` plus :class:`MergeLoRAPlugin`.

    Soutif-Cormerais et al., "An Empirical Analysis of Forgetting in Pre-trained Models with Incremental Low-Rank
    Updates", CoLLAs 2024.

    Recipe (AlbinSou/lora_cl_analysis @ dec7d3a): AdamW lr 1e-3, weight decay 1e-2 (``lora_forget.py`` L292-296,
    ``config/optimizer/lora.yaml``), cosine per iteration with a linear warm-up of 1/18 of each experience's steps,
    restarted every experience (L358-375, transformers' ``get_cosine_schedule_with_warmup``); batch 32
    (``config/strategy/lora.yaml``). The official run keeps one AdamW whose new LoRA tensors get an empty state
    (Avalanche 0.4's ``update_optimizer``); the head's state is not reset there, here it is (all methods alike).

    :param model: the backbone with its classifier head (adapters are added when training starts).
    :param optimizer: ``None`` builds the recipe's; else an optimizer over ``model.parameters()``.
    :param target_modules, r, alpha, dropout, conv_mode, exclude_modules, rslora, trainable_modules: see
        :class:`MergeLoRAPlugin`.
    The remaining parameters are those of :class:`~strategies.base.MethodStrategy`.
    """

    name = "merge_lora"
    recipe = TrainingRecipe(optimizer="adamw", lr=1e-3, weight_decay=1e-2, lr_schedule="cosine", warmup=1 / 18,
                            source="AlbinSou/lora_cl_analysis@dec7d3a experiments/lora_forget.py L292-296, L356-379")
    plugin_class = MergeLoRAPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        target_modules: Optional[Target] = "auto",
        r: int = 8,
        alpha: Optional[float] = None,
        dropout: float = 0.1,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        rslora: bool = False,
        trainable_modules="auto",
        **base_kwargs,
    ):
        super().__init__(
            method_plugin=MergeLoRAPlugin(
                target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                exclude_modules=exclude_modules, rslora=rslora, trainable_modules=trainable_modules,
            ),
            model=model,
            optimizer=optimizer,
            **base_kwargs,
        )
