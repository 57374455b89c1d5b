"""Avalanche metrics that Avalanche lacks, usable with any strategy's ``EvaluationPlugin``.

Each is a ``PluginMetric``: its values reach every logger (interactive, text, TensorBoard; Avalanche's CSVLogger
drops custom metrics, ``experiments.run`` writes them to ``metrics.csv``), and ``result()`` / ``history`` give the
full per-experience records for ``results.json`` and the plots.
"""

from __future__ import annotations

import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from torch import nn
from torch.utils.data import DataLoader

from models.gate_lora import GateLoRAMixin
from models.heads import TaskIncrementalClassifier
from models.inject import count_parameters, find_head, lora_layers
from models.task_lora import BASE_ROUTE, TaskCopy, set_task_routing

from .base import find_method_plugin, unwrap

__all__ = [
    "parameter_report",
    "ParameterGrowthPluginMetric",
    "AccuracyCurvePluginMetric",
    "PretrainingRetentionPluginMetric",
    "RankUsagePluginMetric",
    "SpectralEnergyPluginMetric",
    "TaskInferenceAccuracyPluginMetric",
]


def parameter_report(strategy) -> dict:
    """Parameter counts of the strategy's model: ``trainable``, ``frozen``, ``adapter``, ``total`` (raw), ``stored``
    (all that serves every task so far: backbone, heads, adapters, per-task BN, subspaces) and ``inference`` (what
    one forward pass uses; one head in task-IL). Methods refine stored/inference with ``parameter_report(model)``."""
    model = unwrap(strategy.model)
    counts = count_parameters(model)
    plugin = find_method_plugin(strategy, "parameter_report")
    if plugin is not None:
        rep = plugin.parameter_report(model)
    elif counts["adapter"]:
        raise ValueError("The model has adapter layers but no plugin of the strategy reports what they cost (stored / "
                         "inference parameters depend on the method): put the method's plugin (e.g. InfLoRAPlugin) "
                         "in strategy.plugins.")
    else:
        rep = dict(stored=counts["total"], inference=counts["total"])
    counts.update(stored=rep["stored"], inference=rep["inference"])
    if isinstance(model, TaskIncrementalClassifier):
        heads = [sum(p.numel() for p in h.parameters()) for h in model.head.classifiers.values()]
        counts["inference"] -= sum(heads) - max(heads, default=0)
    return counts


def _x(strategy) -> int:
    return strategy.clock.train_iterations


class ParameterGrowthPluginMetric(PluginMetric[dict]):
    """Parameter counts after every training experience (see :func:`parameter_report`) and ``growth``: stored
    parameters relative to the backbone before training, in percent (the effects-of-LoRA study's measure).

    Emits ``ParamCount_<kind>/train_phase/Exp<e>`` and ``ParamGrowth_pct/train_phase/Exp<e>``.
    """

    def __init__(self):
        super().__init__()
        self.backbone: int | None = None
        self.history: list[dict] = []

    def result(self) -> dict:
        return dict(self.history[-1]) if self.history else {}

    def reset(self) -> None:
        """The history spans the whole run: nothing to reset."""

    def before_training(self, strategy):
        if self.backbone is None:  # adapters or per-task copies may be injected already: they are not the backbone
            model = unwrap(strategy.model)
            c = count_parameters(model)
            copies = sum(p.numel() for m in model.modules() if isinstance(m, TaskCopy)
                         for p in [*m.pretrained.parameters(), *m.bank.parameters()])
            self.backbone = c["total"] - c["adapter"] - copies

    def after_training_exp(self, strategy):
        rep = parameter_report(strategy)
        rep["growth_pct"] = 100.0 * (rep["stored"] / self.backbone - 1.0) if self.backbone else None
        self.history.append(rep)
        e = strategy.experience.current_experience
        vals = [MetricValue(self, f"ParamCount_{k}/train_phase/Exp{e:03d}", rep[k], _x(strategy))
                for k in ("trainable", "adapter", "total", "stored", "inference")]
        vals.append(MetricValue(self, f"ParamGrowth_pct/train_phase/Exp{e:03d}", rep["growth_pct"], _x(strategy)))
        return vals

    def __str__(self):
        return "ParamGrowth"


