"""Summed LoRA layers: the stacked single pass equals the sum of the branches, for Linear and both conv shapes,
grouped convs included, with and without gradients."""

import pytest
import torch
from torch import nn

from models import SumLoRAConv2d, SumLoRALinear


def _fill(layer, tasks=2):
    for t in range(tasks):
        with torch.no_grad():
            layer.lora_A.normal_()
            layer.lora_B.normal_()
        layer.store_adapter(t)
    layer.current_task = tasks
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    return [(layer.bank_A[str(t)], layer.bank_B[str(t)]) for t in range(tasks)] + [(layer.lora_A, layer.lora_B)]


@pytest.mark.parametrize("kind", ["linear", "conv", "grouped", "loralib"])
def test_stacked_pass_equals_the_sum_of_branches(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = SumLoRALinear(nn.Linear(12, 10), r=2, alpha=3), torch.randn(5, 7, 12)
    elif kind == "loralib":
        layer, x = SumLoRAConv2d(nn.Conv2d(6, 8, 3, padding=1), r=2, conv_mode="loralib"), torch.randn(2, 6, 9, 9)
    else:
        groups = 2 if kind == "grouped" else 1
        conv = nn.Conv2d(6, 8, 3, padding=1, stride=2, groups=groups)
        layer, x = SumLoRAConv2d(conv, r=2, alpha=4), torch.randn(2, 6, 9, 9)
    branches = _fill(layer)
    want_w = sum(layer._lora_delta(a, b) for a, b in branches) * layer.scaling
    torch.testing.assert_close(layer.delta_weight(), want_w, atol=1e-5, rtol=1e-5)
    ref = nn.functional.linear(x, layer.base_layer.weight + want_w, layer.base_layer.bias) if kind == "linear" \
        else layer.base_layer._conv_forward(x, layer.base_layer.weight + want_w, layer.base_layer.bias)
    out = layer(x)  # with gradients: the low-rank path (or the merged-weight path for narrow convs)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # inference: one pass with W + ΔW
        torch.testing.assert_close(layer(x), ref, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert layer.lora_B.grad is not None and all(b.grad is None for b in layer.bank_B.values())
    layer.current_task = None  # the current adapter stored or not started: only the bank is summed
    torch.testing.assert_close(layer.delta_weight(), sum(layer._lora_delta(a, b) for a, b in branches[:2])
                               * layer.scaling, atol=1e-5, rtol=1e-5)


def test_empty_layer_is_the_base_layer_and_merge_is_refused():
    layer = SumLoRALinear(nn.Linear(4, 3), r=1)
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), layer.base_layer(x))
    with pytest.raises(RuntimeError, match="not merged"):
        layer.merge()
