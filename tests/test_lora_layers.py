"""LoRA layers: the forward pass is base + scaling·B·A, merging is exact and explicit, shapes and errors."""

import math

import pytest
import torch
from torch import nn

from models import LoRAConv2d, LoRALinear, lora_scaling


def _randomize(layer):
    """B starts at zero, which would make every equality below trivially true."""
    with torch.no_grad():
        layer.lora_A.normal_(0, 0.3)
        layer.lora_B.normal_(0, 0.3)


def _check_merge_equals_unmerged(layer, x, atol=1e-5):
    _randomize(layer)
    layer.eval()
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y_base = layer.base_layer(x)
        y_unmerged = layer(x)
        assert (y_unmerged - y_base).abs().max() > 1e-3, "adapter has no effect: the test could not fail"
        layer.merge()
        y_merged = layer(x)
        layer.unmerge()
        y_back = layer(x)
    torch.testing.assert_close(y_merged, y_unmerged, atol=atol, rtol=0)
    torch.testing.assert_close(y_back, y_unmerged, atol=atol, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_linear_forward_is_base_plus_scaled_BA():
    base = nn.Linear(20, 12)
    layer = LoRALinear(base, r=4, alpha=8)
    _randomize(layer)
    x = torch.randn(5, 20)
    expected = base(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A)


def test_init_A_kaiming_B_zero_so_output_unchanged():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() > 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in 16
    assert layer.lora_A.abs().max() <= bound + 1e-6
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), base(x))


def test_scaling_defaults_and_rslora():
    assert lora_scaling(8, None) == 1.0
    assert lora_scaling(8, 16) == 2.0
    assert lora_scaling(16, 4, rslora=True) == 1.0
    layer = LoRALinear(nn.Linear(8, 8), r=4, alpha=2, rslora=True)
    assert layer.scaling == pytest.approx(1.0)


@pytest.mark.parametrize("r,alpha", [(1, None), (4, 1.0), (8, 32.0)])
def test_linear_merge_equals_unmerged(r, alpha):
    _check_merge_equals_unmerged(LoRALinear(nn.Linear(32, 24), r=r, alpha=alpha), torch.randn(7, 32))


CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=1, padding=2, dilation=2),
    dict(kernel_size=5, stride=2, padding=0),
    dict(kernel_size=1, stride=1, padding=0),
    dict(kernel_size=3, stride=1, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, stride=1, padding=1, bias=False),
]


@pytest.mark.parametrize("mode", ["kxk_1x1", "loralib"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv_merge_equals_unmerged(mode, case):
    conv = nn.Conv2d(6, 10, **case)
    _check_merge_equals_unmerged(LoRAConv2d(conv, r=2, alpha=3, conv_mode=mode), torch.randn(2, 6, 11, 11))


def test_grouped_conv_kxk_1x1_is_exact():
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=4)
    layer = LoRAConv2d(conv, r=4, conv_mode="kxk_1x1")
    assert layer.delta_weight().shape == conv.weight.shape
    _check_merge_equals_unmerged(layer, torch.randn(2, 8, 9, 9))


def test_conv_delta_shapes_and_rank():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    peft = LoRAConv2d(conv, r=2, conv_mode="kxk_1x1")
    assert tuple(peft.lora_A.shape) == (2, 16, 3, 3) and tuple(peft.lora_B.shape) == (32, 2, 1, 1)
    _randomize(peft)
    assert torch.linalg.matrix_rank(peft.delta_weight().reshape(32, -1)) == 2
    loralib = LoRAConv2d(nn.Conv2d(16, 32, 3, padding=1), r=2, conv_mode="loralib")
    assert tuple(loralib.lora_A.shape) == (6, 48) and tuple(loralib.lora_B.shape) == (96, 6)
    _randomize(loralib)
    # the (out·k, in·k) product has rank r·k, reinterpreted as (out, in, k, k)
    assert torch.linalg.matrix_rank(loralib.lora_B @ loralib.lora_A) == 6


def test_loralib_with_dropout_matches_formula_in_eval():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = LoRAConv2d(conv, r=2, dropout=0.5, conv_mode="loralib").eval()
    _randomize(layer)
    x = torch.randn(2, 4, 8, 8)
    expected = nn.functional.conv2d(x, conv.weight + layer.delta_weight(), conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_merge_and_unmerge_are_idempotent_and_explicit():
    layer = LoRALinear(nn.Linear(10, 10), r=2)
    _randomize(layer)
    w0 = layer.base_layer.weight.detach().clone()
    layer.eval()
    layer.train()
    layer.eval()  # mode changes never merge
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0)
    layer.merge()
    w1 = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w1)
    torch.testing.assert_close(w1, w0 + layer.delta_weight())
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_merge_and_reset_keeps_function_and_starts_fresh_adapter():
    layer = LoRALinear(nn.Linear(10, 6), r=3)
    _randomize(layer)
    x = torch.randn(4, 10)
    y = layer(x).detach()
    a_param, b_param = layer.lora_A, layer.lora_B
    layer.merge_and_reset()
    assert not layer.merged
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A is a_param and layer.lora_B is b_param  # same tensors: optimizers keep them
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)