class AccuracyCurvePluginMetric(PluginMetric[dict]):
    """``Acc_Last``: mean accuracy over the experiences trained so far, after each training experience; ``Acc_Avg``:
    the mean of ``Acc_Last`` over the experiences so far (PILOT's / InfLoRA's "average accuracy", A̅; the last value
    of ``Acc_Last`` is their "last accuracy", A_B). Evaluations of experiences not trained yet are left out.

    Emits ``Acc_Last/eval_phase/<stream>_stream`` and ``Acc_Avg/eval_phase/<stream>_stream`` after each evaluation.
    """

    def __init__(self):
        super().__init__()
        self.last: list[float] = []
        self._correct: dict[int, int] = {}
        self._count: dict[int, int] = {}

    def result(self) -> dict:
        if not self.last:
            return {}
        return dict(last=self.last[-1], avg=sum(self.last) / len(self.last), curve=list(self.last))

    def reset(self) -> None:
        self._correct, self._count = {}, {}

    def before_eval(self, strategy):
        self.reset()

    def after_eval_iteration(self, strategy):
        e = strategy.experience.current_experience
        pred = strategy.mb_output.argmax(1)
        self._correct[e] = self._correct.get(e, 0) + int((pred == strategy.mb_y).sum())
        self._count[e] = self._count.get(e, 0) + len(strategy.mb_y)

    def after_eval(self, strategy):
        trained = strategy.clock.train_exp_counter  # experiences trained so far
        seen = [e for e in self._count if e < trained]
        if not trained or not seen:
            return None
        self.last.append(sum(self._correct[e] / self._count[e] for e in seen) / len(seen))
        stream = strategy.experience.origin_stream.name
        x = _x(strategy)
        return [MetricValue(self, f"Acc_Last/eval_phase/{stream}_stream", self.last[-1], x),
                MetricValue(self, f"Acc_Avg/eval_phase/{stream}_stream", sum(self.last) / len(self.last), x)]

    def __str__(self):
        return "AccCurve"


