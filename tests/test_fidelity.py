"""Each method's defaults are its official code's, and fail here when one regresses: masking, scales, learning
rates, schedules, the fresh optimizer per experience, EBLoRA's rescaled step, SD-LoRA's magnitudes, CoDyRA's
threshold. References are written out in the tests from the official code (cited), never taken from the library."""

import math

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from experiments.run import build_strategy, parse_config
from models import cifar_resnet, lora_layers
from strategies import (CoDyRA, CoDyRAPlugin, EBLoRA, HiDeLoRA, InfLoRA, MergeLoRA, OLoRA, SDLoRA, lr_factor,
                        threshold_)

TARGET = r"layer3\.\d+\.conv[12]"


def _quiet():
    return EvaluationPlugin(loggers=[])


class _Spy(SupervisedPlugin):
    """Records, at the start of every experience, the optimizer's state size, and every iteration's learning rate."""

    def __init__(self):
        super().__init__()
        self.state_at_start, self.lrs = [], []

    def before_training_exp(self, strategy, **kwargs):
        self.state_at_start.append(len([s for s in strategy.optimizer.state.values() if s]))
        self.lrs.append([])

    def before_update(self, strategy, **kwargs):
        self.lrs[-1].append(strategy.optimizer.param_groups[0]["lr"])


# -- CoDyRA: masked cross-entropy, the code's threshold and schedule -----------------------------------------------

@pytest.mark.parametrize("masked", [True, False])
def test_codyra_loss_gives_no_gradient_to_earlier_classes(tiny_bm, masked):
    """Official loss: logits of earlier tasks' classes at -inf (models/codyra.py L752-753), so their head rows get no
    gradient; with a fresh AdamW per task (no weight decay) they stay bit-identical through the next task."""
    model = cifar_resnet(20, 10)
    strategy = CoDyRA(model=model, target_modules=TARGET, r=4, masked_loss=masked, train_mb_size=8,
                      evaluator=_quiet())
    strategy.train(tiny_bm.train_stream[0])
    old = sorted(int(c) for c in tiny_bm.train_stream[0].classes_in_this_experience)
    rows = model.linear.weight.detach()[old].clone(), model.linear.bias.detach()[old].clone()
    strategy.train(tiny_bm.train_stream[1])
    unchanged = torch.equal(model.linear.weight[old], rows[0]) and torch.equal(model.linear.bias[old], rows[1])
    assert unchanged == masked


