"""Guidance adapters (AGD): small modules that fold classifier-free guidance into one forward.

Jensen & Sadat. Efficient Distillation of Classifier-Free Guidance using Adapters. TMLR 2025
(official code: cristianpjensen/agd).

The base network stays frozen and structurally untouched: adapters live in their own
module (:class:`GuidanceAdapters`) and reach the base through forward hooks, so the base's
``state_dict``, ``save_pretrained`` and class are unchanged, and :meth:`~GuidanceAdapters.disable`
gives back the base model bit for bit.

Per forward pass:

1. The guidance scale ``w`` (one per sample) goes through random Fourier features, an MLP
   and a LayerNorm (:class:`GuidanceEmbedding`), once.
2. Hooks capture the frozen embeddings of the base that the adapters condition on (timestep
   embedding, optionally class / pooled-prompt embedding and prompt tokens); shared linear
   maps turn them, with the guidance embedding, into a few conditioning tokens.
3. At every injection point (see :mod:`fewstep.distill.architectures`) a
   :class:`BlockAdapter` lets the attention module's input tokens cross-attend to the
   conditioning tokens, passes the result through a per-token MLP and adds it, through a
   zero-initialised projection, to the module's output. An untrained adapter set therefore
   leaves the model exactly unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import CONDITIONS, PLACEMENTS, Architecture, describe

__all__ = ["AdapterConfig", "GuidanceEmbedding", "ConditionTokens", "BlockAdapter", "GuidanceAdapters"]

_ATTACHED = "_fewstep_guidance_adapters"  # key in the base model's __dict__


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of a guidance adapter set.

    Attributes:
        width_ratio: Attention width of each adapter relative to the width of the block it
            sits in (0.25: an SD-1.5 block of 1280 channels gets a 320-wide adapter).
        head_dim: Target head size; each adapter uses ``ceil(width / head_dim)`` heads.
        embed_dim: Width of the shared conditioning tokens; None uses the widest adapter.
        conditions: What the adapters condition on besides ``w``, a subset of
            :data:`~fewstep.distill.architectures.CONDITIONS`; None takes everything the
            architecture offers.
        fourier_features: Number of random Fourier features of ``w``.
        fourier_scale: Standard deviation of their frequencies, in cycles per unit of ``w``.
        mlp_ratio: Hidden width of the guidance MLP relative to ``embed_dim``.
        seed: Seeds the Fourier features and the initial weights (the global RNG is left alone).
        placement: ``attention`` (the paper's injection points) or ``attention+resnet``
            (UNets only: also the ``conv2`` of every ResNet block); see
            :func:`~fewstep.distill.architectures.describe`.
    """

    width_ratio: float = 0.25
    head_dim: int = 64
    embed_dim: int | None = None
    conditions: tuple[str, ...] | None = None
    fourier_features: int = 128
    fourier_scale: float = 1.0
    mlp_ratio: float = 4.0
    seed: int = 0
    placement: str = "attention"

    def __post_init__(self) -> None:
        kinds = {"width_ratio": float, "head_dim": int, "embed_dim": int, "fourier_features": int,
                 "fourier_scale": float, "mlp_ratio": float, "seed": int}
        for name, kind in kinds.items():
            value = getattr(self, name)
            allowed = (int,) if kind is int else (int, float)
            if (value is None and name == "embed_dim") or (isinstance(value, allowed) and not isinstance(value, bool)):
                continue
            raise TypeError(f"AdapterConfig.{name} must be {'an int' if kind is int else 'a number'}, got {value!r}")
        ranges = {
            "width_ratio": (0 < self.width_ratio <= 4, "in (0, 4]"),
            "head_dim": (self.head_dim >= 1, ">= 1"),
            "embed_dim": (self.embed_dim is None or self.embed_dim >= 1, "None or >= 1"),
            "fourier_features": (self.fourier_features >= 1, ">= 1"),
            "fourier_scale": (0 < self.fourier_scale < math.inf, "finite and > 0"),
            "mlp_ratio": (0 < self.mlp_ratio < math.inf, "finite and > 0"),
        }
        for name, (ok, allowed) in ranges.items():
            if not ok:
                raise ValueError(f"AdapterConfig.{name} must be {allowed}, got {getattr(self, name)!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"AdapterConfig.placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.conditions is not None:
            if isinstance(self.conditions, str) or not isinstance(self.conditions, (tuple, list)):
                raise TypeError(f"AdapterConfig.conditions must be None or a list of names, got {self.conditions!r}")
            if any(c not in CONDITIONS for c in self.conditions) or len(set(self.conditions)) != len(self.conditions):
                raise ValueError(
                    f"AdapterConfig.conditions must be distinct names from {list(CONDITIONS)}, "
                    f"got {list(self.conditions)}"
                )
            object.__setattr__(self, "conditions", tuple(self.conditions))

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-ready dict."""
        out = dataclasses.asdict(self)
        out["conditions"] = None if self.conditions is None else list(self.conditions)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdapterConfig:
        """Builds a config from a dict (e.g. a parsed YAML/JSON section).

        Raises:
            ValueError: On unknown keys.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)


