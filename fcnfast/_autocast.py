"""Mixed precision (``torch.autocast``) rules of fcnfast's ops, shared by both backends.

Under ``torch.autocast(device_type, dtype=...)`` every fcnfast op first casts its floating
tensor arguments by its rule below, then runs with autocast disabled (so the reference
expression does not cast again and the native kernel sees one dtype). The native kernels
accumulate in fp32 for bf16/fp16 inputs (``at::opmath_type``). The rules follow what the
op's reference expression does under autocast, as torchvision's ops do:

===================================  ====================================================
op                                   tensors are cast to
===================================  ====================================================
``conv_transpose2d``                 the autocast dtype (as ``F.conv_transpose2d``)
``bilinear_upsample2d``              the autocast dtype (its expression is a
                                     ``F.conv_transpose2d``)
``score_skip``                       the wider of ``coarse``'s dtype and the autocast dtype
                                     (the 1x1 conv runs in the autocast dtype, ``+`` promotes)
``skip_add_crop``                    the widest input dtype (as ``+``)
``upsample_cross_entropy``           float32 (as ``F.cross_entropy``); the loss is float32
``upsample_argmax``                  float32 (labels agree with the fp32 reference on
                                     the coarse scores; the coarse map is small)
``*_backward`` ops                   the widest input dtype
``dense_crf``, ``permutohedral_f.``  float32 (the CRF kernels are fp32-only)
===================================  ====================================================

float64 tensors are never cast down (as autocast leaves float64 alone); integer tensors
(labels) are never cast. The same rule runs in the Python wrappers (``fcnfast.ops``: it is
what the reference backend computes) and as the ``AutocastCPU`` / ``AutocastCUDA`` kernels
of the ``torch.ops.fcnfast`` dispatcher ops, so both backends give the same dtypes.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence

import torch

DEVICE_TYPES = ("cpu", "cuda")

_WIDEST = "widest"
_LOWER = "lower"
_FP32 = "fp32"
_COARSE = "coarse"  # score_skip: wider of the first tensor's dtype and the autocast dtype

RULES: Dict[str, str] = {
    "conv_transpose2d": _LOWER,
    "bilinear_upsample2d": _LOWER,
    "score_skip": _COARSE,
    "skip_add_crop": _WIDEST,
    "upsample_cross_entropy": _FP32,
    "upsample_argmax": _FP32,
    "conv_transpose2d_backward": _WIDEST,
    "bilinear_upsample2d_backward": _WIDEST,
    "skip_add_crop_backward": _WIDEST,
    "score_skip_backward": _WIDEST,
    "upsample_cross_entropy_backward": _WIDEST,
    "dense_crf": _FP32,
    "permutohedral_filter": _FP32,
}


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is enabled for ``device_type``, else None."""
    if device_type not in DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _floating(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


def target_dtype(op: str, args: Sequence, amp_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype ``op``'s floating tensors are cast to under autocast with ``amp_dtype``."""
    tensors = _floating(args)
    if not tensors:
        return None
    rule = RULES[op]
    if rule == _LOWER:
        return amp_dtype
    if rule == _FP32:
        return torch.float32
    if rule == _COARSE:
        return torch.promote_types(tensors[0].dtype, amp_dtype)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def cast(op: str, device_type: str, args: Sequence) -> tuple:
    """``args`` with the floating tensors cast by ``op``'s rule (unchanged outside autocast)."""
    amp = autocast_dtype(device_type)
    if amp is None:
        return tuple(args)
    dtype = target_dtype(op, args, amp)
    if dtype is None:
        return tuple(args)
    return tuple(
        a.to(dtype)
        if (
            isinstance(a, torch.Tensor)
            and a.is_floating_point()
            and a.dtype != dtype
            and a.dtype != torch.float64
        )
        else a
        for a in args
    )


def disabled(device_type: str):
    """A context with autocast off for ``device_type`` (a no-op context when it is off)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def register(lib: torch.library.Library, names: Sequence[str]) -> None:
    """Register the ``Autocast<Device>`` kernel of every ``fcnfast::<name>`` for CPU and CUDA.

    The kernel casts by ``RULES[name]`` and redispatches with the autocast key excluded,
    as ``torch.library.register_autocast`` does for a fixed dtype (a Python-dispatcher
    kernel too, so ``torch.compile`` and ``torch.export`` trace the same casts).
    """
    for name in names:
        op = getattr(torch.ops.fcnfast, name).default
        for device_type in DEVICE_TYPES:
            key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            key = getattr(torch._C.DispatchKey, key_name)
            impl = _kernel(op, name, device_type, key)
            if op.has_kernel_for_dispatch_key(key) and key in op.py_kernels:
                op.py_kernels.pop(key)
            op.py_impl(key)(impl)
            lib.impl(name, _with_keyset(impl), key_name, with_keyset=True)


def _kernel(op, name: str, device_type: str, key) -> Callable:
    def impl(*args):
        args = cast(name, device_type, args)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args)

    return impl


def _with_keyset(impl: Callable) -> Callable:
    def kernel(_keyset, *args):
        return impl(*args)

    return kernel
