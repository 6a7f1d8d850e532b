"""One network evaluation per step: guidance adapters inside unmodified diffusers pipelines.

A CFG pipeline doubles the batch (unconditional and conditional halves), calls the
denoiser once and combines ``uncond + w (cond - uncond)``. With adapters enabled, hooks
on the denoiser cut every call down to the conditional half, run base + adapters once on
it with ``w = pipe.guidance_scale``, and hand the result back for both halves, so the
pipeline's own combine returns exactly the adapter output (``y + w (y - y) = y``). The
pipeline, its scheduler and its code stay as they are; any scheduler works.

With the adapters disabled, the hooks pass everything through untouched: the pipeline
runs real CFG again, bit for bit, negative prompts included. Calls that bring their own
scale (``adapters(..., guidance_scale=w)``) are left alone too; any other call of the
denoiser while the adapters are enabled is taken for a call of the bound pipeline.

The pipeline's own call arguments are seen through a subclass of its class, named alike,
swapped in for the bound pipeline (``__call__`` records them, then runs the original): to
read ``guidance_scale`` where the pipeline keeps no ``guidance_scale`` property (DiT) and to
warn that a negative prompt given while the adapters are on is dropped.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from .adapters import GuidanceAdapters
from .saving import find_denoiser, load_adapters

__all__ = ["DIFFUSERS_BATCH_ORDER", "enable_guidance_adapters", "disable_guidance_adapters"]

# diffusers pipelines stack [negative, positive]; a pipeline that does otherwise declares
# its layout in a `guidance_batch_order` attribute (fewstep.zoo.digits.DigitsPipeline does).
DIFFUSERS_BATCH_ORDER = ("unconditional", "conditional")
_BINDING = "_fewstep_one_forward"  # key in the denoiser's __dict__
_ORDERS = (("unconditional", "conditional"), ("conditional", "unconditional"))
# Pipelines (by class name along the MRO) that stack the conditional half first.
_CONDITIONAL_FIRST = ("DiTPipeline",)
# Call arguments that only shape the unconditional half, dropped with it.
_NEGATIVE_ARGUMENTS = ("negative_prompt", "negative_prompt_2", "negative_prompt_3", "negative_prompt_embeds",
                       "negative_pooled_prompt_embeds")
_RECORDING: dict[type, type] = {}  # pipeline class -> its recording subclass


def _half(value: Any, rows: int, keep: slice) -> Any:
    # Every batch-shaped tensor (first dim = the doubled batch) keeps its conditional
    # rows; scalars, per-token tensors of other sizes and non-tensors pass unchanged.
    if isinstance(value, torch.Tensor):
        return value[keep] if value.ndim > 0 and value.shape[0] == rows else value
    if isinstance(value, (list, tuple)):
        return type(value)(_half(v, rows, keep) for v in value)
    if isinstance(value, dict):
        return {k: _half(v, rows, keep) for k, v in value.items()}
    return value


def _doubled(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return torch.cat([output, output])
    if isinstance(output, tuple):
        return (_doubled(output[0]), *output[1:])
    key = next(iter(output.keys()))  # diffusers BaseOutput: the sample comes first
    output[key] = _doubled(output[key])
    return output


def _given(value: Any) -> bool:
    # An empty negative prompt is the pipelines' default unconditional input: nothing is lost.
    if isinstance(value, (list, tuple)):
        return any(_given(v) for v in value)
    return value is not None and not (isinstance(value, str) and not value)


def _recording_class(cls: type) -> type:
    """A subclass of pipeline class ``cls`` whose ``__call__`` tells the bound hooks its arguments."""
    if cls in _RECORDING:
        return _RECORDING[cls]
    signature = inspect.signature(cls.__call__)

    @functools.wraps(cls.__call__)  # keeps the signature (and docs) of the pipeline's own call
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        binding = find_denoiser(self).__dict__.get(_BINDING)
        if binding is None:
            return cls.__call__(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        binding.called(bound.arguments)
        try:
            return cls.__call__(self, *args, **kwargs)
        finally:
            binding.call = None

    recording = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__, "_fewstep_recorded": cls})
    _RECORDING[cls] = recording
    return recording


class _OneForward:
    """The pre/post hook pair that runs the denoiser once per step on the conditional half."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        self.pipe: weakref.ref | None = None
        self.conditional_first = False
        self.active = False  # the current call was cut in half
        self.call: dict[str, Any] | None = None  # arguments of the pipeline call in progress
        self.warned_negative = False
        self.handles = [
            # Prepended, so the cut happens before the adapters' own hook reads the inputs.
            denoiser.register_forward_pre_hook(self.before, with_kwargs=True, prepend=True),
            denoiser.register_forward_hook(self.after),
        ]

    def bind(self, pipe: Any, order: tuple[str, str]) -> None:
        self.pipe = weakref.ref(pipe)
        self.conditional_first = order[0] == "conditional"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.denoiser.__dict__.pop(_BINDING, None)
        pipe = self.pipe() if self.pipe is not None else None
        if pipe is not None and "_fewstep_recorded" in type(pipe).__dict__:
            pipe.__class__ = type(pipe)._fewstep_recorded

    def called(self, arguments: dict[str, Any]) -> None:
        """Records the arguments of a call of the bound pipeline (its recording ``__call__``)."""
        self.call = arguments
        adapters = GuidanceAdapters.attached_to(self.denoiser)
        dropped = [k for k in _NEGATIVE_ARGUMENTS if _given(arguments.get(k))]
        if dropped and adapters is not None and adapters.enabled and not self.warned_negative:
            self.warned_negative = True
            warnings.warn(f"guidance adapters are on: {', '.join(dropped)} is ignored (the unconditional half is "
                          "not computed); disable_guidance_adapters(pipe) for real CFG with it", stacklevel=3)

    def guidance_scale(self, pipe: Any) -> float:
        if isinstance(getattr(type(pipe), "guidance_scale", None), property):
            return pipe.guidance_scale
        if self.call is None or "guidance_scale" not in self.call:
            raise RuntimeError(f"{type(pipe).__name__} called its denoiser outside a pipeline call: no guidance_scale "
                               "for the adapters")
        return self.call["guidance_scale"]

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        self.active = False
        adapters = GuidanceAdapters.attached_to(module)
        # A call that brings its own w (adapters(..., guidance_scale=w)) is not the pipeline's.
        if adapters is None or not adapters.enabled or adapters.pending_guidance_scale is not None:
            return None
        pipe = self.pipe() if self.pipe is not None else None
        if pipe is None:
            raise RuntimeError("the pipeline the guidance adapters were enabled on is gone; enable them on the new one")
        if kwargs.get("skip_layers") is not None:
            raise NotImplementedError("skip-layer guidance needs real CFG; disable the guidance adapters to use it")
        w = self.guidance_scale(pipe)
        guided = getattr(pipe, "do_classifier_free_guidance", w > 1)
        sample = args[0] if args else next(iter(kwargs.values()))
        if guided:
            rows = sample.shape[0]
            if rows % 2:
                raise RuntimeError(f"expected a doubled CFG batch, got {rows} rows")
            keep = slice(None, rows // 2) if self.conditional_first else slice(rows // 2, None)
            args, kwargs = _half(args, rows, keep), _half(kwargs, rows, keep)
        # The pipeline may have moved the denoiser (pipe.to, offloading); the adapters follow.
        if adapters.device != sample.device:
            adapters.to(sample.device)
        adapters.set_guidance_scale(float(w))
        self.active = guided
        return args, kwargs

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self.active:
            return None
        self.active = False
        return _doubled(output)


def enable_guidance_adapters(
    pipe: Any, path: str | os.PathLike | None = None, *, batch_order: tuple[str, str] | None = None
) -> GuidanceAdapters:
    """Makes ``pipe(..., guidance_scale=w)`` run guided sampling with one forward per step.

    The adapters receive ``w = pipe.guidance_scale`` and the unconditional half of the
    pipeline's CFG batch is never computed (negative prompts are therefore ignored while
    the adapters are on). Works with any scheduler.

    A negative prompt given while the adapters are on is dropped with a warning (once).

    Args:
        pipe: A diffusers pipeline (or :class:`~fewstep.zoo.digits.DigitsPipeline`) with a
            ``unet`` or ``transformer`` and a ``guidance_scale`` property or call argument
            (``DiTPipeline``).
        path: A folder written by :func:`~fewstep.distill.save_adapters`. Adapters already
            on the denoiser are replaced. None re-enables the adapters already attached.
        batch_order: Layout of the pipeline's doubled batch, ``("unconditional",
            "conditional")`` (diffusers' convention, the default) or the reverse; defaults
            to the pipeline's ``guidance_batch_order`` attribute if it has one (and to
            conditional first for ``DiTPipeline``).

    Returns:
        The enabled adapters (``.disable()`` / ``.enable()`` switch them).

    Raises:
        TypeError: If ``pipe`` has no denoiser, or neither a ``guidance_scale`` property nor
            a ``guidance_scale`` call argument.
        ValueError: On a bad ``batch_order``, no adapters to enable, or adapters that do
            not fit the denoiser (see :func:`~fewstep.distill.load_adapters`).
    """
    if isinstance(pipe, nn.Module):
        raise TypeError(f"expected a pipeline, got {type(pipe).__name__}")
    denoiser = find_denoiser(pipe)
    call = getattr(type(pipe), "__call__", None)
    takes_w = call is not None and "guidance_scale" in inspect.signature(call).parameters
    if not (hasattr(type(pipe), "guidance_scale") or takes_w):
        raise TypeError(f"{type(pipe).__name__} has no guidance_scale property or call argument to read w from")
    first = any(c.__name__ in _CONDITIONAL_FIRST for c in type(pipe).__mro__)
    default = ("conditional", "unconditional") if first else DIFFUSERS_BATCH_ORDER
    order = batch_order or getattr(pipe, "guidance_batch_order", default)
    if tuple(order) not in _ORDERS:
        raise ValueError(f"batch_order must be one of {_ORDERS}, got {order!r}")

    adapters = GuidanceAdapters.attached_to(denoiser)
    if path is not None:
        if adapters is not None:
            adapters.remove()
        adapters = load_adapters(denoiser, path)
    elif adapters is None:
        raise ValueError(f"{type(denoiser).__name__} has no guidance adapters; pass the folder to load them from")
    binding = denoiser.__dict__.get(_BINDING)
    if binding is None:
        binding = denoiser.__dict__[_BINDING] = _OneForward(denoiser)
    binding.bind(pipe, tuple(order))
    denoiser.requires_grad_(False)  # the attached state (disable_guidance_adapters restored the flags)
    if call is not None and "_fewstep_recorded" not in type(pipe).__dict__:
        pipe.__class__ = _recording_class(type(pipe))
    return adapters.enable()


def disable_guidance_adapters(pipe: Any, remove: bool = False) -> None:
    """Restores real classifier-free guidance in ``pipe``, bit for bit.

    Args:
        pipe: A pipeline passed to :func:`enable_guidance_adapters`.
        remove: Also detach the adapters from the denoiser for good (otherwise
            ``enable_guidance_adapters(pipe)`` switches them back on).
    """
    denoiser = find_denoiser(pipe)
    binding = denoiser.__dict__.get(_BINDING)
    if binding is not None:
        binding.remove()
    adapters = GuidanceAdapters.attached_to(denoiser)
    if adapters is not None:
        if remove:
            adapters.remove()  # restores the base's requires_grad flags itself
        else:
            adapters.disable()
            # Attaching froze the base; unfreeze it as it was: a lasting side effect otherwise
            # (a later fine-tune trains nothing), and on CPU frozen weights run other kernels.
            for name, param in denoiser.named_parameters():
                param.requires_grad_(adapters._frozen.get(name, param.requires_grad))