def _heads_and_width(block_width: int, config: AdapterConfig) -> tuple[int, int]:
    target = max(1, round(block_width * config.width_ratio))
    heads = math.ceil(target / config.head_dim)
    return heads, heads * math.ceil(target / heads)


class GuidanceEmbedding(nn.Module):
    """Embeds the guidance scale: random Fourier features -> MLP -> LayerNorm.

    Args:
        dim: Output size.
        features: Number of Fourier features (fixed random frequencies and phases, stored as
            buffers so they travel with the saved weights).
        scale: Standard deviation of the frequencies.
        mlp_ratio: Hidden width of the MLP relative to ``dim``.
    """

    def __init__(self, dim: int, features: int, scale: float, mlp_ratio: float) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.randn(features) * scale)
        self.register_buffer("phases", torch.rand(features))
        hidden = max(1, round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Maps ``w`` [B] to embeddings [B, dim]."""
        angle = 2 * math.pi * (w[:, None].to(self.frequencies.dtype) * self.frequencies + self.phases)
        return self.norm(self.mlp(torch.cos(angle)))


class ConditionTokens(nn.Module):
    """Turns the guidance embedding and the captured base embeddings into shared tokens.

    Args:
        arch: The base model's architecture.
        conditions: Names of the conditions to use.
        embed_dim: Token width.
        guidance: Settings of the :class:`GuidanceEmbedding` (``features``, ``scale``, ``mlp_ratio``).
    """

    def __init__(self, arch: Architecture, conditions: tuple[str, ...], embed_dim: int, **guidance: Any) -> None:
        super().__init__()
        self.guidance = GuidanceEmbedding(embed_dim, **guidance)
        self.sources = tuple(arch.condition(name) for name in conditions)
        self.proj = nn.ModuleDict({c.name: nn.Linear(c.dim, embed_dim) for c in self.sources})

    def forward(self, guidance: torch.Tensor, captured: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        """Builds the conditioning tokens.

        Args:
            guidance: Guidance embeddings [B or 1, E].
            captured: Base embeddings by condition name ([B or 1, dim] or [B or 1, L, dim]).
            batch: Batch size B.

        Returns:
            Tokens [B, S, E]: guidance, then the vector conditions, then any prompt tokens.
        """
        vectors, sequences = [guidance.expand(batch, -1)], []
        dtype = guidance.dtype
        for source in self.sources:
            value = self.proj[source.name](captured[source.name].to(dtype))
            if source.tokens:
                sequences.append(value.expand(batch, -1, -1))
            else:
                vectors.append(value.reshape(-1, value.shape[-1]).expand(batch, -1))
        return torch.cat([torch.stack(vectors, dim=1), *sequences], dim=1)


class BlockAdapter(nn.Module):
    """One adapter: cross-attention to the conditioning tokens, a per-token MLP, zero-initialised output.

    ``h = silu(q + attention(q, tokens))`` with ``q = to_q(norm(x))``, then
    ``to_out(silu(to_hidden(h)))``. The official adapter stops after the attention read-out,
    which leaves every token's correction inside the convex hull of a few value vectors per
    head; the MLP lets it depend on the token and the conditions jointly.

    Args:
        width: Channels of the block (query input and output).
        hidden: Width of the adapter.
        heads: Number of attention heads (divides ``hidden``).
        embed_dim: Width of the conditioning tokens.
    """

    def __init__(self, width: int, hidden: int, heads: int, embed_dim: int) -> None:
        super().__init__()
        self.heads = heads
        # The injected module's input may be a raw residual stream (UNet2DModel) or an
        # already normalised one (transformer blocks); a parameter-free norm fits both.
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.to_q = nn.Linear(width, hidden)
        self.to_k = nn.Linear(embed_dim, hidden, bias=False)
        self.to_v = nn.Linear(embed_dim, hidden, bias=False)
        self.to_hidden = nn.Linear(hidden, hidden)
        self.to_out = nn.Linear(hidden, width)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Adapter output [B, N, width] for block tokens ``x`` [B, N, width] and ``tokens`` [B, S, E]."""

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = self.to_q(self.norm(x))
        read = F.scaled_dot_product_attention(split(q), split(self.to_k(tokens)), split(self.to_v(tokens)))
        h = F.silu(q + read.transpose(1, 2).flatten(2))
        return self.to_out(F.silu(self.to_hidden(h)))


def _guidance_tensor(guidance_scale: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(guidance_scale, torch.Tensor):
        if not (guidance_scale.is_floating_point() or guidance_scale.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"guidance_scale must be a real tensor, got dtype {guidance_scale.dtype}")
        if guidance_scale.ndim > 1:
            shape = tuple(guidance_scale.shape)
            raise ValueError(f"guidance_scale must be a number or a tensor [B], got shape {shape}")
        # Values are not checked here: that would sync with the device on every call.
        return guidance_scale.to(device=device, dtype=dtype).reshape(-1)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise TypeError(f"guidance_scale must be a number or a tensor [B], got {type(guidance_scale).__name__}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    return torch.full((1,), float(guidance_scale), device=device, dtype=dtype)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class GuidanceAdapters(nn.Module):
    """A set of guidance adapters attached to a frozen diffusers network.

    Creating one attaches it: the base's parameters get ``requires_grad=False`` and hooks
    route every forward of the base through the adapters. The base is referenced, not
    owned: :meth:`parameters`, :meth:`state_dict`, :meth:`to` and :meth:`train` see only
    the adapters, and the base's own ``state_dict`` / ``save_pretrained`` are unchanged.

    Run the base with adapters through this module, giving one guidance scale per sample::

        adapters = GuidanceAdapters(unet)
        eps = adapters(x, t, encoder_hidden_states=text, guidance_scale=w).sample   # w: float or [B]

    This is also the module to hand to DDP / ``accelerate.prepare`` in training: its
    parameters are exactly the trainable ones (see :meth:`parameter_groups`). Calling the
    base directly while adapters are enabled raises, unless :meth:`set_guidance_scale`
    was called just before. The per-call state lives on this object, so one adapter set
    serves one thread at a time (as does a diffusers model's attention processor state).

    Args:
        model: A supported diffusers network (see
            :data:`~fewstep.distill.architectures.SUPPORTED_MODELS`), on any device; the
            adapters are created in float32 on the same device.
        config: Hyper-parameters; defaults to :class:`AdapterConfig()`.

    Raises:
        TypeError: If ``model`` is not a supported network.
        ValueError: If it already has adapters, or the config asks for a condition the
            architecture lacks.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None) -> None:
        super().__init__()
        config = AdapterConfig() if config is None else config
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
        arch = describe(model, config.placement)
        if model.__dict__.get(_ATTACHED) is not None:
            raise ValueError(f"this {type(model).__name__} already has guidance adapters; call .remove() on them first")

        conditions = tuple(c.name for c in arch.conditions) if config.conditions is None else config.conditions
        for name in conditions:
            arch.condition(name)  # raises for a condition the model lacks
        layout = [_heads_and_width(p.width, config) for p in arch.points]
        embed_dim = config.embed_dim or max(hidden for _, hidden in layout)
        self.config = dataclasses.replace(config, conditions=conditions, embed_dim=embed_dim)
        self.architecture = arch

        device = next(model.parameters()).device
        with _seeded(config.seed, device):
            self.tokens = ConditionTokens(
                arch, conditions, embed_dim,
                features=config.fourier_features, scale=config.fourier_scale, mlp_ratio=config.mlp_ratio,
            )
            self.blocks = nn.ModuleList(
                BlockAdapter(p.width, hidden, heads, embed_dim) for p, (heads, hidden) in zip(arch.points, layout)
            )
        self.to(device)

        # Plain attributes (not submodules): the base must not show up in our parameters.
        self.__dict__["_base"] = model
        self._frozen = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        model.__dict__[_ATTACHED] = self
        self._handles: list = []
        self._enabled = False  # a plain bool, which torch.compile can guard on
        self._pending: torch.Tensor | None = None
        self._guidance: torch.Tensor | None = None
        self._captured: dict[str, torch.Tensor] = {}
        self.enable()

    # ----------------------------------------------------------------- attachment
    @property
    def base(self) -> nn.Module:
        """The frozen base network the adapters are attached to."""
        return self.__dict__["_base"]

    @property
    def device(self) -> torch.device:
        """Where the adapter weights are."""
        return self.tokens.guidance.frequencies.device

    @staticmethod
    def attached_to(model: nn.Module) -> GuidanceAdapters | None:
        """Returns the adapters attached to ``model``, or None."""
        return model.__dict__.get(_ATTACHED)

    @property
    def enabled(self) -> bool:
        """Whether the base currently runs with the adapters."""
        return self._enabled

    def enable(self) -> GuidanceAdapters:
        """Routes the base's forward passes through the adapters (the default after creation).

        Returns:
            self.
        """
        if self.enabled:
            return self
        base = self.base
        if base.__dict__.get(_ATTACHED) is not self:
            raise RuntimeError("these guidance adapters were removed from their model; create or load new ones")
        self._handles.append(base.register_forward_pre_hook(self._on_base_call))
        for source in self.tokens.sources:
            if source.module is not None:
                module = base.get_submodule(source.module)
                self._handles.append(module.register_forward_hook(self._capture(source.name)))
        for index, point in enumerate(self.architecture.points):
            module = base.get_submodule(point.name)
            self._handles.append(module.register_forward_hook(self._adapt(index), with_kwargs=True))
        self._enabled = True
        return self

    def disable(self) -> GuidanceAdapters:
        """Removes the hooks: the base computes exactly what it computed before the adapters.

        Returns:
            self.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._enabled = False
        self._pending, self._guidance, self._captured = None, None, {}
        return self

    @contextlib.contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Context in which the base runs without adapters (e.g. as the CFG teacher).

        Yields:
            The base network.
        """
        was_enabled = self.enabled
        self.disable()
        try:
            yield self.base
        finally:
            if was_enabled:
                self.enable()

    def remove(self) -> None:
        """Disables the adapters for good and restores the base's ``requires_grad`` flags."""
        self.disable()
        base = self.base
        if base.__dict__.get(_ATTACHED) is self:
            del base.__dict__[_ATTACHED]
            for name, param in base.named_parameters():
                param.requires_grad_(self._frozen.get(name, param.requires_grad))

    # ------------------------------------------------------------------- running
    def set_guidance_scale(self, guidance_scale: float | torch.Tensor) -> None:
        """Sets ``w`` for the next forward of the base (which consumes it).

        Args:
            guidance_scale: A finite number, or a real tensor [B] (one scale per sample) or [1].

        Raises:
            TypeError / ValueError: On a non-number, a non-real tensor, a tensor with more
                than one dimension, or a non-finite number.
        """
        buffer = self.tokens.guidance.frequencies
        self._pending = _guidance_tensor(guidance_scale, buffer.device, buffer.dtype)

    @property
    def pending_guidance_scale(self) -> torch.Tensor | None:
        """The ``w`` set for the next forward of the base, if any (None once consumed)."""
        return self._pending

    def forward(self, *args: Any, guidance_scale: float | torch.Tensor, **kwargs: Any) -> Any:
        """Runs the base with the adapters at guidance scale ``w``.

        Args:
            *args: Positional arguments of the base's forward.
            guidance_scale: ``w``: a number, or a tensor [B] with one scale per sample.
            **kwargs: Keyword arguments of the base's forward.

        Returns:
            Whatever the base returns. With the adapters disabled, the base's output
            (``guidance_scale`` is then ignored).
        """
        if not self.enabled:
            _guidance_tensor(guidance_scale, torch.device("cpu"), torch.float32)  # still reject bad input
            return self.base(*args, **kwargs)
        self.set_guidance_scale(guidance_scale)
        try:
            return self.base(*args, **kwargs)
        finally:
            self._pending = None

    def _on_base_call(self, module: nn.Module, args: tuple) -> None:
        w, self._pending = self._pending, None
        if w is None:
            raise RuntimeError(
                f"{type(module).__name__} has guidance adapters enabled but got no guidance scale: run it as "
                "adapters(..., guidance_scale=w), call adapters.set_guidance_scale(w) first, or adapters.disable()"
            )
        # Computed here, outside every block, and kept until the next call: under gradient
        # checkpointing the blocks are recomputed in backward and must see the same inputs.
        self._guidance = self.tokens.guidance(w)
        self._captured = {}

    def _capture(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._captured[name] = output

        return hook

    def _adapt(self, index: int) -> Callable:
        adapter = self.blocks[index]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            hidden = _hidden_states(args, kwargs)
            batch = hidden.shape[0]
            captured = self._captured
            for source in self.tokens.sources:
                if source.module is None:
                    captured = {**captured, source.name: kwargs.get("encoder_hidden_states")}
                if captured.get(source.name) is None:
                    where = source.module or f"{self.architecture.points[index].name} (encoder_hidden_states)"
                    raise RuntimeError(
                        f"guidance adapters condition on {source.name!r} but {where} gave nothing in this forward"
                    )
            if self._guidance.shape[0] not in (1, batch):
                raise ValueError(f"guidance_scale has {self._guidance.shape[0]} entries for a batch of {batch}")
            tokens = self.tokens(self._guidance, captured, batch)
            main = output[0] if isinstance(output, tuple) else output
            x = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden
            delta = adapter(x.to(tokens.dtype), tokens).to(main.dtype)
            if main.ndim == 4:  # UNet2DModel attention works on [B, C, H, W]
                delta = delta.transpose(1, 2).reshape(main.shape)
            main = main + delta
            return (main, *output[1:]) if isinstance(output, tuple) else main

        return hook

    # ------------------------------------------------------------------ training
    def parameter_groups(self, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups: weight matrices decay, biases and norms do not.

        Args:
            weight_decay: Decay of the weight matrices.

        Returns:
            Two groups for ``torch.optim.AdamW(adapters.parameter_groups(wd), lr=...)``.
        """
        matrices = [p for p in self.parameters() if p.ndim >= 2]
        others = [p for p in self.parameters() if p.ndim < 2]
        return [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]

    def num_parameters(self) -> int:
        """Number of adapter parameters."""
        return sum(p.numel() for p in self.parameters())

    def base_num_parameters(self) -> int:
        """Number of parameters of the base network."""
        return sum(p.numel() for p in self.base.parameters())

    def extra_repr(self) -> str:
        share = 100 * self.num_parameters() / max(1, self.base_num_parameters())
        return (
            f"base={self.architecture.model_class}, placement={self.config.placement}, "
            f"points={len(self.architecture.points)}, "
            f"conditions={list(self.config.conditions)}, parameters={self.num_parameters()} ({share:.2f}% of base), "
            f"enabled={self.enabled}"
        )


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    # Seeded initialisation that leaves the caller's RNG streams alone. Weights are drawn
    # on the CPU, so a seed gives the same adapters on every device; on the meta device
    # (counting parameters without memory) nothing is drawn at all.
    if device.type == "meta":
        with torch.device("meta"):
            yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
