"""Backbones from the zoos Avalanche users know (pytorchcv beside timm and torchvision), normalisation that follows
the weights or the user, TF "SAME" padding for TF-trained weights, and the WandB logger offline."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from experiments.run import main, parse_config
from models import (NORMALIZATIONS, SamePad2d, add_lora, build_backbone, find_head,
                    parse_normalization)


@pytest.mark.parametrize("name,classes", [("pytorchcv:resnet20_cifar10", 4), ("pytorchcv:mobilenetv2_w1", 5)])
def test_pytorchcv_backbones_build_offline_with_a_linear_head_and_auto_targets(name, classes):
    model = build_backbone(name, classes)
    convs = sum(isinstance(m, nn.Conv2d) and m.groups == 1 for m in model.modules())
    head_name, head = find_head(model)
    assert isinstance(head, nn.Linear) and head.out_features == classes
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, classes)
    names = add_lora(model, "auto", r=2)
    assert head_name not in names and len(names) == convs  # every ungrouped conv, never the head
    model(torch.randn(2, 3, 64, 64)).sum().backward()


def test_pytorchcv_1x1_conv_head_becomes_the_same_linear_map():
    from pytorchcv.model_provider import get_model

    torch.manual_seed(0)
    ref = get_model("mobilenetv2_w1").eval()
    torch.manual_seed(0)
    model = build_backbone("pytorchcv:mobilenetv2_w1", 1000).eval()  # 1000 classes: the head is not replaced
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


def test_normalization_names_values_and_errors():
    assert parse_normalization("half") == ((0.5,) * 3, (0.5,) * 3)
    assert parse_normalization("0.5,0.25") == ((0.5,) * 3, (0.25,) * 3)
    assert parse_normalization("1,2,3,4,5,6") == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert parse_normalization(None) is None and parse_normalization("imagenet") == NORMALIZATIONS["imagenet"]
    for bad in ("imagenett", "0.5", "0.5,0"):
        with pytest.raises(ValueError, match="Unknown normalization"):
            parse_normalization(bad)
    cfg = parse_config(["--normalization", "half", "--backbone", "torchvision:mobilenet_v2", "--tf-same-padding"])
    assert cfg["normalization"] == "half" and cfg["tf_same_padding"]


def test_same_pad_matches_tensorflow_same_arithmetic():
    """TF: output = ceil(n / s); the extra padding pixel goes bottom/right (worked by hand for n = 64, 65)."""
    pad = SamePad2d((3, 3), (2, 2))
    for n, (top, bottom) in ((64, (0, 1)), (65, (1, 1))):
        x = torch.zeros(1, 1, n, n)
        y = pad(x)
        assert y.shape[-1] == n + top + bottom
        conv = nn.functional.conv2d(y, torch.ones(1, 1, 3, 3), stride=2)
        assert conv.shape[-1] == -(-n // 2)


@pytest.mark.slow
def test_shared_mobilenet_linear_probe_follows_its_readme(cifar10_npz, mobilenet_v2_weights):
    """$LOWRANK_CL_WEIGHTS/mobilenet_v2 README: CIFAR-10 linear probe at 64 px, (x - 0.5)/0.5, 57 % stock and 62 %
    with TF padding (5,000 images). Here 1,000 training / 1,000 test images: the ordering and a floor."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    path = str(mobilenet_v2_weights)
    a = np.load(cifar10_npz)
    rng = np.random.default_rng(0)
    tr = rng.permutation(len(a["y_train"]))[:1000]
    te = rng.permutation(len(a["y_test"]))[:1000]
    mean, std = parse_normalization("half")

    def feats(model, x):
        out = []
        with torch.no_grad():
            for i in range(0, len(x), 250):
                b = torch.tensor(x[i:i + 250]).permute(0, 3, 1, 2).float() / 255
                b = nn.functional.interpolate(b, size=64, mode="bilinear", align_corners=False)
                b = (b - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
                out.append(model.features(b).mean((2, 3)))
        return torch.cat(out).numpy()

    accs = {}
    for same in (False, True):
        model = build_backbone("torchvision:mobilenet_v2", 1001, weights=path, keep_pretrained_head=True,
                               tf_same_padding=same).eval()
        ftr, fte = feats(model, a["x_train"][tr]), feats(model, a["x_test"][te])
        sc = StandardScaler().fit(ftr)
        clf = LogisticRegression(C=0.01, max_iter=2000).fit(sc.transform(ftr), a["y_train"][tr])
        accs[same] = clf.score(sc.transform(fte), a["y_test"][te])
    assert accs[True] > accs[False] and accs[False] > 0.40, accs


@pytest.mark.slow
def test_wandb_logger_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 8)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    out = tmp_path / "run"
    code = main(["--benchmark", "arrays", "--data", str(tmp_path / "d.npz"), "--n-experiences", "2",
                 "--backbone", "cifar_resnet20", "--batch-size", "8", "--no-progress", "--wandb", "lowrank-cl-test",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())
    assert json.loads((out / "results.json").read_text())["finished"]
