"""Save and load guidance adapters: ``adapters.safetensors`` + ``adapter_config.json``.

The JSON records the format version, the base architecture (class, injection points,
conditioning embeddings and a fingerprint of its parameter shapes) and the adapter
hyper-parameters. Loading checks all of it against the model at hand, so adapters load
onto the model they were trained on or any model with the same architecture (a
fine-tune, another dtype), and a different model gets an error that names the difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import AdapterConfig, GuidanceAdapters
from .architectures import fingerprint, fingerprint_differences

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "find_denoiser", "save_adapters", "load_adapters"]

WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "fewstep-guidance-adapters"
FORMAT_VERSION = 1


def find_denoiser(target: Any) -> nn.Module:
    """Returns the network behind ``target``.

    Args:
        target: A :class:`GuidanceAdapters`, a network, or a diffusers pipeline (its
            ``unet`` or ``transformer``); a ``torch.compile``-d network is unwrapped.

    Raises:
        TypeError: If no network can be found.
    """
    if isinstance(target, GuidanceAdapters):
        return target.base
    if isinstance(target, nn.Module):
        return getattr(target, "_orig_mod", target)
    for name in ("unet", "transformer"):
        module = getattr(target, name, None)
        if isinstance(module, nn.Module):
            return getattr(module, "_orig_mod", module)
    raise TypeError(
        f"expected guidance adapters, a network or a pipeline with a unet/transformer, got {type(target).__name__}"
    )


def _attached(target: Any) -> GuidanceAdapters:
    if isinstance(target, GuidanceAdapters):
        return target
    model = find_denoiser(target)
    adapters = GuidanceAdapters.attached_to(model)
    if adapters is None:
        raise ValueError(f"this {type(model).__name__} has no guidance adapters to save")
    return adapters


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapters(target: Any, folder: str | os.PathLike) -> Path:
    """Writes the adapters of ``target`` to ``folder``.

    Both files are written atomically, the JSON last, so a folder with a config always
    has the matching weights.

    Args:
        target: A :class:`GuidanceAdapters`, or a network / pipeline that has some attached.
        folder: Output folder, created if missing.

    Returns:
        The folder.

    Raises:
        ValueError: If ``target`` has no adapters, or they hold a NaN/Inf.
    """
    from safetensors.torch import save_file

    adapters = _attached(target)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = adapters.architecture
    state = {name: t.detach().to("cpu").contiguous() for name, t in adapters.state_dict().items()}
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # load_adapters would refuse them: never write them
        raise ValueError(f"the adapters are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}); not saved")
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_class": arch.model_class,
        "class_name": type(adapters.base).__name__,
        "fingerprint": fingerprint(adapters.base),
        "injection_points": [dataclasses.asdict(p) for p in arch.points],
        "conditions": [dataclasses.asdict(arch.condition(name)) for name in adapters.config.conditions],
        "adapter_config": adapters.config.to_dict(),
        "num_parameters": adapters.num_parameters(),
        "base_num_parameters": adapters.base_num_parameters(),
    }
    _write_atomic(folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    text = json.dumps(config, indent=2) + "\n"
    _write_atomic(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return folder


def _read_config(folder: Path) -> dict[str, Any]:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a guidance adapter folder: {name} is missing")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_NAME} is not a {FORMAT} config")
    if config.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_NAME} has format version {config.get('version')!r}; this fewstep reads {FORMAT_VERSION}"
        )
    required = ("model_class", "fingerprint", "injection_points", "conditions", "adapter_config")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"{folder / CONFIG_NAME} lacks {missing}")
    return config


def _check_layout(adapters: GuidanceAdapters, config: dict[str, Any]) -> None:
    arch = adapters.architecture
    points = [dataclasses.asdict(p) for p in arch.points]
    if points != config["injection_points"]:
        raise ValueError(f"injection points differ: saved {config['injection_points']}, this model {points}")
    conditions = [dataclasses.asdict(arch.condition(n)) for n in adapters.config.conditions]
    if conditions != config["conditions"]:
        raise ValueError(f"conditioning embeddings differ: saved {config['conditions']}, this model {conditions}")


def _load_weights(adapters: GuidanceAdapters, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    expected = adapters.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the adapter layout: missing {missing}, unexpected {unexpected}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {name} is not a finite float tensor")
    adapters.load_state_dict(state)


def load_adapters(target: Any, folder: str | os.PathLike) -> GuidanceAdapters:
    """Loads adapters written by :func:`save_adapters` and attaches them to ``target``.

    Args:
        target: The network (or a pipeline holding it). It must have the architecture the
            adapters were made for (same class and parameter shapes); its weights may differ.
        folder: A folder written by :func:`save_adapters`.

    Returns:
        The attached, enabled adapters (on the network's device, float32).

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: On a malformed folder, a model of another architecture (the message
            names the class or the parameter groups that differ), or a model that already
            has adapters.
        TypeError: If ``target`` holds no supported network.
    """
    folder = Path(folder)
    config = _read_config(folder)
    model = find_denoiser(target)
    adapters_for = f"the adapters in {folder} were made for a {config['model_class']}"
    cls_names = [cls.__name__ for cls in type(model).__mro__]
    if config["model_class"] not in cls_names:
        raise ValueError(f"{adapters_for}, not a {type(model).__name__}")
    differences = fingerprint_differences(config["fingerprint"], fingerprint(model))
    if differences:
        raise ValueError(f"{adapters_for} with other parameter shapes; this model differs in: {', '.join(differences)}")
    adapter_config = config["adapter_config"]
    if not isinstance(adapter_config, dict):
        raise ValueError(f"{folder / CONFIG_NAME}: adapter_config must be a mapping")
    adapters = GuidanceAdapters(model, AdapterConfig.from_dict(adapter_config))
    try:
        _check_layout(adapters, config)
        _load_weights(adapters, folder / WEIGHTS_NAME)
    except BaseException:
        adapters.remove()
        raise
    return adapters
