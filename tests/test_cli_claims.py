"""README claims about CLI options that no other test exercised: --keep-head, --bn (frozen / train / auto, and auto
with --per-task-bn), --rslora and --dropout reaching the layers (dropout active while training), the `auto` targets
of every backbone family, InfLoRA's refusal of the loralib conv shape, bit-identical --resume for merged LoRA,
CoDyRA and EBLoRA, and the distributed digest check (`_ranks_in_sync`)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import nn

import experiments.run as run_mod
from experiments.run import build_model, build_strategy, main, parse_config
from models import (LoRAConv2d, TaskIncrementalClassifier, add_lora, build_backbone, cifar_resnet,
                    find_head, lora_layers, vit_cifar)

BN = nn.modules.batchnorm._BatchNorm


# -- helpers ---------------------------------------------------------------------------------------------------------
def _made_data(tmp_path, n_classes=10, per_class=4, name="made.npz"):
    """Arrays .npz whose green channel encodes the class (a planted label)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes), per_class)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    x[..., 1] = (y * (250 // n_classes))[:, None, None]
    path = tmp_path / name
    np.savez(path, x_train=x, y_train=y, x_test=x[::2], y_test=y[::2])
    return path


def _resnet20_checkpoint(tmp_path, num_classes=10, name="r20.pt"):
    """A random cifar_resnet20 state dict with non-trivial BatchNorm statistics and affine parameters (so a BN
    that trains or is re-initialised cannot go unnoticed); returns (path, state dict)."""
    torch.manual_seed(123)
    model = cifar_resnet(20, num_classes)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BN):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.num_batches_tracked.fill_(100)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / name
    torch.save(sd, path)
    return path, sd


def _tiny_args(data, out, *extra):
    return ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--backbone", "cifar_resnet20",
            "--batch-size", "8", "--epochs", "1", "--seed", "0", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


class _Spy(SupervisedPlugin):
    """Records, while the strategy trains: the head at the start of the first experience, the mode of every
    BatchNorm at each of its forward passes and the mode of every LoRA dropout after each forward."""

    def __init__(self):
        super().__init__()
        self.head0 = None
        self.bn_modes: list[bool] = []
        self.dropout_modes: list[tuple] = []
        self._training = False
        self._hooked = False

    def before_training_exp(self, strategy, **kwargs):
        model = strategy.model
        if self.head0 is None:
            found = find_head(model)
            if found is not None:
                self.head0 = {k: v.detach().clone() for k, v in found[1].state_dict().items()}
        if not self._hooked:
            for m in model.modules():
                if isinstance(m, BN):
                    m.register_forward_pre_hook(self._bn_hook)
            self._hooked = True
        self._training = True

    def _bn_hook(self, module, args):
        if self._training:
            self.bn_modes.append(module.training)

    def after_forward(self, strategy, **kwargs):
        for _, layer in lora_layers(strategy.model):
            d = layer.lora_dropout
            self.dropout_modes.append((type(d).__name__, getattr(d, "p", 0.0), d.training))

    def after_training_exp(self, strategy, **kwargs):
        self._training = False


def _spy_on_run(monkeypatch) -> _Spy:
    """Adds a _Spy to the strategy that experiments.run builds."""
    spy = _Spy()
    real = run_mod.build_strategy

    def with_spy(cfg, model, common):
        return real(cfg, model, dict(common, plugins=list(common.get("plugins") or []) + [spy]))

    monkeypatch.setattr(run_mod, "build_strategy", with_spy)
    return spy


# -- 1. --keep-head ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_retention_head", [True, False])  # run() asks for the pretrained head, evaluate_checkpoint not
def test_keep_head_keeps_a_pretrained_head_of_the_right_size(tmp_path, with_retention_head):
    ck, sd = _resnet20_checkpoint(tmp_path, 10)

    def head_of(*flags, n_classes=10, per_exp=2):
        cfg = parse_config(["--backbone", "cifar_resnet20", "--backbone-weights", str(ck), *flags])
        built = build_model(cfg, n_classes, per_exp, return_pretrained_head=with_retention_head)
        model = built[0] if with_retention_head else built
        return cfg, model, find_head(model)

    cfg, model, (name, head) = head_of("--keep-head")
    assert cfg["keep_head"] is True and name == "linear"
    assert torch.equal(head.weight, sd["linear.weight"]) and torch.equal(head.bias, sd["linear.bias"])
    assert torch.equal(model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])  # the backbone is loaded too

    cfg, model, (name, head) = head_of()  # without --keep-head: a fresh head of the same size
    assert cfg["keep_head"] is False and head.weight.shape == sd["linear.weight"].shape
    assert not torch.equal(head.weight, sd["linear.weight"]) and not torch.equal(head.bias, sd["linear.bias"])
    assert torch.equal(model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])

    # a head of another size cannot be kept: a fresh one with the benchmark's classes
    _, _, (_, head) = head_of("--keep-head", n_classes=6)
    assert head.out_features == 6
    # task-incremental: per-task heads whatever --keep-head says
    _, model, _ = head_of("--keep-head", "--task-incremental")
    assert isinstance(model, TaskIncrementalClassifier)
    assert isinstance(model.backbone.linear, nn.Identity)