def _features_with(model: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head`` applied to ``model``'s features (its own classifier head bypassed)."""
    if isinstance(model, TaskIncrementalClassifier):
        return head(model.backbone(x))
    name, _ = find_head(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    own = getattr(parent, child)
    setattr(parent, child, head)
    try:
        return model(x)
    finally:
        setattr(parent, child, own)


class PretrainingRetentionPluginMetric(PluginMetric[float]):
    """Accuracy on a held-out set of the pretraining task, through the backbone's original head, after every
    training experience (Soutif-Cormerais et al., CoLLAs 2024; CoDyRA's knowledge retention). E.g. the CIFAR-10 test
    set for a CIFAR-10-pretrained ResNet learning other data.

    :param dataset: yields ``(x, y, ...)`` ready for the model (transformed and normalised).
    :param head: the pretrained classifier head (kept frozen here; a copy is taken).
    :param batch_size: evaluation batch size.
    What is measured is the pretraining task served as the method would serve it: merged and summed methods through
    their model as it is; methods that route samples to a task's adapter (per-task LoRA, HiDe-LoRA) through the bare
    backbone (route :data:`~models.task_lora.BASE_ROUTE`: no adapter, the pretrained BatchNorm), the route a
    task-aware deployment gives a task it has no adapter for. Emits ``PretrainRetention/eval_phase/Exp<e>``.
    """

    def __init__(self, dataset, head: nn.Module, *, batch_size: int = 256):
        super().__init__()
        import copy

        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        self.head = copy.deepcopy(head).requires_grad_(False).eval()
        self.history: list[float] = []
        self.per_class_history: list[dict] = []  # {class: accuracy} after each experience
        self._per_class: dict = {}

    def result(self) -> float | None:
        return self.history[-1] if self.history else None

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def measure(self, model: nn.Module, device) -> float:
        """Accuracy on the whole set (and, in ``self._per_class``, each class's)."""
        modes = {m: m.training for m in model.modules()}
        model.eval()
        head = self.head.to(device)
        set_task_routing(model, BASE_ROUTE)  # no-op for models without routed layers
        hits, seen = {}, {}
        try:
            for batch in self.loader:
                x, y = batch[0].to(device), batch[1].to(device)
                ok = _features_with(model, head, x).argmax(1) == y
                for c in y.unique().tolist():
                    hits[c] = hits.get(c, 0) + int(ok[y == c].sum())
                    seen[c] = seen.get(c, 0) + int((y == c).sum())
        finally:
            for m, mode in modes.items():
                m.training = mode
        self._per_class = {int(c): hits[c] / seen[c] for c in sorted(seen)}
        return sum(hits.values()) / max(sum(seen.values()), 1)

    def after_training_exp(self, strategy):
        acc = self.measure(unwrap(strategy.model), strategy.device)
        self.history.append(acc)
        self.per_class_history.append(self._per_class)
        e = strategy.experience.current_experience
        return [MetricValue(self, f"PretrainRetention/eval_phase/Exp{e:03d}", acc, _x(strategy))]

    def __str__(self):
        return "PretrainRetention"


def _update_of(layer) -> torch.Tensor:
    """The layer's current adapter update as a (out, in·k·k) matrix (zero when merged)."""
    if hasattr(layer, "current_delta_weight"):  # summed adapters: the current task's branch
        d = layer.current_delta_weight().detach()
    else:
        d = layer.delta_weight().detach() if not layer.merged else torch.zeros_like(layer.base_layer.weight)
    return d.reshape(d.shape[0], -1)


class _LastEpochMetric(PluginMetric[dict]):
    """Measures at the end of each experience's last epoch, before the methods merge or reset their adapters
    (those run in ``after_training_exp``), and reports in ``after_training_exp``."""

    def __init__(self):
        super().__init__()
        self.history: list[dict] = []
        self._pending: dict | None = None

    def result(self) -> dict:
        return dict(self.history[-1]) if self.history else {}

    def reset(self) -> None:
        pass

    def measure(self, strategy) -> dict:
        raise NotImplementedError

    def after_training_epoch(self, strategy):
        if strategy.clock.train_exp_epochs == strategy.train_epochs - 1:  # the clock counts after the metrics
            self._pending = self.measure(strategy)

    def after_training_exp(self, strategy):
        if self._pending is None:
            self._pending = self.measure(strategy)
        self.history.append(self._pending)
        self._pending = None
        return self.emit(strategy, self.history[-1])


class RankUsagePluginMetric(_LastEpochMetric):
    """Ranks in use per adapted module after each experience: CoDyRA's kept ranks (non-zero gates) for gate-LoRA
    layers, the numerical rank of the update for other LoRA layers. Emits the mean as
    ``RankUsage_mean/train_phase/Exp<e>``; ``history`` holds ``{module: rank}`` per experience."""

    def measure(self, strategy) -> dict:
        out = {}
        for name, layer in lora_layers(unwrap(strategy.model)):
            if isinstance(layer, GateLoRAMixin):
                out[name] = layer.kept_rank()
            else:
                d = _update_of(layer)
                # float32 factors: singular values below float32 rounding are not rank
                tol = max(d.shape) * torch.finfo(torch.float32).eps
                out[name] = int(torch.linalg.matrix_rank(d.double(), rtol=tol)) if d.abs().max() > 0 else 0
        return out

    def emit(self, strategy, ranks):
        if not ranks:
            return None
        e = strategy.experience.current_experience
        return [MetricValue(self, f"RankUsage_mean/train_phase/Exp{e:03d}", sum(ranks.values()) / len(ranks),
                            _x(strategy))]

    def __str__(self):
        return "RankUsage"


class SpectralEnergyPluginMetric(_LastEpochMetric):
    """Singular values of each module's update of the experience and its spectral imbalance, the share of energy in
    the top singular value ``σ1² / Σσ²`` (EBLoRA's measure: 1/rank for a flat spectrum, 1 for a single direction).

    The update is the base weight's change during the experience plus the unmerged adapter update, so it covers
    merged methods (taken before the merge), per-task adapters and, without LoRA, full fine-tuning (every
    Linear/Conv2d). Emits ``SpectralImbalance_mean/train_phase/Exp<e>``; ``history`` holds
    ``{module: {"singular_values": [...], "top1_energy": x}}`` per experience.
    """

    def __init__(self, max_values: int = 64):
        super().__init__()
        self.max_values = max_values
        self._start: dict[str, torch.Tensor] = {}

    def _weights(self, model):
        layers = lora_layers(model)
        if layers:
            return {n: (m.base_layer.weight, m) for n, m in layers}
        return {n: (m.weight, None) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    def before_training_exp(self, strategy):
        self._start = {n: w.detach().clone() for n, (w, _) in self._weights(unwrap(strategy.model)).items()}

    def measure(self, strategy) -> dict:
        out = {}
        for name, (w, layer) in self._weights(unwrap(strategy.model)).items():
            d = (w.detach() - self._start[name]).reshape(w.shape[0], -1)
            if layer is not None:
                d = d + _update_of(layer)
            s = torch.linalg.svdvals(d.double())
            energy = float((s ** 2).sum())
            out[name] = dict(singular_values=[float(v) for v in s[: self.max_values]],
                             top1_energy=float(s[0] ** 2 / energy) if energy > 0 else None)
        return out

    def emit(self, strategy, spectra):
        vals = [v["top1_energy"] for v in spectra.values() if v["top1_energy"] is not None]
        if not vals:
            return None
        e = strategy.experience.current_experience
        return [MetricValue(self, f"SpectralImbalance_mean/train_phase/Exp{e:03d}", sum(vals) / len(vals),
                            _x(strategy))]

    def __str__(self):
        return "SpectralEnergy"


class TaskInferenceAccuracyPluginMetric(PluginMetric[float]):
    """Task-identity-inference accuracy of methods that infer the task of each test sample (HiDe-LoRA): the share of
    samples of an evaluation experience whose inferred task is that experience. Reads the method plugin's
    ``last_tii = (predicted, true)`` after every evaluation iteration; emits
    ``TII_Acc_Exp/eval_phase/test_stream/Exp<e>`` and ``TII_Acc_Stream/eval_phase/test_stream`` (nothing for
    methods without task inference)."""

    def __init__(self):
        super().__init__()
        self._exp = [0, 0]
        self._stream = [0, 0]

    def result(self) -> float | None:
        return self._stream[0] / self._stream[1] if self._stream[1] else None

    def reset(self) -> None:
        self._stream = [0, 0]

    def before_eval(self, strategy):
        self.reset()

    def before_eval_exp(self, strategy):
        self._exp = [0, 0]

    def after_eval_iteration(self, strategy):
        tii = getattr(find_method_plugin(strategy, "last_tii"), "last_tii", None)
        if tii is not None:
            pred, true = tii
            hits, n = int((pred == true).sum()), int(true.numel())
            self._exp[0] += hits
            self._exp[1] += n
            self._stream[0] += hits
            self._stream[1] += n

    def after_eval_exp(self, strategy):
        if not self._exp[1]:
            return None
        e = strategy.experience.current_experience
        return [MetricValue(self, f"TII_Acc_Exp/eval_phase/test_stream/Exp{e:03d}", self._exp[0] / self._exp[1],
                            _x(strategy))]

    def after_eval(self, strategy):
        if not self._stream[1]:
            return None
        return [MetricValue(self, "TII_Acc_Stream/eval_phase/test_stream", self.result(), _x(strategy))]

    def __str__(self):
        return "TII_Acc"
