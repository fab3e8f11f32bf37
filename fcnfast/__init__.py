"""fcnfast: fast native kernels and models for fully convolutional networks (FCN).

The three FCN-specific steps -- transposed convolution with a fused output crop,
frozen bilinear upsampling, and the skip score+crop+add -- run as native C++
(and CUDA) kernels registered with the PyTorch dispatcher; ``fcnfast.reference``
defines every op in plain PyTorch and is the fallback when the extension is
missing.
"""

__version__ = "0.1.0"

from . import ops, reference  # noqa: E402
from ._backend import backend, build_info, use_backend  # noqa: E402
from .ops import (  # noqa: E402, F401 (re-exported: __all__)
    bilinear_upsample2d,
    conv_transpose2d,
    score_skip,
    skip_add_crop,
    upsample_argmax,
    upsample_cross_entropy,
)


def load_model(checkpoint, device="cpu", variant=None):
    """The model of a checkpoint, in eval mode: ``fcnfast train`` / ``fcnfast finetune``
    checkpoints, or a wkentaro/pytorch-fcn ``.pth`` (see ``fcnfast.checkpoints.load_model``)."""
    from .checkpoints import load_model as _load

    return _load(checkpoint, device, variant)


__all__ = [
    "__version__",
    "load_model",
    "backend",
    "build_info",
    "use_backend",
    "ops",
    "reference",
    *reference.OPS,
]