def _official_codyra_taus(T, dense_fraction, lambda_num, max_kappa):
    """The threshold applied after each iteration, as models/codyra.py L646, L691-704, L789 compute it."""
    lambdas = np.linspace(0, max_kappa, lambda_num)
    dense_iters = dense_fraction * T
    step = int((T - dense_iters) // lambda_num)
    threshold_id, threshold, out = 0, 0.0, []
    for iteration in range(T):
        if step > 0 and iteration >= dense_iters and iteration % step == 0:
            threshold_id += 1
            threshold = lambdas[min(len(lambdas) - 1, threshold_id)]
        out.append(threshold if iteration > dense_iters else 0.0)
    return out


@pytest.mark.parametrize("T,dense,num,kappa", [(500, 0.5, 50, 5e-3), (100, 0.5, 5, 0.01), (37, 0.3, 4, 1.0),
                                               (40, 0.5, 50, 5e-3)])
def test_codyra_threshold_schedule_is_the_codes(T, dense, num, kappa):
    plugin = CoDyRAPlugin(r=2, max_kappa=kappa, dense_fraction=dense, lambda_num=num)
    plugin.start_schedule(T)
    ours = [plugin.current_tau(i) for i in range(T)]
    np.testing.assert_allclose(ours, _official_codyra_taus(T, dense, num, kappa), rtol=1e-6, atol=0)
    if T == 500:  # the runner: first threshold after iteration 251, max_kappa from 490 on
        assert ours[251] == pytest.approx(kappa / 49) and ours[250] == 0 and ours[490] == pytest.approx(kappa)


def test_codyra_says_when_an_experience_is_too_short_to_prune():
    plugin = CoDyRAPlugin(r=2)  # lambda_num 50: the second half of 99 iterations is too short, of 100 not
    with pytest.warns(UserWarning, match="no rank is pruned"):
        plugin.start_schedule(99)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CoDyRAPlugin(r=2).start_schedule(100)


def test_codyra_threshold_operators():
    w = torch.tensor([0.5, -0.5, 0.015, -0.015, 0.005, -0.009, 0.025, 0.0])
    tau = 0.01
    code = w.clone()  # models/codyra.py L793-795, literally
    code[code > tau] -= tau
    code[code < -tau] += tau
    code[torch.abs(code) < tau] = 0
    torch.testing.assert_close(threshold_(w.clone(), tau, "code"), code)
    torch.testing.assert_close(threshold_(w.clone(), tau, "code"),
                               torch.tensor([0.49, -0.49, 0.0, 0.0, 0.0, 0.0, 0.015, 0.0]))
    torch.testing.assert_close(threshold_(w.clone(), tau, "soft"),
                               torch.tensor([0.49, -0.49, 0.005, -0.005, 0.0, 0.0, 0.015, 0.0]))
    assert CoDyRAPlugin(r=2).threshold == "code"


# -- scales, ranks and learning rates by default ----------------------------------------------------------------

def _layer_scalings(strategy_cls, **kw):
    model = cifar_resnet(20, 10)
    strategy = strategy_cls(model=model, target_modules=TARGET, train_mb_size=64, evaluator=_quiet(), **kw)
    strategy.method_plugin.prepare(model)
    layers = [m for _, m in lora_layers(model)]
    return strategy, layers


@pytest.mark.parametrize("cls,r,scale,dropout", [(HiDeLoRA, 8, 1 / 8, 0.0), (OLoRA, 8, 4.0, 0.1),
                                                 (MergeLoRA, 8, 2.0, 0.1), (InfLoRA, 10, 1.0, 0.0),
                                                 (SDLoRA, 10, 1.0, 0.0), (CoDyRA, 16, 1.0, 0.0),
                                                 (EBLoRA, 16, 2.0, 0.0)])
def test_default_rank_scale_and_dropout_are_the_official_ones(cls, r, scale, dropout):
    strategy, layers = _layer_scalings(cls)
    if cls is HiDeLoRA:  # the task-shared model's LoRA too (continual_lora.py L7, L13)
        layers += [m for _, m in lora_layers(strategy.method_plugin.shared_model)]
    assert {m.r for m in layers} == {r}
    assert all(m.scaling == pytest.approx(scale) for m in layers)
    assert {getattr(m.lora_dropout, "p", 0.0) for m in layers} == {dropout}


def test_hide_lr_is_batch_scaled_and_both_models_are_clipped(tiny_bm):
    # trainers/hidelora_trainer.py L85-89: args.lr = args.lr * batch_size / 256
    strategy, _ = _layer_scalings(HiDeLoRA)
    assert isinstance(strategy.optimizer, torch.optim.Adam)
    assert strategy.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 64 / 256)
    cfg = parse_config(["--config", "experiments/configs/hide_lora.yaml"])
    model = cifar_resnet(32, 10)
    s = build_strategy(cfg, model, dict(train_mb_size=cfg["batch_size"], evaluator=_quiet()))
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * cfg["batch_size"] / 256)
    assert s.method_plugin.clip_grad == 2.0 and s.method_plugin.reg == 0.01

    class Norms(SupervisedPlugin):  # the gradient norm the optimizer steps with, under a huge loss
        norms = []

        def before_backward(self, strategy, **kwargs):
            strategy.loss = strategy.loss * 1e4

        def before_update(self, strategy, **kwargs):  # runs after HiDe's own before_update (plugin order)
            grads = [p.grad for p in strategy.model.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    model = cifar_resnet(20, 10)
    s = HiDeLoRA(model=model, target_modules=TARGET, train_mb_size=16, ca_epochs=1, n_centroids=2,
                 plugins=[Norms()], evaluator=_quiet())
    s.train(tiny_bm.train_stream[0])
    assert max(Norms.norms) == pytest.approx(2.0, rel=1e-4)


def test_method_defaults_apply_without_a_config():
    cfg = parse_config(["--method", "inflora"])
    assert cfg["r"] == 10 and cfg["optimizer"] == "adam" and cfg["lr"] == 5e-4
    assert cfg["lr_schedule"] == "cosine-inflora" and cfg["schedule_step"] == "epoch" and cfg["masked_loss"]
    model = cifar_resnet(20, 10)
    s = build_strategy(dict(cfg, target_modules=TARGET), model, dict(train_mb_size=32, evaluator=_quiet()))
    s.method_plugin.prepare(model)
    assert type(s.optimizer) is torch.optim.Adam and s.optimizer.param_groups[0]["lr"] == 5e-4
    assert {m.r for _, m in lora_layers(model)} == {10}
    c = parse_config(["--method", "codyra"])
    assert (c["optimizer"], c["lr"], c["betas"], c["lr_schedule"], c["r"], c["masked_loss"]) == (
        "adamw", 5e-4, [0.9, 0.9999], "cosine", 16, True)
    c = parse_config(["--method", "sd_lora"])
    assert (c["optimizer"], c["lr"], c["weight_decay"], c["momentum"], c["reset_magnitudes"]) == (
        "sgd", 8e-3, 0.0, 0.9, True)
    c = parse_config(["--method", "o_lora", "--lr", "0.002"])  # the user's value wins
    assert (c["lr"], c["alpha"], c["dropout"], c["masked_loss"]) == (0.002, 32.0, 0.1, True)
    with pytest.raises(ValueError, match="not an option of inflora"):
        parse_config(["--method", "inflora", "--max-kappa", "0.1"])


# -- a fresh optimizer per experience, and the schedules -----------------------------------------------------------

@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_state_is_empty_when_each_experience_starts(tiny_bm, reset):
    model = cifar_resnet(20, 10)
    spy = _Spy()
    s = MergeLoRA(model=model, target_modules=TARGET, r=2, train_mb_size=8, plugins=[spy],
                  reset_optimizer_state=reset, evaluator=_quiet())
    for exp in tiny_bm.train_stream:
        s.train(exp)
    assert spy.state_at_start[0] == 0
    assert (spy.state_at_start[1] == 0) == reset  # the head's AdamW moments would carry over otherwise


def test_schedules_restart_every_experience_with_the_official_formulas(tiny_bm):
    # merged LoRA: transformers' get_cosine_schedule_with_warmup, warm-up = steps // 18 (lora_forget.py L358-361)
    model = cifar_resnet(20, 10)
    spy = _Spy()
    s = MergeLoRA(model=model, target_modules=TARGET, r=2, train_mb_size=2, train_epochs=2, plugins=[spy],
                  evaluator=_quiet())
    for exp in tiny_bm.train_stream:
        s.train(exp)
    T = 2 * 20  # 40 images of 5 classes per experience, batch 2, 2 epochs
    W = T // 18

    def hf(step):
        if step < W:
            return step / max(1, W)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - W) / max(1, T - W))))

    for lrs in spy.lrs:
        assert len(lrs) == T
        np.testing.assert_allclose(lrs, [1e-3 * hf(i) for i in range(T)], rtol=1e-9, atol=1e-15)
    assert spy.lrs[0][0] == 0.0 and spy.lrs[1][0] == 0.0  # warm-up from 0, restarted

    # InfLoRA: CosineSchedule stepped once per epoch, lr * cos(99 pi e / (200 (K-1))) (utils/schedulers.py L54)
    model = cifar_resnet(20, 10)
    spy = _Spy()
    s = InfLoRA(model=model, target_modules=TARGET, r=2, train_mb_size=8, train_epochs=3, plugins=[spy],
                evaluator=_quiet())
    s.train(tiny_bm.train_stream[0])
    per_epoch = [5e-4 * math.cos(99 * math.pi * e / (200 * 2)) for e in range(3)]
    np.testing.assert_allclose(spy.lrs[0], np.repeat(per_epoch, 5), rtol=1e-9)
    assert lr_factor("cosine-inflora", 19, 20) == pytest.approx(0.0157, abs=1e-4)


