"""HiDe-LoRA: hierarchical decomposition of class-incremental learning with LoRA.

Wang, Xie, Zhang, Su, Zhu, "HiDe-PET: Continual Learning via Hierarchical Decomposition of Parameter-Efficient
Tuning", arXiv:2407.05229 (extending HiDe-Prompt, NeurIPS 2023); official code thu-ml/HiDe-PET.
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper
from avalanche.models import MultiTaskModule
from avalanche.models.utils import avalanche_model_adaptation
from torch import nn

from models.inject import Target, add_lora, count_parameters, find_head, lora_layers
from models.task_lora import TaskLoRAConv2d, TaskLoRALinear, TaskLoRAMixin, set_task_routing

from .base import (AdapterPluginMixin, ClassMaskMixin, MethodStrategy, all_reduce_, experience_loader,
                   mask_logits_per_sample, unwrap)
from .recipe import TrainingRecipe

__all__ = ["HiDeLoRAPlugin", "HiDeLoRA", "CA_METHODS", "class_statistics", "sample_features"]

CA_METHODS = ("multi-centroid", "variance", "covariance")
_EPS = 1e-4  # added to every variance / covariance before sampling (as the official code)


def class_statistics(X: torch.Tensor, method: str, n_centroids: int = 10, seed: int = 0) -> dict:
    """Gaussian statistics of one class's features ``X`` (n × D) for classifier alignment.

    ``multi-centroid``: k-means with ``n_centroids`` clusters, each cluster's mean and diagonal variance;
    ``variance``: the class mean and diagonal variance; ``covariance``: the class mean and full covariance.
    Returns ``{"means": (k, D), "vars": (k, D)}`` or ``{"means": (1, D), "cov": (D, D)}``.
    """
    X = X.double()
    if method == "multi-centroid":
        from sklearn.cluster import KMeans

        k = min(n_centroids, len(X))
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(X.numpy()).labels_
        labels = torch.from_numpy(labels.astype(np.int64))
        groups = [X[labels == j] for j in range(k) if (labels == j).any()]
        return dict(means=torch.stack([g.mean(0) for g in groups]).float(),
                    vars=torch.stack([g.var(0, unbiased=False) for g in groups]).float())
    if method == "variance":
        return dict(means=X.mean(0, keepdim=True).float(), vars=X.var(0, unbiased=False, keepdim=True).float())
    if method == "covariance":
        C = torch.cov(X.T) if len(X) > 1 else torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype)
        return dict(means=X.mean(0, keepdim=True).float(), cov=C.float())
    raise ValueError(f"Unknown classifier-alignment method {method!r}; choose one of {', '.join(CA_METHODS)}.")


def sample_features(stats: dict[int, dict], n_per_centroid: int, generator: torch.Generator):
    """Features drawn from every class's Gaussians: ``n_per_centroid`` per (class, centroid), from
    ``N(mu, diag(var) + eps)`` or ``N(mu, cov + eps I)``. Returns ``(X, y)``."""
    xs, ys = [], []
    for c, s in sorted(stats.items()):
        for j, mu in enumerate(s["means"]):
            if "cov" in s:
                L = torch.linalg.cholesky(s["cov"].double() + _EPS * torch.eye(len(mu), dtype=torch.float64))
                z = torch.randn(n_per_centroid, len(mu), generator=generator, dtype=torch.float64)
                x = (mu.double() + z @ L.T).float()
            else:
                z = torch.randn(n_per_centroid, len(mu), generator=generator)
                x = mu + z * (s["vars"][j] + _EPS).sqrt()
            xs.append(x)
            ys.append(torch.full((n_per_centroid,), int(c), dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


class HiDeLoRAPlugin(ClassMaskMixin, AdapterPluginMixin, SupervisedPlugin, supports_distributed=True):
    """HiDe-LoRA for class-incremental learning: within-task prediction, task-identity inference (TII) and
    task-adaptive prediction, each optimised explicitly, with two models.

    * **Task-shared model** (TII): a copy of the backbone with one LoRA on the same modules and its own head, trained
      on every mini-batch next to the main model with the first-session / slow-learner schedule (the strategy's
      optimizer type and hyper-parameters; LoRA learning rate times ``slow_lr`` from the second task on, the head
      at the full rate), cross-entropy over the current task's classes.
    * **Task-specific pool** (the strategy's model): one LoRA slot per task on the targeted modules
      (:class:`~models.task_lora.TaskLoRALinear` / ``TaskLoRAConv2d``); slot t starts from slot t-1, trains with
      the masked cross-entropy plus ``reg`` times the contrastive feature regulariser (features of the batch against
      each other and against every stored class centroid, ``CE(M Mᵀ / 0.8, identity)``), and is blended with the
      mean of the earlier slots after the task: ``θ_t ← (1 - m) θ_t + m · mean_{j<t} θ_j`` (factor-wise).
    * **Classifier alignment** after each task (from the second on), for both heads: per-class Gaussian statistics
      of the pre-logit features (``multi-centroid``: k-means with ``n_centroids`` clusters, mean and diagonal
      variance each; ``variance``; ``covariance``), then ``ca_epochs`` epochs of SGD (``ca_lr``, momentum 0.9, no
      weight decay, cosine per epoch) training **only the head**: each epoch samples ``ca_samples`` features per
      (seen class, centroid), shuffles them and takes one step per class of the earlier tasks on consecutive slices
      of ``ca_samples``.
    * Gradients of both models are clipped to norm ``clip_grad`` (2.0) before every step.

    Inference: the shared model predicts a class among the seen ones; its task routes each sample to that task's
    slot (samples grouped by task, one pass per group); the aligned head classifies. The TII accuracy of every
    evaluated batch is kept in ``last_tii`` (read by :class:`~strategies.metrics.TaskInferenceAccuracyPluginMetric`).

    Follows thu-ml/HiDe-PET @ 581170286e8e5ed2a7f4b6178279940ff3de1ee1 (CIFAR-100 commands: thu-ml/HiDe-Prompt
    @ 0ed433334ff2cfb206c5e2899651c3044ec85f92, ``README.md`` L136-165): LoRA ``lora_alpha=1``, ``scaling = alpha /
    r`` (``peft/lora/hide_lora.py`` L7, L11; ``continual_lora.py`` L7, L13), so the scale is 1/r; slot t copied
    from slot t-1 (``engines/hide_lora_wtp_and_tap_engine.py`` L223-242); masked CE (L44-52) plus ``reg ·
    orth_loss`` with ``sim = M Mᵀ / 0.8`` (L472-490); momentum blend (L270-283); ``clip_grad_norm_(...,
    2.0)`` in both stages (L62; ``continual_pet_engine.py`` L57; configs L19); first-session / slow learner for the
    shared model (``continual_pet_engine.py`` L81-99); classifier alignment with SGD(``ca_lr``, momentum 0.9) whose
    param group sets weight decay to ``args.weight_decay`` = 0 (HiDe-Prompt engine L366-373), cosine per epoch,
    ``crct_num`` = classes of earlier tasks steps of ``batch_size · 5`` samples (L376-431). Training recipe in
    :class:`HiDeLoRA`. Deviations kept:

    * the task-classifier MLP head of stage 1 is not built (HiDe-LoRA's evaluation does not use it), and both
      stages train in one Avalanche experience (the code trains stage 1 for all tasks first, then stage 2);
    * any Linear/Conv2d can be adapted (the paper: K and V of the first 5 ViT blocks);
    * evaluation masks the classes of no trained experience (the code's stage 2 does not; they never win anyway
      once aligned);
    * singleton k-means clusters are sampled with variance 1e-4 (the code's jitter) rather than skipped.

    :param target_modules, exclude_modules, conv_mode, trainable_modules: see :func:`models.add_lora`, for both
        models.
    :param r: rank of the shared LoRA and of every slot (CIFAR-100 command: 8; ImageNet-R: 5).
    :param alpha: LoRA alpha (the code's 1: scale 1/r).
    :param dropout: adapter input dropout (0).
    :param slow_lr: the shared LoRA's learning-rate factor from the second task on (0.1).
    :param shared_lr: the shared model's learning rate (``None``: the strategy optimizer's).
    :param reg: weight of the contrastive regulariser (config default and CIFAR-100: 0.01; ImageNet-R: 0.001).
    :param lora_momentum: ``m`` of the end-of-task blend (0.1).
    :param clip_grad: gradient-norm clipping of both models (2.0); ``None`` turns it off.
    :param ca_method: statistics for classifier alignment: ``multi-centroid`` (k-means), ``variance`` or
        ``covariance``.
    :param n_centroids: clusters per class for ``multi-centroid`` (10).
    :param ca_epochs: classifier-alignment epochs (30).
    :param ca_lr: classifier-alignment learning rate (0.005).
    :param ca_samples: features sampled per (class, centroid) and epoch, and the size of one alignment step
        (``None``: 5 × the training batch size).
    """

    _state_attrs = ("adapted_modules", "trained_tasks", "task_classes", "seen_classes", "stats", "shared_stats",
                    "current_task")
    _layer_type, _layer_desc = TaskLoRAMixin, "HiDe task-specific LoRA"

    def __init__(
        self,
        *,
        target_modules: Optional[Target] = "auto",
        r: int = 8,
        alpha: Optional[float] = 1.0,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        slow_lr: float = 0.1,
        shared_lr: Optional[float] = None,
        reg: float = 0.01,
        lora_momentum: float = 0.1,
        clip_grad: Optional[float] = 2.0,
        ca_method: Literal["multi-centroid", "variance", "covariance"] = "multi-centroid",
        n_centroids: int = 10,
        ca_epochs: int = 30,
        ca_lr: float = 0.005,
        ca_samples: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        if ca_method not in CA_METHODS:
            raise ValueError(f"Unknown ca_method {ca_method!r}; choose one of {', '.join(CA_METHODS)}.")
        if not 0 <= lora_momentum <= 1:
            raise ValueError(f"lora_momentum must be in [0, 1], got {lora_momentum}.")
        if slow_lr < 0 or reg < 0 or ca_epochs < 0 or n_centroids < 1:
            raise ValueError("slow_lr, reg and ca_epochs must be >= 0 and n_centroids >= 1.")
        if clip_grad is not None and not clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 (or None for no clipping), got {clip_grad}.")
        common = dict(target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                      exclude_modules=exclude_modules, trainable_modules=trainable_modules)
        self.lora_kwargs = dict(common, linear_cls=TaskLoRALinear, conv_cls=TaskLoRAConv2d)
        self.shared_kwargs = common
        self.slow_lr, self.shared_lr, self.reg, self.lora_momentum = slow_lr, shared_lr, reg, lora_momentum
        self.clip_grad = clip_grad
        self.ca_method, self.n_centroids, self.ca_epochs, self.ca_lr = ca_method, n_centroids, ca_epochs, ca_lr
        self.ca_samples, self.seed = ca_samples, seed
        self.masked_loss = True
        self.shared_model: nn.Module | None = None
        self.adapted_modules: list[str] = []
        self.trained_tasks: list[int] = []
        self.task_classes: dict[int, list[int]] = {}
        self.seen_classes: list[int] = []
        self.stats: dict[int, dict] = {}  # class -> Gaussian statistics of the task-specific model's features
        self.shared_stats: dict[int, dict] = {}  # the same for the shared model
        self.last_tii: tuple[torch.Tensor, torch.Tensor] | None = None
        self._current_classes: list[int] = []
        self._features: torch.Tensor | None = None
        self._hook = None
        self._shared_opt = None
        self.current_task: int | None = None

    # -- set-up ---------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Copy the plain backbone into the task-shared model (with one LoRA), then inject the task-specific pool."""
        model = unwrap(model)
        if isinstance(model, MultiTaskModule):
            raise ValueError("HiDe-LoRA is a class-incremental method (it infers the task); use one head over all "
                             "classes, not a per-task head (drop --task-incremental).")
        if find_head(model) is None:
            raise ValueError("HiDe-LoRA needs a Linear classifier head (its input are the features it aligns).")
        has_pool = any(isinstance(m, TaskLoRAMixin) for m in model.modules())
        if not has_pool:
            if self.lora_kwargs["target_modules"] is None:
                raise ValueError("HiDeLoRAPlugin: the model has no LoRA layers and no target_modules were given.")
            shared = copy.deepcopy(model)
            add_lora(shared, **self.shared_kwargs)
            self.shared_model = shared
        elif self.shared_model is None:
            raise ValueError("HiDeLoRAPlugin builds its task-shared model from the plain backbone: give it the model "
                             "before any LoRA is injected.")
        super().prepare(model)

    def _pool(self, model) -> list[TaskLoRAMixin]:
        return [m for m in unwrap(model).modules() if isinstance(m, TaskLoRAMixin)]

    def _head(self, model) -> nn.Linear:
        return find_head(unwrap(model))[1]

    # -- training -------------------------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        t = int(strategy.experience.current_experience)
        if t in self.trained_tasks:
            raise ValueError(f"Experience {t} was already trained; HiDe-LoRA keeps one slot per experience.")
        self._note_classes(strategy)
        self.task_classes[t] = list(self._current_classes)
        self.current_task = t
        with torch.no_grad():
            for layer in self._pool(strategy.model):
                if self.trained_tasks:  # warm start: slot t begins as slot t-1
                    prev = str(self.trained_tasks[-1])
                    layer.lora_A.copy_(layer.bank_A[prev])
                    layer.lora_B.copy_(layer.bank_B[prev])
                layer.current_task = t
                for p in layer.adapter_parameters():
                    strategy.optimizer.state.pop(p, None)
        head = self._head(strategy.model)
        self._hook = head.register_forward_pre_hook(lambda _m, args: setattr(self, "_features", args[0]))
        self.shared_model.to(strategy.device)
        was_training = self.shared_model.training
        self.shared_model.train()  # a growing head (Avalanche's IncrementalClassifier) grows in the copy too
        avalanche_model_adaptation(self.shared_model, strategy.experience)
        self.shared_model.train(was_training).to(strategy.device)
        self._shared_opt = self._shared_optimizer(strategy.optimizer)

    def _shared_optimizer(self, template: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The strategy optimizer's type and hyper-parameters; first session at full rate, then a slow LoRA."""
        g0 = template.param_groups[0]
        lr = self.shared_lr if self.shared_lr is not None else g0.get("initial_lr", g0["lr"])
        lora_ids = {id(p) for _, m in lora_layers(self.shared_model) for p in m.adapter_parameters()}
        lora = [p for p in self.shared_model.parameters() if id(p) in lora_ids]
        rest = [p for p in self.shared_model.parameters() if p.requires_grad and id(p) not in lora_ids]
        groups = [dict(params=lora, lr=lr * (self.slow_lr if self.trained_tasks else 1.0)), dict(params=rest, lr=lr)]
        defaults = {k: v for k, v in template.defaults.items() if k != "lr"}
        try:
            return type(template)(groups, **defaults)
        except TypeError:  # an optimizer whose defaults are not all constructor arguments
            return type(template)(groups, lr=lr)

    def before_forward(self, strategy, **kwargs):
        set_task_routing(strategy.model, self.current_task)

    def before_update(self, strategy, **kwargs):
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(unwrap(strategy.model).parameters(), self.clip_grad)

    def before_backward(self, strategy, **kwargs):
        if self.reg and self._features is not None:
            strategy.loss = strategy.loss + self.reg * self.contrastive_loss(self._features)

    def contrastive_loss(self, features: torch.Tensor) -> torch.Tensor:
        """``CE(M Mᵀ / 0.8, arange)`` with ``M`` = [stored centroids; batch features]: each feature is pushed away
        from the other features of the batch and from every earlier class's centroids."""
        features = features.reshape(features.shape[0], -1)
        if self.stats:
            cents = torch.cat([s["means"] for _, s in sorted(self.stats.items())]).to(features)
            features = torch.cat([cents, features])
        sim = features @ features.T / 0.8
        return F.cross_entropy(sim, torch.arange(len(sim), device=sim.device))

    def after_training_iteration(self, strategy, **kwargs):
        """One step of the task-shared model on the same mini-batch."""
        shared = self.shared_model
        modes = {n: m.training for n, m in unwrap(strategy.model).named_modules()}
        for n, m in shared.named_modules():  # e.g. frozen BatchNorm: the copy follows the main model's modes
            m.training = modes.get(n, m.training)
        logits = mask_logits_per_sample(shared(strategy.mb_x), strategy.mb_y, self._current_classes, self.seen_classes)
        loss = strategy._criterion(logits, strategy.mb_y)
        self._shared_opt.zero_grad()
        loss.backward()
        if DistributedHelper.is_distributed:  # not DDP-wrapped: average its gradients by hand
            grads = [p.grad for g in self._shared_opt.param_groups for p in g["params"] if p.grad is not None]
            all_reduce_(*grads)
            for g in grads:
                g /= DistributedHelper.world_size
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(shared.parameters(), self.clip_grad)
        self._shared_opt.step()

    def after_training_exp(self, strategy, **kwargs):
        t = int(strategy.experience.current_experience)
        if self._hook is not None:
            self._hook.remove()
            self._hook, self._features = None, None
        if DistributedHelper.is_distributed:  # its BatchNorm statistics saw each rank's shard: take rank 0's
            for b in self.shared_model.buffers():
                torch.distributed.broadcast(b, src=0)
        pool = self._pool(strategy.model)
        with torch.no_grad():
            if self.trained_tasks and self.lora_momentum:
                for layer in pool:
                    for cur, bank in ((layer.lora_A, layer.bank_A), (layer.lora_B, layer.bank_B)):
                        mean = torch.stack([bank[str(j)] for j in self.trained_tasks]).mean(0)
                        cur.mul_(1 - self.lora_momentum).add_(mean, alpha=self.lora_momentum)
        for layer in pool:
            layer.store_adapter(t)
        self.trained_tasks.append(t)
        # statistics of the new classes under both models, then align both heads
        model = unwrap(strategy.model)
        feats, labels = self.extract_features(strategy, model, route=t)
        sfeats, _ = self.extract_features(strategy, self.shared_model)
        for c in sorted(set(labels.tolist())):
            self.stats[c] = class_statistics(feats[labels == c], self.ca_method, self.n_centroids, self.seed)
            self.shared_stats[c] = class_statistics(sfeats[labels == c], self.ca_method, self.n_centroids, self.seed)
        if len(self.trained_tasks) > 1 and self.ca_epochs:
            n = self.ca_samples or 5 * strategy.train_mb_size
            steps = sum(len(self.task_classes[j]) for j in self.trained_tasks[:-1])  # the code's crct_num
            self.align_classifier(self._head(model), self.stats, n, steps, seed=self.seed + 2 * t)
            self.align_classifier(self._head(self.shared_model), self.shared_stats, n, steps,
                                  seed=self.seed + 2 * t + 1)

    @torch.no_grad()
    def extract_features(self, strategy, model: nn.Module, route: int | None = None):
        """Pre-logit features (the head's input) of the current experience's data, eval transforms, eval mode."""
        head = self._head(model)
        out = []
        handle = head.register_forward_pre_hook(lambda _m, args: out.append(args[0].detach().cpu()))
        was_training = model.training
        model.eval()
        ys = []
        try:
            for batch in experience_loader(strategy):
                if route is not None:
                    set_task_routing(model, route)
                model(batch[0].to(strategy.device))
                ys.append(batch[1])
        finally:
            handle.remove()
            model.train(was_training)
        return torch.cat(out).reshape(sum(len(y) for y in ys), -1), torch.cat(ys).long()

    def align_classifier(self, head: nn.Linear, stats: dict, n_per_centroid: int, steps: int, seed: int = 0
                         ) -> None:
        """Train only ``head`` on features sampled from ``stats`` (every seen class), cross-entropy over the seen
        classes: SGD (``ca_lr``, momentum 0.9, no weight decay), cosine over ``ca_epochs``; each epoch draws
        ``n_per_centroid`` features per (class, centroid), shuffles them and takes ``steps`` steps on consecutive
        slices of ``n_per_centroid`` (fewer if the samples run out)."""
        params = list(head.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        seen = torch.tensor(sorted(stats), dtype=torch.long)
        pos = torch.full((int(seen.max()) + 1,), -1, dtype=torch.long)
        pos[seen] = torch.arange(len(seen))
        dev = head.weight.device
        opt = torch.optim.SGD(params, lr=self.ca_lr, momentum=0.9, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.ca_epochs)
        g = torch.Generator().manual_seed(seed)
        try:
            with torch.enable_grad():
                for _ in range(self.ca_epochs):
                    X, y = sample_features(stats, n_per_centroid, g)
                    perm = torch.randperm(len(X), generator=g)
                    X, y = X[perm].to(dev), pos[y[perm]].to(dev)
                    for xb, yb in list(zip(X.split(n_per_centroid), y.split(n_per_centroid)))[:steps]:
                        loss = F.cross_entropy(head(xb).index_select(1, seen.to(dev)), yb)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    sched.step()
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
                p.grad = None

    # -- evaluation: task-identity inference, then routing ------------------------------------------------------
    @torch.no_grad()
    def infer_tasks(self, x: torch.Tensor) -> torch.Tensor:
        """Task of each sample: the task of the shared model's most likely class among the seen ones."""
        lookup = torch.full((max(self.seen_classes) + 1,), -1, dtype=torch.long)
        for t, classes in self.task_classes.items():
            lookup[torch.tensor(classes)] = t
        self.shared_model.eval()
        logits = self.shared_model(x)
        seen = torch.tensor(self.seen_classes, device=logits.device)
        cls = seen[logits.index_select(1, seen).argmax(1)]
        return lookup.to(cls.device)[cls]

    def before_eval_forward(self, strategy, **kwargs):
        self.last_tii = None
        if not self.task_classes:  # before any training: the plain backbone
            return
        pred = self.infer_tasks(strategy.mb_x)
        true = torch.full_like(pred, int(strategy.experience.current_experience))
        self.last_tii = (pred, true)
        set_task_routing(strategy.model, pred)

    # -- state and accounting -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["shared_model"] = {k: v.detach().cpu() for k, v in self.shared_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.shared_model is None:
            raise ValueError("Call prepare(model) before loading a HiDe-LoRA plugin state.")
        self.shared_model.load_state_dict(state["shared_model"])

    def parameter_report(self, model: nn.Module) -> dict:
        """``stored``: backbone, every slot, head, the shared LoRA and head, and the class statistics;
        ``inference``: backbone, one slot, head, the shared LoRA and head (the TII pass)."""
        c = count_parameters(model)
        pool = self._pool(model)
        current = sum(m.lora_A.numel() + m.lora_B.numel() for m in pool)
        # the shared model's own parameters are its (trainable) LoRA and head; its frozen backbone is the same
        shared_own = sum(p.numel() for p in self.shared_model.parameters() if p.requires_grad) \
            if self.shared_model is not None else 0
        stats = sum(v.numel() for st in (self.stats, self.shared_stats) for s in st.values() for v in s.values())
        stored = c["total"] - current + shared_own + stats
        n = len(self.trained_tasks)
        inference = stored - stats - (n - 1) * current if n else stored - stats
        return dict(stored=stored, inference=inference)


class HiDeLoRA(MethodStrategy):
    """Avalanche strategy: ``SupervisedTemplate`` plus :class:`HiDeLoRAPlugin` (Wang et al., HiDe-PET, 2024).

    Class-incremental: give a model with one Linear head over all classes. Recipe (thu-ml/HiDe-PET @ 5811702,
    ``trainers/hidelora_trainer.py`` L85-91; CIFAR-100 command in thu-ml/HiDe-Prompt ``README.md`` L136-165): a new
    Adam per task (timm's ``create_optimizer``: betas (0.9, 0.999), weight decay 0), lr 0.01 **times batch / 256**
    (``args.lr * batch_size / 256``: 9.4e-4 at the code's batch 24), constant on CIFAR-100 (ImageNet-R: cosine),
    20 epochs. The HiDe options are those of :class:`HiDeLoRAPlugin`.
    """

    always_masked = True  # the code's --train_mask is type=bool, default True: any value masks
    name = "hide_lora"
    recipe = TrainingRecipe(optimizer="adam", lr=0.01, lr_batch_reference=256,
                            source="thu-ml/HiDe-PET@5811702 trainers/hidelora_trainer.py L85-91; "
                                   "thu-ml/HiDe-Prompt@0ed4333 README.md L153-165")
    plugin_class = HiDeLoRAPlugin

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        target_modules: Optional[Target] = "auto",
        r: int = 8,
        alpha: Optional[float] = 1.0,
        dropout: float = 0.0,
        conv_mode: str = "kxk_1x1",
        exclude_modules: Optional[Target] = None,
        trainable_modules="auto",
        slow_lr: float = 0.1,
        shared_lr: Optional[float] = None,
        reg: float = 0.01,
        lora_momentum: float = 0.1,
        clip_grad: Optional[float] = 2.0,
        ca_method: Literal["multi-centroid", "variance", "covariance"] = "multi-centroid",
        n_centroids: int = 10,
        ca_epochs: int = 30,
        ca_lr: float = 0.005,
        ca_samples: Optional[int] = None,
        **base_kwargs,
    ):
        super().__init__(
            method_plugin=HiDeLoRAPlugin(
                target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, conv_mode=conv_mode,
                exclude_modules=exclude_modules, trainable_modules=trainable_modules, slow_lr=slow_lr,
                shared_lr=shared_lr, reg=reg, lora_momentum=lora_momentum, clip_grad=clip_grad, ca_method=ca_method,
                n_centroids=n_centroids, ca_epochs=ca_epochs, ca_lr=ca_lr, ca_samples=ca_samples,
            ),
            model=model,
            optimizer=optimizer,
            **base_kwargs,
        )
