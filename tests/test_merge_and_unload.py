"""Trained merged-family models unload to plain backbones: no adapter parameters left, same outputs."""

import pytest
import torch
from torch import nn

from models import (
    GateLoRAConv2d,
    GateLoRALinear,
    LoRAConv2d,
    LoRALayer,
    StiefelLoRAConv2d,
    StiefelLoRALinear,
    TaskLoRALinear,
    add_lora,
    cifar_resnet,
    count_parameters,
    merge_and_unload,
    vit_cifar,
)

CASES = {
    "lora": dict(),
    "gate": dict(linear_cls=GateLoRALinear, conv_cls=GateLoRAConv2d),
    "stiefel": dict(linear_cls=StiefelLoRALinear, conv_cls=StiefelLoRAConv2d),
}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("backbone", ["resnet", "vit"])
def test_merge_and_unload_keeps_outputs_and_drops_adapters(kind, backbone):
    if backbone == "resnet":
        model, targets = cifar_resnet(20, 10), r"layer\d\.\d+\.conv[12]"
    else:
        model, targets = vit_cifar(10, depth=2, embed_dim=48, num_heads=3), ["attn.qkv", "attn.proj", "mlp.fc1"]
    plain_params = count_parameters(model)["total"]
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y_plain = model(x)
    add_lora(model, targets, r=2, **CASES[kind])
    with torch.no_grad():  # a trained-looking adapter (non-zero update)
        for m in model.modules():
            if isinstance(m, LoRALayer):
                for p in m.adapter_parameters():
                    p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        y = model(x)
        assert (y - y_plain).abs().max() > 1e-4, "the adapters must change the output for the test to mean anything"
        merged = merge_and_unload(model)
        y_merged = merged(x)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    c = count_parameters(merged)
    assert c["adapter"] == 0 and c["total"] == plain_params
    torch.testing.assert_close(y_merged, y, atol=1e-5, rtol=1e-5)


def test_per_task_layers_refuse_to_merge():
    model = nn.Sequential(nn.Linear(4, 4))
    add_lora(model, ["0"], r=2, linear_cls=TaskLoRALinear)
    with pytest.raises(RuntimeError, match="not merged"):
        merge_and_unload(model)
    assert isinstance(model[0], TaskLoRALinear)


def test_unload_plain_lora_conv_returns_base_conv():
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv)
    add_lora(model, ["0"], r=2)
    assert isinstance(model[0], LoRAConv2d)
    assert merge_and_unload(model)[0] is conv