def test_base_frozen_adapter_trainable():
    layer = LoRAConv2d(nn.Conv2d(3, 4, 3), r=2)
    assert all(not p.requires_grad for p in layer.base_layer.parameters())
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: LoRALinear(nn.Linear(8, 4), r=5), "exceeds min"),
        (lambda: LoRALinear(nn.Linear(8, 4), r=0), "positive integer"),
        (lambda: LoRALinear(nn.Linear(8, 4), r=2.5), "positive integer"),
        (lambda: LoRALinear(nn.Linear(8, 4), r=2, alpha=0), "alpha must be a positive"),
        (lambda: LoRALinear(nn.Linear(8, 4), r=2, alpha=-1), "alpha must be a positive"),
        (lambda: LoRALinear(nn.Linear(8, 4), r=2, dropout=1.0), "dropout"),
        (lambda: LoRAConv2d(nn.Conv2d(4, 8, 3), r=2, conv_mode="bogus"), "Unknown conv_mode"),
        (lambda: LoRAConv2d(nn.Conv2d(4, 8, 3, groups=2), r=2, conv_mode="loralib"), "grouped/depthwise"),
        (lambda: LoRAConv2d(nn.Conv2d(4, 8, 3, groups=4), r=2, conv_mode="kxk_1x1"), "multiple of groups"),
        (lambda: LoRAConv2d(nn.Conv2d(4, 8, 3), r=5, conv_mode="loralib"), "exceeds min"),
        (lambda: LoRAConv2d(nn.Conv2d(2, 3, 1), r=3, conv_mode="kxk_1x1"), "largest rank 2"),
        (lambda: LoRAConv2d(nn.Conv2d(4, 8, (3, 1)), r=2, conv_mode="loralib"), "square kernel"),
        (lambda: LoRALinear(nn.Conv2d(4, 8, 3), r=2), "wraps nn.Linear"),
    ],
)
def test_bad_layer_arguments_raise_clear_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("mode", ["kxk_1x1", "loralib"])
@pytest.mark.parametrize("case", CONV_CASES[:4], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_training_path_equals_inference_path(mode, case):
    """With gradients on, the update is applied by the fused low-rank function (for convs where r/out >= 1/8,
    and the loralib shape, through W + ΔW under autograd); without, as one pass with W + ΔW. All forms compute the
    same function."""
    from models import GateLoRAConv2d, GateLoRALinear, StiefelLoRALinear

    wide = LoRAConv2d(nn.Conv2d(6, 40, **case), r=2, conv_mode=mode)  # 8·r < out: the fused low-rank function
    narrow = LoRAConv2d(nn.Conv2d(6, 10, **case), r=2, conv_mode=mode)  # 8·r >= out: conv(x, W + ΔW)
    with torch.enable_grad():
        assert narrow._through_weight() and wide._through_weight() == (mode == "loralib")
    layers = [wide, narrow, LoRALinear(nn.Linear(9, 7), r=3),
              GateLoRAConv2d(nn.Conv2d(6, 10, **case), r=2, conv_mode=mode), GateLoRALinear(nn.Linear(9, 7), r=3),
              StiefelLoRALinear(nn.Linear(9, 7), r=3)]
    for layer in layers:
        _randomize(layer)
        if hasattr(layer, "lora_scale"):
            with torch.no_grad():
                layer.lora_scale.fill_(0.7)
        x = torch.randn(2, 6, 11, 11) if isinstance(layer.base_layer, nn.Conv2d) else torch.randn(4, 5, 9)
        y_train = layer(x)
        assert y_train.requires_grad
        with torch.no_grad():
            y_infer = layer(x)
            y_base = layer.base_layer(x)
        assert (y_train - y_base).abs().max() > 1e-3
        torch.testing.assert_close(y_infer, y_train.detach(), atol=1e-5, rtol=1e-5)
