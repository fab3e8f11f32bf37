"""Peak extra resident memory of one full-scene inference, measured in a fresh process.

``python -m fcnfast.hsi._memprobe SPEC.pt`` loads ``{"method", "config", "state_dict", "scene",
"threads"}``, builds the model, warms it up on a small crop, then prints JSON
``{"extra_peak_mb": ...}``: the peak resident set size during the inference minus the resident
size just before it (Linux: the high-water mark ``VmHWM`` is reset through
``/proc/self/clear_refs`` first; elsewhere ``ru_maxrss`` growth, which misses peaks lower than the
import-time one). PyTorch's CPU allocator has no peak counter and tracemalloc does not see
its buffers, hence the separate process.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from . import engine
from .models import HSIFCN, PatchCNN


def _fcn_crf(model, scene, params=None):
    from ..crf import dense_crf

    return dense_crf(engine.predict_fcn(model, scene), scene, **(params or {}))


METHODS = {
    "patch": (PatchCNN, engine.predict_patches),
    "dense": (PatchCNN, engine.predict_dense),
    "fcn": (HSIFCN, engine.predict_fcn),
    "crf": (HSIFCN, _fcn_crf),
}


def measure(spec) -> float:
    cls, predict = METHODS[spec["method"]]
    if spec["method"] == "crf":
        params = spec.get("crf")
        predict = lambda model, scene: _fcn_crf(model, scene, params)  # noqa: E731
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model = cls(**spec["config"])
    model.load_state_dict(spec["state_dict"])
    scene = spec["scene"]
    predict(model, scene[:, :24, :24].contiguous())  # warm-up: kernels, allocator pools
    if _reset_peak():
        before = _status_kib("VmRSS")
        predict(model, scene)
        return (_status_kib("VmHWM") - before) / 1024.0
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    predict(model, scene)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0  # KiB on Linux


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _status_kib(field: str):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = torch.load(argv[0], weights_only=False)
    print(json.dumps({"extra_peak_mb": measure(spec)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