def test_keep_head_without_weights_is_a_fresh_head(tmp_path):
    cfg = parse_config(["--backbone", "cifar_resnet20", "--keep-head"])
    torch.manual_seed(0)
    a = build_model(cfg, 10, 2)
    torch.manual_seed(1)
    b = build_model(cfg, 10, 2)
    assert a.linear.out_features == 10 and not torch.equal(a.linear.weight, b.linear.weight)


# -- 2. --bn ----------------------------------------------------------------------------------------------------------
_BN_CASES = {
    # id: (method, weights?, --bn, extra flags, resolved bn)
    "frozen": ("merge_lora", True, "frozen", [], "frozen"),
    "train": ("merge_lora", True, "train", [], "train"),
    "auto-weights-keep-head": ("merge_lora", True, "auto", ["--keep-head"], "frozen"),
    "auto-no-weights": ("merge_lora", False, "auto", [], "train"),
    "naive-frozen": ("naive", True, "frozen", [], "frozen"),
    "naive-train": ("naive", True, "train", [], "train"),
    "per-task-bn-auto": ("per_task_lora", True, "auto", ["--per-task-bn", "--task-incremental"], "train"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_BN_CASES))
def test_bn_option_resolves_and_behaves(tmp_path, monkeypatch, case):
    method, weights, bn, extra, resolved = _BN_CASES[case]
    data = _made_data(tmp_path)
    ck, sd = _resnet20_checkpoint(tmp_path)
    out = tmp_path / "run"
    spy = _spy_on_run(monkeypatch)
    lr = "0.005" if method == "naive" else "0.05"  # every weight trains in naive: a smaller step
    args = _tiny_args(data, out, "--method", method, "--bn", bn, "--lr", lr, *extra,
                      *([] if method == "naive" else ["--r", "2"]),  # naive has no rank
                      *(["--backbone-weights", str(ck)] if weights else []))
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["bn"] == resolved
    final = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    bn_names = [k.rsplit(".", 1)[0] for k in sd if k.endswith("running_mean")]
    assert len(bn_names) == 19  # stem + 2 per block of a ResNet-20
    assert spy.bn_modes, "no BatchNorm forward was seen while training"

    if case == "per-task-bn-auto":
        # the per-task copies train (statistics move), the frozen pre-task copy keeps the checkpoint's
        for n in bn_names:
            p = f"backbone.{n}"  # task-incremental: the backbone inside the per-task heads' wrapper
            for t in ("running_mean", "running_var", "num_batches_tracked"):
                assert torch.equal(final[f"{p}.pretrained.{t}"], sd[f"{n}.{t}"]), (n, t)
            for key in (f"{p}.bank.0.running_mean", f"{p}.bank.1.running_mean", f"{p}.bn.running_mean"):
                assert not torch.equal(final[key], sd[f"{n}.running_mean"]), key
            assert not torch.equal(final[f"{p}.bank.0.running_mean"], final[f"{p}.bank.1.running_mean"])
        assert any(spy.bn_modes)
        return

    if resolved == "frozen":
        assert not any(spy.bn_modes), "a BatchNorm ran in train mode while --bn frozen"
        for n in bn_names:
            for t in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
                assert torch.equal(final[f"{n}.{t}"], sd[f"{n}.{t}"]), (n, t)
    else:
        assert all(spy.bn_modes), "a BatchNorm ran in eval mode while --bn train"
        before = sd if weights else cifar_resnet(20, 10).state_dict()  # init statistics: 0 / 1 / 0
        for n in bn_names:
            for t in ("running_mean", "running_var"):
                assert not torch.equal(final[f"{n}.{t}"], before[f"{n}.{t}"]), (n, t)
            assert int(final[f"{n}.num_batches_tracked"]) > int(before[f"{n}.num_batches_tracked"])
        if method == "naive":  # full fine-tuning with BN training: the affine parameters train too
            assert any(not torch.equal(final[f"{n}.weight"], sd[f"{n}.weight"]) for n in bn_names)
    if method == "naive":  # the rest of the backbone trained in both modes
        assert not torch.equal(final["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])
    if "--keep-head" in extra:  # --keep-head: training started from the checkpoint's head
        assert spy.head0 is not None
        assert torch.equal(spy.head0["weight"], sd["linear.weight"]) and torch.equal(spy.head0["bias"],
                                                                                      sd["linear.bias"])
    elif weights and method == "merge_lora":
        assert not torch.equal(spy.head0["weight"], sd["linear.weight"])  # class-IL: a fresh head


# -- 3. --rslora, --dropout -------------------------------------------------------------------------------------------
def _built(argv, n_classes=10, per_exp=2):
    """The model a CLI run would train, with the method's layers injected (as run() does before training)."""
    cfg = parse_config(["--backbone", "cifar_resnet20", *argv])
    torch.manual_seed(0)
    model = build_model(cfg, n_classes, per_exp)
    strategy = build_strategy(cfg, model, dict(criterion=nn.CrossEntropyLoss(), train_mb_size=8, eval_mb_size=8,
                                               device="cpu", evaluator=None))
    strategy.method_plugin.prepare(model)
    return cfg, model, strategy


@pytest.mark.parametrize("method", ["merge_lora", "per_task_lora"])
@pytest.mark.parametrize("rslora", [True, False])
def test_rslora_from_the_cli_reaches_the_layers(method, rslora):
    cfg, model, _ = _built(["--method", method, "--r", "4", "--alpha", "6", "--dropout", "0",
                            *(["--rslora"] if rslora else ["--no-rslora"])])
    assert cfg["rslora"] is rslora
    layers = lora_layers(model)
    assert len(layers) == 18
    want = 6 / math.sqrt(4) if rslora else 6 / 4
    for name, layer in layers:
        assert layer.rslora is rslora and layer.r == 4 and layer.alpha == 6.0, name
        assert layer.scaling == pytest.approx(want), name
    if method == "merge_lora":  # the scale is the one applied
        layer = layers[0][1]
        with torch.no_grad():
            layer.lora_B.normal_()
        expected = torch.einsum("or,rikl->oikl", layer.lora_B[:, :, 0, 0], layer.lora_A) * want
        torch.testing.assert_close(layer.delta_weight(), expected)


@pytest.mark.parametrize("method", ["eblora", "inflora", "codyra"])
def test_rslora_is_refused_by_methods_without_it(method):
    with pytest.raises(ValueError, match="--rslora is not an option of " + method):
        parse_config(["--method", method, "--rslora"])


@pytest.mark.parametrize("method", ["merge_lora", "per_task_lora", "codyra", "o_lora", "sd_lora", "hide_lora"])
def test_dropout_from_the_cli_reaches_every_layer(method):
    cfg, model, _ = _built(["--method", method, "--dropout", "0.3"])
    assert cfg["dropout"] == 0.3
    layers = lora_layers(model)
    assert layers
    for name, layer in layers:
        assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.3, name
    _, model, _ = _built(["--method", method, "--dropout", "0"])
    assert all(isinstance(layer.lora_dropout, nn.Identity) for _, layer in lora_layers(model))


def test_dropout_is_active_in_a_training_forward_and_off_in_eval():
    """The CLI's layer: a training forward drops the adapter's input (the same mask reproduces it, another one
    differs), an eval forward does not."""
    _, model, _ = _built(["--method", "merge_lora", "--dropout", "0.5", "--r", "2"])
    name, layer = next((n, m) for n, m in lora_layers(model) if n == "layer2.1.conv1")
    assert isinstance(layer, LoRAConv2d) and layer.conv_mode == "kxk_1x1"
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero, which would hide any dropout
    base, A, B, s = layer.base_layer, layer.lora_A, layer.lora_B, layer.scaling
    x = torch.randn(3, base.in_channels, 8, 8)

    def reference(xa):
        h = F.conv2d(xa, A, stride=base.stride, padding=base.padding, dilation=base.dilation)
        return base(x) + s * F.conv2d(h, B)

    model.train()
    for grad in (True, False):  # both training paths (with and without autograd)
        with torch.set_grad_enabled(grad):
            torch.manual_seed(11)
            y1 = layer(x)
            y2 = layer(x)
            torch.manual_seed(11)
            mask_x = F.dropout(x, 0.5, training=True)
        assert not torch.allclose(y1, y2), "two training forwards gave the same output: dropout is off"
        torch.testing.assert_close(y1.detach(), reference(mask_x).detach())
        assert not torch.allclose(y1, reference(x))
    model.eval()
    with torch.no_grad():
        e1, e2 = layer(x), layer(x)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, reference(x), rtol=1e-4, atol=1e-5)


class _StochasticSpy(_Spy):
    """Also forwards the training mini-batch twice more (no gradients) once an adapter is non-zero: dropout on the
    adapters' input makes the two outputs differ."""

    def __init__(self):
        super().__init__()
        self.differs: list[bool] = []

    def after_forward(self, strategy, **kwargs):
        super().after_forward(strategy, **kwargs)
        if any(bool(layer.lora_B.detach().abs().sum() > 0) for _, layer in lora_layers(strategy.model)):
            with torch.no_grad():
                a, b = strategy.model(strategy.mb_x), strategy.model(strategy.mb_x)
            self.differs.append(not torch.allclose(a, b))


@pytest.mark.parametrize("method", ["merge_lora", "codyra", "o_lora", "per_task_lora"])
def test_dropout_stays_on_while_the_strategy_trains(tmp_path, method):
    """Nothing in the strategy (BatchNorm freezing, the method's own passes) switches the adapters' dropout off
    during training forwards, and those forwards are stochastic."""
    from avalanche.training.plugins import EvaluationPlugin

    from strategies import FreezeBatchNormPlugin

    data = _made_data(tmp_path, per_class=4)
    cfg = parse_config(["--benchmark", "arrays", "--data", str(data), "--n-experiences", "2", "--backbone",
                        "cifar_resnet20", "--method", method, "--dropout", "0.4", "--r", "2", "--lr", "0.05"])
    bm = run_mod.build_benchmark(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, 10, 5)
    spy = _StochasticSpy()
    strategy = build_strategy(cfg, model, dict(
        criterion=nn.CrossEntropyLoss(), train_mb_size=4, train_epochs=1, eval_mb_size=16, device="cpu",
        plugins=[FreezeBatchNormPlugin(), spy], evaluator=EvaluationPlugin(loggers=[])))
    strategy.train(bm.train_stream[0])
    assert spy.dropout_modes and set(spy.dropout_modes) == {("Dropout", 0.4, True)}
    assert spy.bn_modes and not any(spy.bn_modes)  # the BN plugin froze BatchNorm, not the dropout
    assert spy.differs and all(spy.differs)


# -- 4. auto targets --------------------------------------------------------------------------------------------------
def _resnet_basic_names(prefix=""):
    """The 3x3 stage convs of a CIFAR ResNet-20 (3 stages x 3 blocks x conv1, conv2)."""
    return [f"{prefix}layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in range(3) for c in (1, 2)]


def _resnet18_names():
    """Every ungrouped conv of a (torchvision / timm) ResNet-18 but nothing else: stem, 4 stages x 2 blocks x 2 3x3
    convs, the 1x1 projection shortcut of stages 2-4; the head `fc` excluded."""
    names = ["conv1"]
    for s in (1, 2, 3, 4):
        for b in (0, 1):
            names += [f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"]
            if b == 0 and s > 1:
                names.append(f"layer{s}.0.downsample.0")
    return names


def _tv_mobilenet_v2_names():
    """torchvision MobileNetV2: stem 3x3 conv, block 1 (no expansion) pointwise projection, blocks 2-17 the 1x1
    expansion and 1x1 projection (never the depthwise 3x3), the last 1x1 conv; the head `classifier.1` excluded."""
    names = ["features.0.0", "features.1.conv.1"]
    for i in range(2, 18):
        names += [f"features.{i}.conv.0.0", f"features.{i}.conv.2"]
    return names + ["features.18.0"]


def _pcv_resnet20_names():
    names = ["features.init_block.conv"]
    for s in (1, 2, 3):
        for u in (1, 2, 3):
            names += [f"features.stage{s}.unit{u}.body.conv1.conv", f"features.stage{s}.unit{u}.body.conv2.conv"]
            if s > 1 and u == 1:
                names.append(f"features.stage{s}.unit1.identity_conv.conv")
    return names


def _pcv_mobilenetv2_names():
    names = ["features.init_block.conv"]
    for s, n in ((1, 1), (2, 2), (3, 3), (4, 7), (5, 4)):
        for u in range(1, n + 1):  # conv2 is the depthwise conv
            names += [f"features.stage{s}.unit{u}.conv1.conv", f"features.stage{s}.unit{u}.conv3.conv"]
    return names + ["features.final_block.conv"]


def _vit_names(depth, prefix=""):
    return [f"{prefix}blocks.{i}.{m}" for i in range(depth) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pw(F.relu(self.dw(F.relu(self.stem(x))))).mean((2, 3))
        return self.head(F.relu(self.fc1(x)))


_AUTO_CASES = {
    "cifar_resnet20": (lambda: cifar_resnet(20, 10), _resnet_basic_names(), (2, 3, 32, 32)),
    "cifar_resnet20-task-il": (lambda: TaskIncrementalClassifier(cifar_resnet(20, 10), 2),
                               _resnet_basic_names("backbone."), None),
    "vit_cifar": (lambda: vit_cifar(10, depth=2, embed_dim=48, num_heads=3), _vit_names(2), (2, 3, 32, 32)),
    "vit_cifar-task-il": (lambda: TaskIncrementalClassifier(vit_cifar(10, depth=2, embed_dim=48, num_heads=3), 2),
                          _vit_names(2, "backbone."), None),
    "torchvision:resnet18": (lambda: build_backbone("torchvision:resnet18", 5), _resnet18_names(), (2, 3, 32, 32)),
    "torchvision:mobilenet_v2": (lambda: build_backbone("torchvision:mobilenet_v2", 5), _tv_mobilenet_v2_names(),
                                 (2, 3, 32, 32)),
    "timm:resnet18": (lambda: build_backbone("timm:resnet18", 5), _resnet18_names(), (2, 3, 32, 32)),
    "timm:vit_tiny_patch16_224": (lambda: build_backbone("timm:vit_tiny_patch16_224", 5, img_size=32),
                                  _vit_names(12), (2, 3, 32, 32)),
    "pytorchcv:resnet20_cifar10": (lambda: build_backbone("pytorchcv:resnet20_cifar10", 5), _pcv_resnet20_names(),
                                   (2, 3, 32, 32)),
    "pytorchcv:mobilenetv2_w1": (lambda: build_backbone("pytorchcv:mobilenetv2_w1", 5), _pcv_mobilenetv2_names(),
                                 (2, 3, 64, 64)),
    "custom": (_Custom, ["stem", "pw", "fc1"], (2, 3, 8, 8)),
}


@pytest.mark.parametrize("case", list(_AUTO_CASES))
def test_auto_targets_of_every_backbone_family(case):
    make, expected, shape = _AUTO_CASES[case]
    torch.manual_seed(0)
    model = make()
    head_name = find_head(model)[0]
    names = add_lora(model, "auto", r=2)
    assert names == expected
    assert head_name not in names
    # the head and nothing else but the adapters trains
    trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}".rsplit(".", 1)[0] for n in names for ab in "AB"} | {head_name}
    if shape is not None:  # the adapted model still runs, and every adapter is on the path
        for _, layer in lora_layers(model):
            with torch.no_grad():
                layer.lora_B.normal_(std=1e-2)
        model.eval()
        model(torch.randn(*shape)).sum().backward()
        assert all(layer.lora_B.grad is not None for _, layer in lora_layers(model))


@pytest.mark.parametrize("argv,expected", [
    (["--backbone", "cifar_resnet20"], _resnet_basic_names()),
    (["--backbone", "cifar_resnet20", "--task-incremental"], _resnet_basic_names("backbone.")),
    (["--backbone", "torchvision:resnet18"], _resnet18_names()),
])
@pytest.mark.parametrize("method", ["merge_lora", "codyra", "inflora"])
def test_cli_auto_targets_are_the_same(argv, expected, method):
    """--target-modules auto (every method's default) resolves on the CLI's model to the same modules."""
    cfg = parse_config(argv + ["--method", method])
    assert cfg["target_modules"] == "auto"
    torch.manual_seed(0)
    model = build_model(cfg, 10, 2)
    strategy = build_strategy(cfg, model, dict(criterion=nn.CrossEntropyLoss(), train_mb_size=8, eval_mb_size=8,
                                               device="cpu", evaluator=None))
    strategy.method_plugin.prepare(model)
    assert [n for n, _ in lora_layers(model)] == expected
    assert strategy.method_plugin.adapted_modules == expected


def test_auto_targets_on_a_torchvision_vit_keep_it_running():
    """``auto`` leaves nn.MultiheadAttention's out_proj alone (it reads that weight directly); targeting it by name
    is refused before anything is wrapped."""
    torch.manual_seed(0)
    model = build_backbone("torchvision:vit_b_16", 5, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    names = add_lora(model, "auto", r=2)
    assert "heads.head" not in names and not any(n.endswith("out_proj") for n in names)
    assert any(n.endswith("mlp.0") for n in names)
    with torch.no_grad():
        model(x)
    fresh = build_backbone("torchvision:vit_b_16", 5, image_size=32)
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        add_lora(fresh, ["out_proj"], r=2)


# -- 5. InfLoRA refuses the loralib shape -----------------------------------------------------------------------------
def test_inflora_refuses_loralib_before_any_work(tmp_path, capsys):
    data = _made_data(tmp_path)
    out = tmp_path / "never"
    args = _tiny_args(data, out, "--method", "inflora", "--conv-mode", "loralib")
    with pytest.raises(ValueError) as e:
        parse_config(args)
    msg = str(e.value)
    assert "--conv-mode is not an option of inflora" in msg  # the problem
    assert "drop it" in msg and "merge_lora" in msg  # the fix: drop the flag, or a method that has it
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --conv-mode is not an option of inflora") and "Traceback" not in err
    assert not out.exists()  # refused before anything was written (no training)

    cfg_file = tmp_path / "inflora.yaml"  # the same from a config file
    cfg_file.write_text("method: inflora\nconv_mode: loralib\n")
    with pytest.raises(ValueError, match="--conv-mode is not an option of inflora"):
        parse_config(["--config", str(cfg_file)])

    # without the flag InfLoRA runs its own shape: kxk_1x1 on every stage conv
    _, model, _ = _built(["--method", "inflora", "--r", "2"])
    layers = lora_layers(model)
    assert len(layers) == 18 and {layer.conv_mode for _, layer in layers} == {"kxk_1x1"}


# -- 6. bit-identical resume ------------------------------------------------------------------------------------------
def _tensors(obj, prefix=""):
    return run_mod._tensors(obj, prefix)  # every tensor of a checkpoint by dotted path (a walk, not a formula)


_RESUME_CASES = {
    "merge_lora": ["--method", "merge_lora", "--dropout", "0.1"],  # dropout on: the RNG state must survive too
    "merge_lora-keep-optimizer-state": ["--method", "merge_lora", "--keep-optimizer-state", "--optimizer", "adam"],
    "codyra": ["--method", "codyra"],
    "eblora": ["--method", "eblora"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_RESUME_CASES))
def test_resume_after_the_first_experience_is_bit_identical(tmp_path, capsys, monkeypatch, case):
    import experiments.checkpoint as ckpt

    data = _made_data(tmp_path, n_classes=6, per_class=12)
    args = ["--benchmark", "arrays", "--data", str(data), "--n-experiences", "3", "--backbone", "cifar_resnet20",
            "--batch-size", "8", "--epochs", "2", "--r", "2", "--seed", "1", "--threads", "1", "--no-progress",
            "--lr", "0.02", *_RESUME_CASES[case]]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    assert main(args + ["--out", str(ref_out)]) == 0
    reference = json.loads((ref_out / "results.json").read_text())
    assert reference["finished"] and len(reference["accuracy_matrix"]) == 3

    real_save = ckpt.save_checkpoint

    def save_then_interrupt(*a, **kw):
        real_save(*a, **kw)
        raise KeyboardInterrupt("interrupted after the first experience")

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_interrupt)
    assert main(args + ["--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err
    partial = json.loads((out / "results.json").read_text())
    assert partial["experiences_done"] == 1 and not partial["finished"]
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert main(args + ["--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["finished"] and resumed["resumed_at"] == [1]
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]  # bit-identical floats
    assert resumed["train_iterations"] == reference["train_iterations"]
    for key in ("rank_history", "subspace_history", "rank_degraded"):
        assert resumed.get(key) == reference.get(key), key

    a = torch.load(ref_out / "checkpoint.pt", weights_only=True)
    b = torch.load(out / "checkpoint.pt", weights_only=True)
    assert a["experience"] == b["experience"] == 2
    assert a["model"].keys() == b["model"].keys() and a["optimizer"]["state"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for part in ("plugin", "optimizer"):
        ta, tb = dict(_tensors(a[part])), dict(_tensors(b[part]))
        assert ta.keys() == tb.keys(), part
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (part, k)
    assert a["optimizer"]["groups"] == b["optimizer"]["groups"]
    assert a["clock"] == b["clock"]  # Avalanche's counters continue (the logs' x axis, iteration-based schedules)


# -- 7. the distributed digest check ----------------------------------------------------------------------------------
class _PluginWithState:
    def __init__(self, t):
        self.t = t

    def state_dict(self):
        return {"subspaces": {"layer3.0.conv1": self.t}, "history": [1, 2]}


def _digests(monkeypatch, model, plugin=None) -> dict:
    """What this rank would send to gather_all_objects."""
    from avalanche.distributed import DistributedHelper

    seen = {}

    def capture(obj):
        seen["mine"] = obj
        return [obj]

    monkeypatch.setattr(DistributedHelper, "gather_all_objects", capture)
    assert run_mod._ranks_in_sync(model, plugin) is True
    return seen["mine"]


def test_ranks_in_sync_names_the_tensors_that_differ(monkeypatch):
    from avalanche.distributed import DistributedHelper

    torch.manual_seed(0)
    model = cifar_resnet(20, 10)
    plugin = _PluginWithState(torch.randn(16, 2))
    mine = _digests(monkeypatch, model, plugin)
    assert set(mine) == set(model.state_dict()) | {"plugin.subspaces.layer3.0.conv1"}  # every tensor, buffers too

    # another rank whose model differs in one weight by one ulp and in one BatchNorm buffer, and whose plugin
    # state differs: its real digests
    other = cifar_resnet(20, 10)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        w = other.layer2[1].conv2.weight
        w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(float("inf")))
        other.layer1[0].bn1.running_var[3] += 1e-3
    theirs = _digests(monkeypatch, other, _PluginWithState(plugin.t + 1))

    calls = []

    def gather(obj):
        calls.append(obj)
        return [obj, theirs]

    monkeypatch.setattr(DistributedHelper, "gather_all_objects", gather)
    with pytest.raises(RuntimeError) as e:
        run_mod._ranks_in_sync(model, plugin)
    msg = str(e.value)
    assert "Ranks hold different tensors" in msg
    for name in ("layer2.1.conv2.weight", "layer1.0.bn1.running_var", "plugin.subspaces.layer3.0.conv1"):
        assert name in msg
    assert "layer1.0.conv1.weight" not in msg and f"(3 of {len(mine)})" in msg
    assert calls == [mine]

    # identical ranks pass
    monkeypatch.setattr(DistributedHelper, "gather_all_objects", lambda obj: [obj, dict(mine)])
    assert run_mod._ranks_in_sync(model, plugin) is True
    # a rank that lacks a tensor differs too
    short = dict(mine)
    short.pop("linear.bias")
    monkeypatch.setattr(DistributedHelper, "gather_all_objects", lambda obj: [obj, short])
    with pytest.raises(RuntimeError, match=r"linear\.bias"):
        run_mod._ranks_in_sync(model, plugin)


def test_ranks_in_sync_lists_at_most_ten_names(monkeypatch):
    from avalanche.distributed import DistributedHelper

    torch.manual_seed(0)
    model = cifar_resnet(20, 10)
    mine = _digests(monkeypatch, model)
    theirs = {k: "0" * 64 for k in mine}  # every tensor differs
    monkeypatch.setattr(DistributedHelper, "gather_all_objects", lambda obj: [theirs, obj])
    with pytest.raises(RuntimeError) as e:
        run_mod._ranks_in_sync(model)
    msg = str(e.value)
    assert msg.count("'") == 20 and " ..." in msg and f"({len(mine)} of {len(mine)})" in msg
