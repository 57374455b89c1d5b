"""Put LoRA layers into any ``nn.Module`` by name, merge them, save them, count parameters.

Targeting follows HF PEFT: a string is a regular expression that must match the whole dotted module name, a list
matches a name exactly or as a ``.suffix``; ``exclude_modules`` is checked first. Matched modules must be
``nn.Linear`` or ``nn.Conv2d``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Union

import torch
from torch import nn

from .lora import CONV_MODES, LoRAConv2d, LoRALayer, LoRALinear

__all__ = [
    "add_lora",
    "merge_lora",
    "merge_and_unload",
    "unmerge_lora",
    "reset_lora",
    "lora_layers",
    "lora_state_dict",
    "load_lora_state_dict",
    "count_parameters",
    "find_head",
    "matches",
    "auto_targets",
]

Target = Union[str, Iterable[str], Callable[[str, nn.Module], bool]]
SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


def _mha_out_projs(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` of every ``nn.MultiheadAttention``: it reads that weight directly, so no wrapper."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def auto_targets(model: nn.Module) -> Target:
    """``target_modules="auto"``: every 3×3 conv of a CIFAR ResNet's stages; ``attn.qkv``, ``attn.proj``,
    ``mlp.fc1``, ``mlp.fc2`` of a ViT (timm's ``blocks.*``); otherwise every ``nn.Linear`` and ungrouped
    ``nn.Conv2d`` except the classifier head (:func:`find_head`) and the ``out_proj`` of an
    ``nn.MultiheadAttention``, which reads that weight directly."""
    from .backbones import CifarResNet

    if isinstance(model, CifarResNet) or isinstance(getattr(model, "backbone", None), CifarResNet):
        return r"(.*\.)?layer\d\.\d+\.conv[12]"
    names = {n for n, _ in model.named_modules()}
    if any(n.endswith("blocks.0.attn.qkv") for n in names):
        return ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    head = find_head(model)
    head_name = head[0] if head is not None else None
    # nn.MultiheadAttention reads out_proj.weight itself (torchvision's ViT): a wrapper there breaks its forward
    inside_mha = _mha_out_projs(model)

    def pred(name: str, module: nn.Module) -> bool:
        if name == head_name or name in inside_mha:
            return False
        return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)

    return pred


def matches(name: str, module: nn.Module, pattern: Target | None) -> bool:
    """Whether ``name`` is selected by ``pattern`` (regex full match, list of names/suffixes, or predicate)."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    if callable(pattern):
        return bool(pattern(name, module))
    return any(name == p or name.endswith("." + p) for p in pattern)


def find_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The classifier head: timm's ``get_classifier()`` when it is a Linear, else the last ``nn.Linear`` registered."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, m in model.named_modules():
            if m is head and isinstance(m, nn.Linear):
                return name, m
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALayer):
            last = (name, m)
    return last


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """All LoRA layers of ``model`` with their dotted names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def add_lora(
    model: nn.Module,
    target_modules: Target,
    r: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    conv_mode: str = "kxk_1x1",
    exclude_modules: Target | None = None,
    *,
    rslora: bool = False,
    trainable_modules: Target | None | str = "auto",
    linear_cls: type = LoRALinear,
    conv_cls: type = LoRAConv2d,
    layer_kwargs: dict | None = None,
) -> list[str]:
    """Wrap the targeted ``nn.Linear`` / ``nn.Conv2d`` modules of ``model`` in LoRA layers, in place.

    Afterwards only the adapters and ``trainable_modules`` train: every other parameter gets
    ``requires_grad=False`` (the wrapped base weights, and the rest of the backbone).

    :param model: the model to adapt (modified in place).
    :param target_modules: regex (full match on the dotted name), list of names / ``.suffix`` es, a predicate
        ``f(name, module) -> bool``, or ``"auto"`` (:func:`auto_targets`).
    :param r: LoRA rank.
    :param alpha: LoRA alpha; ``None`` means ``alpha = r`` (scale 1).
    :param dropout: dropout on the adapters' input.
    :param conv_mode: ``"kxk_1x1"`` (PEFT) or ``"loralib"`` (ConvLoRA), see :class:`~models.lora.LoRAConv2d`.
    :param exclude_modules: same forms as ``target_modules``; checked first.
    :param rslora: scale by ``alpha / sqrt(r)``.
    :param trainable_modules: modules that stay trainable besides the adapters. ``"auto"`` (default) keeps the
        classifier head (:func:`find_head`) trainable; ``None`` freezes everything but the adapters.
    :param linear_cls: the layer class for ``nn.Linear`` (a :class:`~models.lora.LoRALinear` variant).
    :param conv_cls: the layer class for ``nn.Conv2d`` (a :class:`~models.lora.LoRAConv2d` variant).
    :param layer_kwargs: extra keyword arguments for those classes (a method's own options).
    :returns: the names of the wrapped modules, in model order.
    :raises ValueError: nothing matched, a matched leaf module has an unsupported type, a module already has LoRA,
        or the rank / alpha / mode does not fit a layer.
    """
    if conv_mode not in CONV_MODES:
        raise ValueError(f"Unknown conv_mode {conv_mode!r}; choose one of {', '.join(CONV_MODES)}.")
    if isinstance(target_modules, str) and target_modules == "auto":
        target_modules = auto_targets(model)
    if trainable_modules == "auto":
        head = find_head(model)
        trainable_modules = [head[0]] if head is not None else None

    targets, unsupported, already = [], [], []
    inside_mha = _mha_out_projs(model)
    for name, module in model.named_modules():
        if not name or matches(name, module, exclude_modules) or not matches(name, module, target_modules):
            continue
        if name in inside_mha:
            unsupported.append(f"{name} (the out_proj of an nn.MultiheadAttention, which reads its weight directly)")
        elif isinstance(module, LoRALayer):
            already.append(name)
        elif isinstance(module, SUPPORTED_TYPES):
            if name.endswith(".base_layer") and isinstance(model.get_submodule(name.rpartition(".")[0]), LoRALayer):
                already.append(name.rpartition(".")[0])
            else:
                targets.append((name, module))
        elif not any(True for _ in module.children()):  # containers that match a broad regex are fine
            unsupported.append(f"{name} ({type(module).__name__})")
    if already:
        raise ValueError(f"These modules already have a LoRA adapter: {', '.join(sorted(set(already)))}.")
    if unsupported:
        raise ValueError(
            f"target_modules={target_modules!r} matched modules LoRA cannot wrap: {', '.join(unsupported)}. "
            "Only nn.Linear and nn.Conv2d are supported; narrow the pattern or list them in exclude_modules."
        )
    if not targets:
        candidates = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)]
        shown = ", ".join(candidates[:12]) + (" ..." if len(candidates) > 12 else "")
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear / nn.Conv2d in {type(model).__name__}. "
            f"A string is a regex that must match the whole dotted name; a list matches names or '.suffix'es. "
            f"Linear/Conv2d modules here: {shown or 'none'}."
        )

    # build every wrapper first, so a rank error on one layer leaves the model untouched
    wrapped = {}
    for name, module in targets:
        try:
            extra = dict(layer_kwargs or {})
            if isinstance(module, nn.Linear):
                wrapped[name] = linear_cls(module, r=r, alpha=alpha, dropout=dropout, rslora=rslora, **extra)
            else:
                wrapped[name] = conv_cls(
                    module, r=r, alpha=alpha, dropout=dropout, rslora=rslora, conv_mode=conv_mode, **extra
                )
        except ValueError as e:
            for w in wrapped.values():  # undo the freezing done by the wrappers built so far
                for p in w.base_layer.parameters():
                    p.requires_grad_(True)
            raise ValueError(f"Cannot add LoRA to '{name}': {e}") from e

    for name, layer in wrapped.items():
        _set_submodule(model, name, layer)
    # every adapter trains, including those of LoRA layers that were already in the model
    adapter_ids = {id(p) for m in model.modules() if isinstance(m, LoRALayer) for p in m.adapter_parameters()}
    keep = set()
    if trainable_modules is not None:
        for n, m in model.named_modules():
            if n and matches(n, m, trainable_modules):
                keep.update(id(p) for p in m.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_ids or id(p) in keep)
    for layer in wrapped.values():  # a head that was itself targeted keeps only its adapter trainable
        for p in layer.base_layer.parameters():
            p.requires_grad_(False)
    return list(wrapped)


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer of ``model`` into its base weight (idempotent). Returns how many layers merged."""
    layers = lora_layers(model)
    for _, layer in layers:
        layer.merge()
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and put its base layer back in its place: no adapter parameter and no adapter code
    is left on the forward path (PEFT's ``merge_and_unload``). Returns ``model`` (changed in place).

    :raises RuntimeError: for layers that cannot merge (per-task adapters keep one update per task).
    """
    for name, layer in lora_layers(model):
        layer.merge()
        if name:
            _set_submodule(model, name, layer.base_layer)
        else:
            return layer.base_layer
    return model


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora` on every LoRA layer (idempotent)."""
    layers = lora_layers(model)
    for _, layer in layers:
        layer.unmerge()
    return len(layers)


def reset_lora(model: nn.Module) -> int:
    """Fresh adapters everywhere (A Kaiming, B zeros); merged updates stay in the base weights."""
    layers = lora_layers(model)
    for _, layer in layers:
        layer.reset_lora_parameters()
    return len(layers)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only (``<layer>.lora_A``, ``<layer>.lora_B``), detached and on the CPU."""
    out = {}
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        for pname, p in layer.named_parameters(recurse=False):
            out[prefix + pname] = p.detach().cpu().clone()
    return out


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load tensors from :func:`lora_state_dict` into ``model``'s adapters (same names, same shapes, all of them).

    :raises ValueError: missing or unexpected keys, shape mismatches, or a target layer that is merged.
    """
    expected = {}
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        for pname, p in layer.named_parameters(recurse=False):
            expected[prefix + pname] = (layer, p)
    if not expected:
        raise ValueError("The model has no LoRA layers to load into; call add_lora with the same targets first.")
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "LoRA state dict does not fit this model (was it saved from another backbone or other target_modules?). "
            f"Missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}."
        )
    for key, (layer, p) in expected.items():
        t = state_dict[key]
        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"LoRA tensor '{key}' has shape {shape}, the model expects {tuple(p.shape)} (other r?).")
        if layer.merged:
            raise ValueError(f"Layer of '{key}' is merged; unmerge it before loading new adapter tensors.")
    with torch.no_grad():
        for key, (_, p) in expected.items():
            p.copy_(state_dict[key])


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``trainable`` (requires_grad), ``frozen``, ``adapter`` (LoRA tensors), ``total``.

    Shared tensors are counted once.
    """
    adapter_ids = {id(p) for _, layer in lora_layers(model) for p in layer.adapter_parameters()}
    seen, counts = set(), dict(trainable=0, frozen=0, adapter=0, total=0)
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        counts["total"] += n
        counts["trainable" if p.requires_grad else "frozen"] += n
        if id(p) in adapter_ids:
            counts["adapter"] += n
    return counts
