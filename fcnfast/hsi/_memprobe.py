"""Peak extra resident memory of one full-scene inference, measured in a fresh process.

``python -m fcnfast.hsi._memprobe SPEC.pt`` loads ``{"method", "config", "state_dict", "scene",
"threads"}``, builds the model, warms it up on a small crop, then prints JSON
``{"extra_peak_mb": ...}``: the growth of ``ru_maxrss`` (the process's resident high-water mark)
during the inference. PyTorch's CPU allocator has no peak counter and tracemalloc does not see
its buffers, hence the separate process.
"""
from __future__ import annotations

import json
import resource
import sys

import torch

from . import engine
from .models import HSIFCN, PatchCNN

METHODS = {"patch": (PatchCNN, engine.predict_patches), "dense": (PatchCNN, engine.predict_dense),
           "fcn": (HSIFCN, engine.predict_fcn)}


def measure(spec) -> float:
    cls, predict = METHODS[spec["method"]]
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model = cls(**spec["config"])
    model.load_state_dict(spec["state_dict"])
    scene = spec["scene"]
    predict(model, scene[:, :24, :24].contiguous())  # warm-up: kernels, allocator pools
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    predict(model, scene)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0  # Linux reports KiB


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = torch.load(argv[0], weights_only=False)
    print(json.dumps({"extra_peak_mb": measure(spec)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
