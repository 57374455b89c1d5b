"""add_lora on whole models: targeting, freezing, gradients, merging, adapter state dicts, parameter counts."""

import pytest
import torch
from torch import nn

from models import (
    LoRAConv2d,
    LoRALinear,
    add_lora,
    cifar_resnet,
    count_parameters,
    find_head,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
    vit_cifar,
)

RESNET_CONVS = r"layer\d\.\d+\.conv[12]"
VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]  # plain "proj" also hits patch_embed.proj


def _randomize_adapters(model):
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.normal_(0, 0.05)
            layer.lora_B.normal_(0, 0.05)


def _small_vit():
    return vit_cifar(10, depth=2, embed_dim=48, num_heads=3)


@pytest.mark.parametrize("mode", ["kxk_1x1", "loralib"])
def test_cifar_resnet_merged_equals_unmerged(mode):
    model = cifar_resnet(20, 10)
    names = add_lora(model, RESNET_CONVS, r=2, conv_mode=mode)
    assert len(names) == 18 and all(isinstance(m, LoRAConv2d) for _, m in lora_layers(model))
    _randomize_adapters(model)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        assert merge_lora(model) == 18
        y_merged = model(x)
        unmerge_lora(model)
        y_back = model(x)
    torch.testing.assert_close(y_merged, y, atol=1e-5, rtol=0)
    torch.testing.assert_close(y_back, y, atol=1e-5, rtol=0)


def test_timm_vit_merged_equals_unmerged():
    model = _small_vit()
    names = add_lora(model, VIT_TARGETS, r=4, alpha=8)
    assert len(names) == 8 and all(isinstance(m, LoRALinear) for _, m in lora_layers(model))
    assert "head" not in names
    _randomize_adapters(model)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        merge_lora(model)
        y_merged = model(x)
    torch.testing.assert_close(y_merged, y, atol=1e-5, rtol=0)


def test_only_adapters_and_head_receive_gradients():
    model = cifar_resnet(20, 10)
    add_lora(model, RESNET_CONVS, r=2)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in trainable if ".lora_" in n} | {"linear.weight", "linear.bias"}
    assert trainable == expected
    # B starts at zero so A gets no gradient at step 0; B and the head must
    assert {n for n in with_grad} <= expected
    assert {"linear.weight", "linear.bias"} <= with_grad
    assert all(n in with_grad for n in expected if n.endswith("lora_B"))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "conv1.weight" in frozen and "bn1.weight" in frozen and "layer1.0.conv1.base_layer.weight" in frozen


def test_trainable_modules_none_freezes_head():
    model = cifar_resnet(20, 10)
    add_lora(model, RESNET_CONVS, r=2, trainable_modules=None)
    assert not model.linear.weight.requires_grad


def test_targeting_by_regex_suffix_list_predicate_and_exclude():
    model = cifar_resnet(20, 10)
    assert add_lora(model, r"layer1\.0\.conv1", r=2) == ["layer1.0.conv1"]
    model = cifar_resnet(20, 10)
    names = add_lora(model, ["conv2"], r=2, exclude_modules=r"layer3\..*")
    assert names == [f"layer{i}.{j}.conv2" for i in (1, 2) for j in range(3)]
    model = cifar_resnet(20, 10)
    names = add_lora(model, lambda n, m: isinstance(m, nn.Linear), r=2)
    assert names == ["linear"]
    assert isinstance(model.linear, LoRALinear) and not model.linear.base_layer.weight.requires_grad


def test_find_head_on_several_architectures():
    import torchvision

    assert find_head(cifar_resnet(20, 10))[0] == "linear"
    assert find_head(_small_vit())[0] == "head"
    assert find_head(torchvision.models.resnet18(num_classes=7))[0] == "fc"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_modules=r"nothing\.here", r=2), "matched no nn.Linear / nn.Conv2d"),
        (dict(target_modules=["bn1"], r=2), r"cannot wrap: bn1 \(BatchNorm2d\)"),
        (dict(target_modules=r"layer3\.0\.conv1", r=65), "Cannot add LoRA to 'layer3.0.conv1'.*exceeds"),
        (dict(target_modules=RESNET_CONVS, r=0), "positive integer"),
        (dict(target_modules=RESNET_CONVS, r=2, alpha=0.0), "alpha"),
        (dict(target_modules=RESNET_CONVS, r=2, conv_mode="kxk"), "Unknown conv_mode"),
    ],
)
def test_add_lora_bad_input(kwargs, match):
    model = cifar_resnet(20, 10)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        add_lora(model, **kwargs)
    assert not lora_layers(model), "a failed add_lora must leave the model untouched"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_add_lora_twice_is_refused():
    model = cifar_resnet(20, 10)
    add_lora(model, RESNET_CONVS, r=2)
    with pytest.raises(ValueError, match="already have a LoRA adapter"):
        add_lora(model, RESNET_CONVS, r=2)


def test_grouped_conv_in_loralib_mode_is_refused_with_hint():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match="grouped/depthwise.*exclude_modules"):
        add_lora(model, r".*", r=1, conv_mode="loralib")


def test_lora_state_dict_round_trip():
    import copy

    model = cifar_resnet(20, 10)
    other = copy.deepcopy(model)  # same base weights
    add_lora(model, RESNET_CONVS, r=2)
    _randomize_adapters(model)
    sd = lora_state_dict(model)
    assert len(sd) == 36 and all(".lora_A" in k or ".lora_B" in k for k in sd)
    add_lora(other, RESNET_CONVS, r=2)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), other.eval()
    assert (model(x) - other(x)).abs().max() > 1e-4
    load_lora_state_dict(other, sd)
    torch.testing.assert_close(other(x), model(x))


def test_load_lora_state_dict_errors():
    model = cifar_resnet(20, 10)
    add_lora(model, RESNET_CONVS, r=2)
    sd = lora_state_dict(model)
    with pytest.raises(ValueError, match="Missing"):
        load_lora_state_dict(model, {k: v for k, v in sd.items() if "layer1" not in k})
    bigger = cifar_resnet(20, 10)
    add_lora(bigger, RESNET_CONVS, r=4)
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(bigger, sd)
    with pytest.raises(ValueError, match="no LoRA layers"):
        load_lora_state_dict(cifar_resnet(20, 10), sd)
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        load_lora_state_dict(model, sd)


def test_count_parameters():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    assert count_parameters(model) == dict(trainable=115, frozen=0, adapter=0, total=115)
    add_lora(model, ["0"], r=2)  # head "2" stays trainable
    c = count_parameters(model)
    adapter = 2 * 10 + 8 * 2
    assert c == dict(trainable=adapter + 27, frozen=88, adapter=adapter, total=115 + adapter)
