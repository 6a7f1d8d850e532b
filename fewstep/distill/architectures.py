"""Where guidance adapters go in each supported diffusers network, and a shape fingerprint.

An :class:`Architecture` names the attention modules that get an adapter (the injection
points, with the width of their output) and the frozen embeddings of the base that the
adapters may condition on. Classes are matched by name along the MRO, so this module
never imports diffusers and subclasses of the supported models work too.

Injection points follow the official AGD code (cristianpjensen/agd): the cross-attention
``attn2`` of every transformer block of a ``UNet2DConditionModel``, the (joint) attention
``attn`` / ``attn1`` of every block of SD3 / DiT transformers, and, for the pixel
``UNet2DModel``, which has no transformer blocks, every ``Attention`` module.
``placement="attention+resnet"`` (UNets only, an option beyond the paper) adds the
``conv2`` of every ResNet block: on a UNet whose attention sits only at a low resolution
(the digits model: 2x2), that is where most of the network's features are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass

from torch import nn

__all__ = [
    "CONDITIONS",
    "PLACEMENTS",
    "SUPPORTED_MODELS",
    "Condition",
    "InjectionPoint",
    "Architecture",
    "describe",
    "fingerprint",
    "fingerprint_differences",
]

# What an adapter can condition on, besides the guidance scale (always used):
#   timestep       the base's frozen timestep embedding
#   class          the base's frozen class-label embedding (class-conditional models)
#   pooled_prompt  the base's frozen projection of the pooled text embedding (SD3; SDXL's
#                  add_embedding, which also carries the size/crop time ids)
#   prompt         the prompt tokens (SD: what cross-attention sees; SD3: context_embedder output)
CONDITIONS = ("timestep", "class", "pooled_prompt", "prompt")
# Where adapters go: the paper's attention modules, or those plus every ResNet block (UNets).
PLACEMENTS = ("attention", "attention+resnet")


@dataclass(frozen=True)
class Condition:
    """A frozen base embedding the adapters can read.

    Attributes:
        name: One of :data:`CONDITIONS`.
        module: Path of the base module whose output is captured with a forward hook, or
            None for the ``encoder_hidden_states`` the injected attention module receives.
        dim: Feature size of that output.
        tokens: True for a token sequence ``[B, L, dim]``, False for a vector ``[B, dim]``.
    """

    name: str
    module: str | None
    dim: int
    tokens: bool = False


@dataclass(frozen=True)
class InjectionPoint:
    """A module (attention, or a ResNet block's ``conv2``) whose output gets an adapter's output added.

    Attributes:
        name: Module path in the base model.
        width: Channels of the module's input and output.
    """

    name: str
    width: int


@dataclass(frozen=True)
class Architecture:
    """The adapter layout of one base model.

    Attributes:
        model_class: The supported diffusers class the model is (or derives from).
        points: Injection points in ``named_modules`` order.
        conditions: The frozen embeddings available for conditioning.
        placement: One of :data:`PLACEMENTS`.
    """

    model_class: str
    points: tuple[InjectionPoint, ...]
    conditions: tuple[Condition, ...]
    placement: str = "attention"

    def condition(self, name: str) -> Condition:
        """Returns the :class:`Condition` called ``name``.

        Raises:
            ValueError: If this architecture does not offer it.
        """
        for condition in self.conditions:
            if condition.name == name:
                return condition
        offered = [c.name for c in self.conditions]
        raise ValueError(f"{self.model_class} offers no {name!r} conditioning; available: {offered}")


def _output_dim(module: nn.Module, path: str) -> int:
    # The embedders the specs point at end in a Linear (TimestepEmbedding,
    # PixArtAlphaTextProjection, context_embedder) or a lookup table.
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    for attr in ("linear_2", "embedding_table"):
        inner = getattr(module, attr, None)
        if isinstance(inner, (nn.Linear, nn.Embedding)):
            return _output_dim(inner, path)
    raise ValueError(f"cannot tell the output size of {path} ({type(module).__name__})")


def _vector(model: nn.Module, name: str, path: str) -> Condition | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if module is None or isinstance(module, nn.Identity):
        return None
    return Condition(name, path, _output_dim(module, path))


def _unwrapped(module: nn.Module) -> nn.Module:
    # An unfused PEFT LoRA wraps a Linear/Conv2d and keeps the original as base_layer.
    return getattr(module, "base_layer", module)


def _width(name: str, attention: nn.Module) -> int:
    to_out = getattr(attention, "to_out", None)
    if not isinstance(to_out, nn.ModuleList) or not isinstance(_unwrapped(to_out[0]), nn.Linear):
        raise ValueError(f"{name} ({type(attention).__name__}) has no to_out projection")
    return _unwrapped(to_out[0]).out_features


def _resnet_width(name: str, block: nn.Module) -> int | None:
    # The adapter reads conv2's input and adds to its output: both must have the block's width.
    conv = _unwrapped(getattr(block, "conv2", nn.Identity()))
    if type(block).__name__ != "ResnetBlock2D" or not isinstance(conv, nn.Conv2d):
        return None
    if conv.in_channels != conv.out_channels:
        raise ValueError(f"{name}.conv2 maps {conv.in_channels} to {conv.out_channels} channels; expected equal")
    return conv.out_channels


def _points(model: nn.Module, accept, resnets: bool = False) -> tuple[InjectionPoint, ...]:
    points = []
    for name, module in model.named_modules():
        if type(module).__name__ == "Attention" and accept(name):
            points.append(InjectionPoint(name, _width(name, module)))
        elif resnets and (width := _resnet_width(name, module)) is not None:
            points.append(InjectionPoint(f"{name}.conv2", width))
    return tuple(points)


def _unet_condition(model: nn.Module, resnets: bool) -> Architecture:
    points = _points(model, lambda name: name.endswith(".attn2"), resnets)
    # SDXL's add_embedding maps the pooled text embedding (+ size/crop time ids) to the
    # timestep embedding's width: the pooled prompt as this architecture sees it.
    conditions = [_vector(model, "timestep", "time_embedding"), _vector(model, "class", "class_embedding"),
                  _vector(model, "pooled_prompt", "add_embedding")]
    attention = [p for p in points if p.name.endswith(".attn2")]
    context_dims = {_unwrapped(model.get_submodule(p.name).to_k).in_features for p in attention}
    # Prompt tokens are read where cross-attention reads them; one projection serves
    # every point, so their sizes must agree (they do unless cross_attention_dim is a list).
    if len(context_dims) == 1:
        conditions.append(Condition("prompt", None, context_dims.pop(), tokens=True))
    return Architecture("UNet2DConditionModel", points, tuple(c for c in conditions if c))


def _unet(model: nn.Module, resnets: bool) -> Architecture:
    points = _points(model, lambda name: True, resnets)
    conditions = [_vector(model, "timestep", "time_embedding"), _vector(model, "class", "class_embedding")]
    return Architecture("UNet2DModel", points, tuple(c for c in conditions if c))


def _sd3(model: nn.Module, resnets: bool) -> Architecture:
    points = _points(model, lambda name: name.startswith("transformer_blocks.") and name.endswith(".attn"))
    conditions = (
        _vector(model, "timestep", "time_text_embed.timestep_embedder"),
        _vector(model, "pooled_prompt", "time_text_embed.text_embedder"),
        Condition("prompt", "context_embedder", _output_dim(model.context_embedder, "context_embedder"), True),
    )
    return Architecture("SD3Transformer2DModel", points, tuple(c for c in conditions if c))


def _dit(model: nn.Module, resnets: bool) -> Architecture:
    points = _points(model, lambda name: name.startswith("transformer_blocks.") and name.endswith(".attn1"))
    # diffusers' DiT gives every block its own copy of the (shared, in the original DiT)
    # timestep/label embedders; block 0's copy runs first.
    emb = "transformer_blocks.0.norm1.emb"
    conditions = (
        _vector(model, "timestep", f"{emb}.timestep_embedder"),
        _vector(model, "class", f"{emb}.class_embedder"),
    )
    return Architecture("DiTTransformer2DModel", points, tuple(c for c in conditions if c))


_DESCRIBERS = {
    "UNet2DConditionModel": _unet_condition,
    "UNet2DModel": _unet,
    "SD3Transformer2DModel": _sd3,
    "DiTTransformer2DModel": _dit,
}
SUPPORTED_MODELS = tuple(_DESCRIBERS)
_HAS_RESNETS = ("UNet2DConditionModel", "UNet2DModel")


def describe(model: nn.Module, placement: str = "attention") -> Architecture:
    """Finds the injection points and conditioning embeddings of ``model``.

    Args:
        model: A diffusers ``UNet2DConditionModel``, ``UNet2DModel``,
            ``SD3Transformer2DModel`` or ``DiTTransformer2DModel`` (or a subclass).
        placement: ``attention`` (the paper's points) or ``attention+resnet`` (UNets: also
            the ``conv2`` of every ResNet block).

    Returns:
        Its :class:`Architecture`.

    Raises:
        TypeError: If the model is none of the supported classes.
        ValueError: If it has no attention module to put an adapter on, or the placement is
            unknown or not available for this architecture.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    for cls in type(model).__mro__:
        if cls.__name__ in _DESCRIBERS:
            resnets = placement == "attention+resnet"
            if resnets and cls.__name__ not in _HAS_RESNETS:
                raise ValueError(f"placement 'attention+resnet' needs ResNet blocks, which a {cls.__name__} has "
                                 f"none of; use placement='attention' (ResNet placement: {list(_HAS_RESNETS)})")
            arch = _DESCRIBERS[cls.__name__](model, resnets)
            if not any(type(model.get_submodule(p.name)).__name__ == "Attention" for p in arch.points):
                raise ValueError(f"{type(model).__name__} has no attention block to put a guidance adapter on")
            return dataclasses.replace(arch, placement=placement)
    raise TypeError(f"guidance adapters support {list(SUPPORTED_MODELS)}, got {type(model).__name__}")


def _group(name: str) -> str:
    # Top-level child, plus the index inside a ModuleList ("down_blocks.1",
    # "transformer_blocks.7"), so a mismatch can be named precisely.
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


_PEFT_PARAMETER = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def fingerprint(model: nn.Module) -> dict[str, str]:
    """A compact description of the parameter names and shapes of ``model``.

    Dtypes and values are left out, so a fine-tune, an fp16 copy or a model on another
    device share the fingerprint of their base; any change of architecture does not. An
    unfused PEFT LoRA is left out too (its ``lora_*`` parameters, and the ``base_layer``
    level it adds to the wrapped layer's names): adapters load onto the model it rides on.

    Args:
        model: Any module.

    Returns:
        ``{group: hash}`` with one entry per top-level child (per element for ModuleLists),
        the hash covering the names and shapes of the group's parameters.
    """
    groups: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        if _PEFT_PARAMETER.search(name):
            continue
        name = name.replace(".base_layer.", ".")
        groups.setdefault(_group(name), []).append(f"{name}:{tuple(param.shape)}")
    return {
        group: hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]
        for group, entries in sorted(groups.items())
    }


def fingerprint_differences(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Lists the groups in which two fingerprints differ, for error messages.

    Args:
        expected: The fingerprint the adapters were made for.
        actual: The fingerprint of the model at hand.

    Returns:
        Entries like ``"down_blocks.1 (shapes differ)"``; empty if the fingerprints match.
    """
    differences = []
    for group in sorted(set(expected) | set(actual)):
        if group not in actual:
            differences.append(f"{group} (missing from this model)")
        elif group not in expected:
            differences.append(f"{group} (not in the adapters' model)")
        elif expected[group] != actual[group]:
            differences.append(f"{group} (parameter shapes differ)")
    return differences
