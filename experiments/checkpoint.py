"""Per-experience checkpoints of a run, so that ``--resume`` continues after a kill exactly where it stopped.

A checkpoint holds plain tensors and Python values only (loaded with ``torch.load(weights_only=True)``; Avalanche's
dill-based ``save_checkpoint`` is broken with current typing_extensions): the model's state dict (adapters, banks,
gates, subspaces, heads), the optimizer state keyed by parameter *name* (parameter order changes as adapters are
added), the method plugin's bookkeeping, Avalanche's clock, the torch / NumPy / Python RNG states, and the results
so far. It is written atomically after every finished experience.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "signature", "restore_optimizer", "restore_rng", "named_optimizer_state",
           "FORMAT", "NON_SIGNATURE_KEYS"]

FORMAT = 1
# what may differ between a run and its continuation (everything else in the config must be equal)
NON_SIGNATURE_KEYS = ("out", "progress", "resume", "threads", "num_workers", "device", "eval_batch_size", "config",
                      "wandb", "retention_data", "retention_subset", "dataset_root")


def signature(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in NON_SIGNATURE_KEYS}


def named_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for p, s in optimizer.state.items():
        if id(p) in names and s:
            state[names[id(p)]] = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                                   for k, v in s.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return dict(state=state, groups=groups)


def restore_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(saved["state"]) - set(params))
    if unknown:
        raise ValueError(f"Checkpoint has optimizer state for parameters this model lacks: {unknown[:5]}.")
    for name, s in saved["state"].items():
        p = params[name]
        optimizer.state[p] = {k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
    for group, hyper in zip(optimizer.param_groups, saved["groups"]):
        group.update(hyper)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), numpy_keys=torch.from_numpy(keys.astype(np.int64)), numpy_pos=int(pos),
                 numpy_has_gauss=int(has_gauss), numpy_gauss=float(gauss), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, cfg: dict, experience: int, model: nn.Module, optimizer, plugin, clock,
                    results: dict) -> None:
    """Write the checkpoint of a finished ``experience`` atomically (a kill never leaves half a file)."""
    obj = dict(
        format=FORMAT,
        signature=signature(cfg),
        experience=experience,
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=named_optimizer_state(optimizer, model),
        plugin=plugin.state_dict() if hasattr(plugin, "state_dict") else None,
        clock={k: v for k, v in vars(clock).items() if isinstance(v, int)},
        rng=_rng_state(),
        results=results,
    )
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: dict) -> dict:
    """Read and check a checkpoint (safe loading only).

    :raises FileNotFoundError: no checkpoint.
    :raises ValueError: corrupted or unsafe file, another format, or written by a run with another configuration
        (backbone, method, benchmark, ...), naming what differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint to resume from at {path} (a run writes one after each experience).")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"Cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "It is corrupted or not a checkpoint of this project (only weights_only=True loading is allowed); "
            "delete it to start over."
        ) from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path} is not a checkpoint of format {FORMAT} of this project.")
    saved, now = ck["signature"], signature(cfg)
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"Checkpoint {path} was written by a different run ({shown}); resume with the same options.")
    return ck


def restore_rng(ck: dict) -> None:
    _set_rng_state(ck["rng"])
