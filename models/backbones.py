"""Backbones: the CIFAR ResNets of He et al. (2016), a small ViT for 32×32 inputs, and timm / torchvision models.

Names understood by :func:`build_backbone` (and the CLI's ``--backbone``): ``cifar_resnet20|32|44|56``,
``vit_cifar``, ``timm:<name>``, ``torchvision:<name>``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .inject import find_head

__all__ = [
    "CifarResNet",
    "cifar_resnet",
    "vit_cifar",
    "build_backbone",
    "load_weights",
    "replace_head",
    "BACKBONE_NAMES",
    "IMAGENET_NORMALIZATION",
    "WEIGHTS_ENV",
    "default_normalization",
    "NORMALIZATIONS",
    "parse_normalization",
    "SamePad2d",
    "apply_tf_same_padding",
]

WEIGHTS_ENV = "LOWRANK_CL_WEIGHTS"
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BACKBONE_NAMES = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "vit_cifar")
NORMALIZATIONS = {
    "imagenet": IMAGENET_NORMALIZATION,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # (x - 0.5) / 0.5, e.g. TF-Slim / TFLite weights
}


def parse_normalization(spec) -> tuple[tuple, tuple] | None:
    """``imagenet``, ``cifar10``, ``half``, ``"MEAN,STD"`` (one value for every channel) or ``"m1,m2,m3,s1,s2,s3"``
    as ``(mean, std)``; ``None`` stays ``None`` (the weights' own, see :func:`default_normalization`)."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        return tuple(map(float, spec[0])), tuple(map(float, spec[1]))
    if spec in NORMALIZATIONS:
        return NORMALIZATIONS[spec]
    try:
        values = [float(v) for v in str(spec).split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        values = [values[0]] * 3 + [values[1]] * 3
    if len(values) != 6 or any(s <= 0 for s in values[3:]):
        raise ValueError(f"Unknown normalization {spec!r}; give {', '.join(NORMALIZATIONS)}, MEAN,STD or "
                         "M1,M2,M3,S1,S2,S3 (stds > 0).")
    return tuple(values[:3]), tuple(values[3:])


class SamePad2d(nn.Module):
    """TensorFlow's "SAME" padding for a following conv of ``kernel_size`` and ``stride``: the total padding
    ``max((ceil(n / s) - 1) · s + k - n, 0)`` split with the extra pixel at the bottom / right (torch pads
    symmetrically, which shifts the function of weights trained in TF by a pixel)."""

    def __init__(self, kernel_size, stride, dilation=(1, 1)):
        super().__init__()
        self.k = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        self.s = list(stride)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // self.s[0]) - 1) * self.s[0] + self.k[0] - ih, 0)
        pw = max((-(-iw // self.s[1]) - 1) * self.s[1] + self.k[1] - iw, 0)
        return nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def apply_tf_same_padding(model: nn.Module) -> nn.Module:
    """Give every stride-2 ``nn.Conv2d`` TF "SAME" padding, in place: each becomes ``Sequential(SamePad2d,
    conv with padding 0)``, so LoRA layers wrapping the conv keep computing the right function (a forward hook on
    the conv would be skipped by adapters that run their own convolution). For weights trained in TensorFlow, such
    as the TF-Slim MobileNetV2 of ``$LOWRANK_CL_WEIGHTS/mobilenet_v2`` (its README: linear probe 57 % stock, 62 %
    with TF padding at 64 px). Apply after loading weights (the conv's name gets a ``.1``)."""
    from .inject import _set_submodule

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    for name, conv in convs:
        pad = SamePad2d(conv.kernel_size, conv.stride, conv.dilation)
        conv.padding = (0, 0)
        _set_submodule(model, name, nn.Sequential(pad, conv))
    return model

# akamaster/pytorch_resnet_cifar10: file names carry the first 8 hex digits of the file's sha256
_CIFAR_RESNET_FILES = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}
_CIFAR_RESNET_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{}"


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # "option A" shortcut: subsample and zero-pad channels, no parameters
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x
        if self.pad:
            sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2).

    State-dict names match akamaster/pytorch_resnet_cifar10: ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2``,
    ``linear``.
    """

    def __init__(self, depth: int = 32, num_classes: int = 10):
        super().__init__()
        if depth not in _CIFAR_RESNET_FILES:
            raise ValueError(f"CIFAR ResNet depth must be one of {sorted(_CIFAR_RESNET_FILES)}, got {depth}.")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.forward_features(x))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_cifar_resnet_checkpoint(depth: int) -> Path | str:
    """Local copy from ``$LOWRANK_CL_WEIGHTS`` (flat or in ``cifar_resnet/``), else the download URL."""
    fname = _CIFAR_RESNET_FILES[depth]
    root = os.environ.get(WEIGHTS_ENV)
    if root:
        for cand in (Path(root) / fname, Path(root) / "cifar_resnet" / fname):
            if cand.is_file():
                return cand
    return _CIFAR_RESNET_URL.format(fname)


def _read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` with errors that say what is wrong; unwraps ``state_dict`` and ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Backbone weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, unsafe globals
        raise ValueError(
            f"Cannot load backbone weights from {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}."
            " The file is corrupted or not a plain tensor checkpoint (only weights_only=True loading is allowed)."
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensors, or {{'state_dict': ...}}).")
    if obj and all(k.startswith("module.") for k in obj):  # saved under DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Replace the classifier head (:func:`~models.inject.find_head`) with a fresh ``nn.Linear``; returns it."""
    found = find_head(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head to replace.")
    name, old = found
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new


def load_weights(model: nn.Module, weights: str | os.PathLike | dict, num_classes: int | None = None) -> nn.Module:
    """Load a checkpoint strictly; if its classifier head has another number of classes, load it with the
    checkpoint's head and then put a fresh head with ``num_classes`` outputs in its place.

    :raises ValueError: the checkpoint does not match the architecture (names or shapes), or cannot be read.
    """
    sd = weights if isinstance(weights, dict) else _read_checkpoint(weights)
    found = find_head(model)
    if found is not None:
        head_name, head = found
        w = sd.get(f"{head_name}.weight")
        if isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[0] != head.out_features:
            replace_head(model, w.shape[0])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"Checkpoint does not match {type(model).__name__} (another architecture or depth?): "
            f"{' '.join(str(e).split())[:600]}"
        ) from e
    if num_classes is not None and found is not None and find_head(model)[1].out_features != num_classes:
        replace_head(model, num_classes)
    return model


def cifar_resnet(depth: int = 32, num_classes: int | None = 10, weights: str | os.PathLike | None = None) -> CifarResNet:
    """A CIFAR ResNet, optionally with pretrained CIFAR-10 weights.

    :param depth: 20, 32, 44 or 56.
    :param num_classes: outputs of the head; with weights and ``num_classes != 10`` the pretrained head is replaced
        by a fresh one (``None`` keeps the checkpoint's head).
    :param weights: ``None`` (random init), a checkpoint path (akamaster format; loaded strictly), or
        ``"pretrained"``: the akamaster checkpoint from ``$LOWRANK_CL_WEIGHTS`` if there, else downloaded (sha256
        checked).
    """
    model = CifarResNet(depth, 10 if num_classes is None else num_classes)
    if weights is None:
        return model
    if weights == "pretrained":
        src = _find_cifar_resnet_checkpoint(depth)
        if isinstance(src, Path):
            digest = _sha256(src)
            if not digest.startswith(_CIFAR_RESNET_FILES[depth].split("-")[1][:8]):
                raise ValueError(f"{src} has sha256 {digest[:16]}..., not the published checkpoint; re-download it.")
            sd = _read_checkpoint(src)
        else:
            try:
                sd = torch.hub.load_state_dict_from_url(src, map_location="cpu", check_hash=True, weights_only=True)
            except OSError as e:  # no network
                raise FileNotFoundError(
                    f"Cannot download {src} ({type(e).__name__}: {e}); set ${WEIGHTS_ENV} to a directory holding "
                    f"{_CIFAR_RESNET_FILES[depth]} or pass the file as weights=."
                ) from e
            sd = {k.removeprefix("module."): v for k, v in sd["state_dict"].items()}
        return load_weights(model, sd, num_classes)
    return load_weights(model, weights, num_classes)


def vit_cifar(
    num_classes: int = 10,
    *,
    img_size: int = 32,
    patch_size: int = 4,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
):
    """A ViT-Tiny-shaped timm ``VisionTransformer`` for 32×32 inputs (patch 4 → 64 tokens + class token).

    LoRA targets: ``qkv``, ``proj``, ``fc1``, ``fc2``; the head is ``head``.
    """
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate,
    )


def build_backbone(
    name: str,
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    keep_pretrained_head: bool = False,
    tf_same_padding: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a backbone by name.

    :param name: ``cifar_resnet20|32|44|56``, ``vit_cifar``, ``timm:<model>``, ``torchvision:<model>`` or
        ``pytorchcv:<model>`` (the zoo of Avalanche's ``pytorchcv_wrapper``; a 1×1-conv output head becomes a Linear).
    :param num_classes: classes of the head.
    :param weights: a checkpoint file to load strictly (head replaced when its class count differs).
    :param pretrained: the library's own pretrained weights: akamaster's CIFAR-10 checkpoints for the CIFAR ResNets
        (``$LOWRANK_CL_WEIGHTS`` or download), timm's ``pretrained=True``, torchvision's ``weights="DEFAULT"``
        (downloads; needs the internet).
    :param keep_pretrained_head: with weights, keep the checkpoint's head whatever ``num_classes`` says (to
        measure the pretraining task; replace it with :func:`replace_head` afterwards).
    :param tf_same_padding: give stride-2 convs TensorFlow's "SAME" padding (:func:`apply_tf_same_padding`), for
        weights trained in TF.
    :param kwargs: passed to the model constructor.
    """
    if weights is not None and pretrained:
        raise ValueError("Give either weights=<file> or pretrained=True, not both.")
    if name.startswith("cifar_resnet"):
        try:
            depth = int(name[len("cifar_resnet"):])
        except ValueError:
            depth = -1
        if depth not in _CIFAR_RESNET_FILES:
            raise ValueError(f"Unknown backbone {name!r}; CIFAR ResNets: cifar_resnet20, 32, 44, 56.")
        keep = keep_pretrained_head and (pretrained or weights is not None)  # no weights: no head to keep
        return cifar_resnet(depth, None if keep else num_classes,
                            weights="pretrained" if pretrained else weights)
    if name == "vit_cifar":
        if pretrained:
            raise ValueError("vit_cifar has no published pretrained weights; pass weights=<file> or train it.")
        model = vit_cifar(num_classes, **kwargs)
    elif name.startswith("timm:"):
        import timm

        model_name = name[len("timm:"):]
        if model_name not in timm.list_models() and model_name.split(".")[0] not in timm.list_models():
            raise ValueError(f"Unknown timm model {model_name!r} (see timm.list_models()).")
        if not (pretrained and keep_pretrained_head):
            kwargs["num_classes"] = num_classes
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    elif name.startswith("torchvision:"):
        import torchvision

        model_name = name[len("torchvision:"):]
        if model_name not in torchvision.models.list_models():
            raise ValueError(f"Unknown torchvision model {model_name!r} (see torchvision.models.list_models()).")
        model = torchvision.models.get_model(model_name, weights="DEFAULT" if pretrained else None, **kwargs)
        keep = pretrained and keep_pretrained_head
        if not keep and find_head(model) is not None and find_head(model)[1].out_features != num_classes:
            replace_head(model, num_classes)
    elif name.startswith("pytorchcv:"):
        from pytorchcv.model_provider import _models as pytorchcv_models
        from pytorchcv.model_provider import get_model

        model_name = name[len("pytorchcv:"):]
        if model_name not in pytorchcv_models:
            raise ValueError(f"Unknown pytorchcv model {model_name!r} (see pytorchcv.model_provider._models).")
        model = get_model(model_name, pretrained=pretrained, **kwargs)  # pytorchcv's own download
        out = getattr(model, "output", None)
        if isinstance(out, nn.Conv2d) and out.kernel_size == (1, 1):  # a 1x1-conv head: the same map as a Linear
            lin = nn.Linear(out.in_channels, out.out_channels, bias=out.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(out.weight.flatten(1))
                if out.bias is not None:
                    lin.bias.copy_(out.bias)
            model.output = nn.Sequential(nn.Flatten(), lin)
        pool = getattr(getattr(model, "features", None), "final_pool", None)
        if isinstance(pool, nn.AvgPool2d):  # a fixed 7x7 pool fits 224 px only; adaptive is the same there
            model.features.final_pool = nn.AdaptiveAvgPool2d(1)
        keep = pretrained and keep_pretrained_head
        if not keep and find_head(model) is not None and find_head(model)[1].out_features != num_classes:
            replace_head(model, num_classes)
    else:
        raise ValueError(
            f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}, timm:<name>, torchvision:<name>, "
            "pytorchcv:<name>."
        )
    if weights is not None:
        load_weights(model, weights, None if keep_pretrained_head else num_classes)
    if tf_same_padding:
        apply_tf_same_padding(model)
    return model


def default_normalization(name: str, has_weights: bool) -> tuple[tuple, tuple] | None:
    """The input normalisation that a backbone's pretrained weights expect, or ``None`` (keep the benchmark's).

    akamaster's CIFAR ResNets and torchvision models were trained with ImageNet's mean/std; timm models say theirs
    in their pretrained config.
    """
    if not has_weights:
        return None
    if name.startswith(("cifar_resnet", "torchvision:", "pytorchcv:")):
        return IMAGENET_NORMALIZATION
    if name.startswith("timm:"):
        import timm

        try:
            cfg = timm.get_pretrained_cfg(name[len("timm:"):])
        except Exception:  # unknown tag: the model builder reports it
            return None
        if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
            return tuple(cfg.mean), tuple(cfg.std)
    return None