# -- EBLoRA: every U, V step times sqrt(c / r) -------------------------------------------------------------------

def _polar(M):
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("c", [4096.0, None])
def test_eblora_step_is_the_codes_rescaled_riemannian_step(tiny_bm, c):
    """post_step of llava/train/riemannian_adam.py L116-159: delta = (X_new - X_old) / sqrt(r / c), projected on
    the tangent space at X_old, retracted by the polar factor (U_svd V_svdᵀ)."""
    model = cifar_resnet(20, 10)
    kw = {} if c == 4096.0 else dict(grad_scaling=None)
    s = EBLoRA(model=model, target_modules=r"layer3\.2\.conv2", r=4, train_mb_size=8, evaluator=_quiet(), **kw)
    plugin = s.method_plugin
    assert EBLoRA(model=cifar_resnet(20, 10), evaluator=_quiet()).method_plugin.grad_scaling == 4096.0
    # drive one iteration by hand: Avalanche's order is before_update, optimizer step, after_update
    plugin.prepare(model)
    s.experience = tiny_bm.train_stream[0]
    s.model = model
    s.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    layer = plugin._layers(model)[0]
    with torch.no_grad():
        layer.lora_scale.fill_(0.5)  # at s = 0 U and V get no gradient
    x = torch.randn(4, 3, 32, 32)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    plugin.before_update(s)
    U0, V0 = layer.U().clone(), layer.V().clone()
    s.optimizer.step()
    U1, V1 = layer.U().clone(), layer.V().clone()
    plugin.after_update(s)
    k = math.sqrt((c or 4) / 4)  # r = 4
    dU = (U1 - U0) * k
    dU = dU - U0 @ (dU.T @ U0)
    dV = (V1 - V0) * k
    dV = dV - V0 @ (dV.T @ V0)
    torch.testing.assert_close(layer.U(), _polar(U0 + dU), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.V(), _polar(V0 + dV), atol=1e-5, rtol=0)
    assert float((layer.U() - U0).norm()) > 0


