"""Which implementation runs an op: the compiled extension or the reference.

Order: the compiled extension ``fcnfast._C`` when it loaded and has a kernel for
the tensor's device, otherwise ``fcnfast.reference``. ``FCNFAST_BACKEND``
forces a choice: ``reference`` always uses the pure-PyTorch ops, ``native``
raises if the extension cannot be loaded. A missing or broken extension never
raises ImportError: it warns once and the reference runs.

CUDA tensors: the compiled CUDA kernels when the extension was built with
CUDA, else the same kernel sources JIT-compiled by CuPy (``fcnfast._cupy``),
else the reference (one warning). ``FCNFAST_CUDA_BACKEND=auto|native|cupy``
forces the choice (``cupy`` also replaces compiled CUDA kernels; it raises when
CuPy is missing).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

_VALID = ("auto", "native", "reference")
_lock = threading.Lock()
_state = {
    "ext": None,
    "error": None,
    "loaded": False,
    "override": None,
    "cuda": None,
    "cuda_warned": False,
}
_on_load = []  # callbacks run once the extension has loaded (op registrations)


def on_extension_load(callback):
    """Run ``callback()`` now if the extension is loaded, else right after it loads."""
    if _state["ext"] is not None:
        callback()
    else:
        _on_load.append(callback)


def _load_extension():
    with _lock:
        if _state["loaded"]:
            return _state["ext"]
        _state["loaded"] = True
        try:
            from . import _C  # noqa: F401  (registers torch.ops.fcnfast.*)
        except Exception as exc:  # ImportError, undefined symbols, ABI mismatch ...
            _state["error"] = exc
            if _requested() == "native":
                raise RuntimeError(
                    "FCNFAST_BACKEND=native but the fcnfast._C extension failed to load: %s" % exc
                ) from exc
            if _requested() != "reference":
                warnings.warn(
                    "fcnfast: native extension not available (%s: %s); using the pure-PyTorch "
                    "reference ops. Rebuild with `pip install --no-build-isolation .` against the "
                    "installed torch (%s)." % (type(exc).__name__, exc, torch.__version__),
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None
        _state["ext"] = _C
    for callback in _on_load:
        callback()
    _on_load.clear()
    _setup_cuda(_C)
    return _C


def _setup_cuda(ext) -> None:
    """Decide which kernels CUDA tensors get; register the CuPy ones when they are needed."""
    from . import _cupy

    choice = _cupy.requested()
    if choice == "native" or (choice == "auto" and ext.with_cuda):
        _state["cuda"] = "native" if ext.with_cuda else None
        return
    if not _cupy.available():
        if choice == "cupy":
            raise RuntimeError(
                "%s=cupy but CuPy is not installed (pip install fcnfast[cupy])" % _cupy.ENV
            )
        return
    if choice == "cupy" or torch.cuda.is_available():
        _cupy.register()
        _state["cuda"] = "cupy"


def _warn_no_cuda_kernels() -> None:
    if _state["cuda_warned"]:
        return
    _state["cuda_warned"] = True
    warnings.warn(
        "fcnfast: CUDA tensors run the pure-PyTorch reference ops: the extension has no CUDA "
        "kernels and the CuPy backend is not in use (install CuPy: pip install fcnfast[cupy]; "
        "or rebuild with FCNFAST_CUDA=1).",
        RuntimeWarning,
        stacklevel=4,
    )


def _requested() -> str:
    if _state["override"] is not None:
        return _state["override"]
    value = os.environ.get("FCNFAST_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError("FCNFAST_BACKEND must be one of %s, got %r" % (_VALID, value))
    return value


def extension():
    """The loaded ``fcnfast._C`` module, or None (reference fallback)."""
    if _requested() == "reference" and not _state["loaded"]:
        # do not even try to load a possibly broken extension
        return None
    return _load_extension()


_registered = set()  # (op, dispatch key) pairs known to have a kernel


def has_kernel(op: str, device_type: str) -> bool:
    """True when the native backend should run ``op`` for tensors on ``device_type``."""
    if _requested() == "reference" or extension() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    found = (op, key) in _registered
    if not found:
        # a registration only ever appears (the extension's load, CuPy's kernels), so a
        # positive answer is kept: the dispatcher query costs ~10 us per op call
        found = torch._C._dispatch_has_kernel_for_dispatch_key("fcnfast::" + op, key)
        if found:
            _registered.add((op, key))
    if not found and key == "CUDA":
        _warn_no_cuda_kernels()
    return found


def backend(device=None) -> str:
    """Which backend runs the ops: ``"native"`` (compiled extension) or ``"reference"``.

    With ``device`` (a ``torch.device`` or string), the backend for tensors on that
    device: for CUDA ``"native"`` (compiled CUDA kernels), ``"cupy"`` (the same
    kernels compiled at run time by CuPy) or ``"reference"``.
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        from . import _cupy

        _cupy.requested()  # a bad FCNFAST_CUDA_BACKEND is an error even without the extension
    if _requested() == "reference" or extension() is None:
        return "reference"
    if cuda:
        return _state["cuda"] or "reference"
    return "native"


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the ops on one backend in this process for its duration.

    Args:
        name (str): ``"native"`` (the compiled extension; an error when it failed to load),
            ``"reference"`` (the pure-PyTorch definitions) or ``"auto"`` (native when loaded).

    Example::

        with fcnfast.use_backend("reference"):
            out = fcnfast.bilinear_upsample2d(x, 8)
    """
    if name not in _VALID:
        raise ValueError("backend must be one of %s, got %r" % (_VALID, name))
    if name == "native" and _load_extension() is None:
        raise RuntimeError(
            "native backend requested but fcnfast._C failed to load: %s" % _state["error"]
        )
    previous = _state["override"]
    _state["override"] = name
    try:
        yield
    finally:
        _state["override"] = previous


def build_info() -> dict:
    """Version, backend and how the extension was built (for ``fcnfast info``)."""
    from . import __version__

    ext = extension()
    info = {
        "version": __version__,
        "backend": backend(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_available": torch.cuda.is_available(),
    }
    if info["cuda_available"]:
        info["cuda_backend"] = backend("cuda")
    if ext is not None:
        info.update(
            compiled_version=ext.__version__,
            compiled_torch=ext.torch_version,
            compiled_cpu=True,
            compiled_cuda=bool(ext.with_cuda),
            openmp=bool(ext.with_openmp),
            sanitize=ext.sanitize or None,
        )
    else:
        info.update(
            compiled_cpu=False,
            compiled_cuda=False,
            load_error=repr(_state["error"]) if _state["error"] else None,
        )
    return info
