"""Backbones: the pretrained CIFAR ResNet really classifies CIFAR-10; factory names; safe, strict loading."""

import numpy as np
import pytest
import torch
from torch import nn

from models import IMAGENET_NORMALIZATION, build_backbone, cifar_resnet, find_head, load_weights


def test_resnet32_checkpoint_classifies_cifar10_test_set(cifar10_npz, resnet32_weights):
    model = cifar_resnet(32, 10, weights=resnet32_weights).eval()
    with np.load(cifar10_npz) as d:
        x, y = d["x_test"], torch.from_numpy(d["y_test"].astype(np.int64))
    mean = torch.tensor(IMAGENET_NORMALIZATION[0]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZATION[1]).view(1, 3, 1, 1)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            xb = (torch.from_numpy(x[i:i + 1000]).permute(0, 3, 1, 2).float() / 255 - mean) / std
            correct += (model(xb).argmax(1) == y[i:i + 1000]).sum().item()
    acc = correct / len(x)
    assert len(x) == 10_000
    assert acc >= 0.80, f"ResNet-32 accuracy {acc:.4f} on the JPEG CIFAR-10 test set (README measures 0.826)"


def test_pretrained_from_env_dir_and_new_head(resnet32_weights, monkeypatch):
    monkeypatch.setenv("LOWRANK_CL_WEIGHTS", str(resnet32_weights.parent))
    ref = cifar_resnet(32, 10, weights=resnet32_weights)
    model = build_backbone("cifar_resnet32", 100, pretrained=True)
    assert model.linear.out_features == 100
    torch.testing.assert_close(model.layer3[4].conv2.weight, ref.layer3[4].conv2.weight)


def test_tampered_pretrained_file_is_refused(resnet32_weights, tmp_path, monkeypatch):
    data = bytearray(resnet32_weights.read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / resnet32_weights.name).write_bytes(bytes(data))
    monkeypatch.setenv("LOWRANK_CL_WEIGHTS", str(tmp_path))
    with pytest.raises(ValueError, match="not the published checkpoint"):
        cifar_resnet(32, 10, weights="pretrained")


def test_checkpoint_of_other_depth_is_refused(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar_resnet(20).state_dict().items()}}, path)
    cifar_resnet(20, 10, weights=path)  # the akamaster layout loads
    with pytest.raises(ValueError, match="does not match CifarResNet"):
        cifar_resnet(32, 10, weights=path)


def test_head_of_other_size_is_loaded_then_replaced(tmp_path):
    src = cifar_resnet(20, 10)
    path = tmp_path / "r20.pt"
    torch.save(src.state_dict(), path)
    model = cifar_resnet(20, 4, weights=path)
    assert model.linear.out_features == 4
    torch.testing.assert_close(model.conv1.weight, src.conv1.weight)


def test_corrupted_checkpoint_gives_clear_error(tmp_path):
    path = tmp_path / "bad.th"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupted"):
        cifar_resnet(20, 10, weights=path)
    with pytest.raises(FileNotFoundError):
        cifar_resnet(20, 10, weights=tmp_path / "missing.th")


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.th"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _Evil()}, path, pickle_protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        cifar_resnet(20, 10, weights=path)
    assert not (tmp_path / "PWNED").exists()


def test_factory_names():
    assert build_backbone("cifar_resnet20", 7).linear.out_features == 7
    vit = build_backbone("vit_cifar", 5, depth=1, embed_dim=24, num_heads=2)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    tv = build_backbone("torchvision:resnet18", 3)
    assert find_head(tv)[1].out_features == 3
    tm = build_backbone("timm:resnet18", 6)
    assert tm.get_classifier().out_features == 6
    for bad, match in [("resnet32", "Unknown backbone"), ("cifar_resnet33", "cifar_resnet20, 32"),
                       ("timm:not_a_model", "Unknown timm model"), ("torchvision:nope", "Unknown torchvision")]:
        with pytest.raises(ValueError, match=match):
            build_backbone(bad, 10)
    with pytest.raises(ValueError, match="either"):
        build_backbone("cifar_resnet20", 10, weights="x", pretrained=True)


def test_load_weights_into_torchvision_model(tmp_path):
    import torchvision

    src = torchvision.models.mobilenet_v2(num_classes=11)
    path = tmp_path / "mnv2.pt"
    torch.save(src.state_dict(), path)
    model = build_backbone("torchvision:mobilenet_v2", 4, weights=path)
    assert isinstance(model.classifier[1], nn.Linear) and model.classifier[1].out_features == 4
    torch.testing.assert_close(model.features[3].conv[0][0].weight, src.features[3].conv[0][0].weight)
    with pytest.raises(ValueError):
        load_weights(torchvision.models.resnet18(), path)


def test_failed_weights_download_names_the_offline_option(monkeypatch):
    monkeypatch.delenv("LOWRANK_CL_WEIGHTS", raising=False)
    def offline(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="LOWRANK_CL_WEIGHTS"):
        cifar_resnet(32, 10, weights="pretrained")