# -- SD-LoRA: every past magnitude back at 0.8 when a task starts ------------------------------------------------

@pytest.mark.parametrize("reset", [True, False])
def test_sd_lora_past_magnitudes_restart_at_init(tmp_path, reset):
    """models/sdlora.py L109 rebuilds the backbone, with every magnitude at 0.8 (backbone/lora.py L326-328), at
    every task."""
    from experiments.benchmarks import arrays_benchmark

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(9), 8)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    x[..., 0] = (y * 25)[:, None, None]
    np.savez(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x[::4], y_test=y[::4])
    bm = arrays_benchmark(tmp_path / "c.npz", 3, seed=0)
    model = cifar_resnet(20, 9)
    mags_at_start = []

    class Spy(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            mags_at_start.append({k: float(v) for k, v in strategy.model.sd_lora_magnitudes.past.items()})

    s = SDLoRA(model=model, target_modules=TARGET, r=2, train_mb_size=4, plugins=[Spy()], evaluator=_quiet(),
               reset_magnitudes=reset, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    for exp in bm.train_stream:
        s.train(exp)
    assert mags_at_start[0] == {} and mags_at_start[1] == {"0": pytest.approx(0.8)}
    learnt = float(model.sd_lora_magnitudes.past["0"])  # trained during tasks 1 and 2
    assert learnt != pytest.approx(0.8)
    if reset:
        assert mags_at_start[2] == {"0": pytest.approx(0.8), "1": pytest.approx(0.8)}
    else:
        assert mags_at_start[2]["0"] != pytest.approx(0.8)


def test_plugins_and_their_strategies_share_every_default():
    """A method's defaults live twice (the plugin, usable in any Avalanche strategy, and its strategy): they agree."""
    import inspect

    from strategies import method_registry

    for name, cls in method_registry().items():
        if cls.plugin_class is None or cls.plugin_class.__init__.__module__.startswith("avalanche"):
            continue  # Avalanche's own plugins (EWC, LwF): the baseline strategy chooses their defaults
        plugin = inspect.signature(cls.plugin_class.__init__).parameters
        for k, p in inspect.signature(cls.__init__).parameters.items():
            if k in plugin and p.kind is inspect.Parameter.KEYWORD_ONLY:
                assert plugin[k].default == p.default, f"{name}: {k} is {plugin[k].default} in the plugin, " \
                                                       f"{p.default} in the strategy"
