"""Deploying fcnfast models: ONNX and torch.export with dynamic batch, height and width.

* ``export_program(model)`` -- ``torch.export.export`` with ``Dim``s for batch, height and
  width. The graph keeps fcnfast's native ops (``torch.ops.fcnfast.*``: their crop is a
  ``SymInt[4]`` computed from the input size), so the program is correct at every size in
  the Dims' ranges; ``torch.export.save`` / ``torch.export.load`` round-trip it (import
  ``fcnfast`` before loading, which registers the ops).
* ``export_onnx(model, path)`` -- ``torch.onnx.export(..., dynamo=True)`` with the same
  dynamic dims and ``onnx_translation_table()``, which translates every fcnfast op into
  standard ONNX operators, so any ONNX runtime executes the graph:

  ==========================  ===================================================
  fcnfast op                  ONNX
  ==========================  ===================================================
  conv_transpose2d(crop)      ConvTranspose + Slice (crop from the input's Shape)
  bilinear_upsample2d         Reshape to (N*C, 1, H, W), ConvTranspose with the
                              fixed (1, 1, 2s, 2s) Caffe bilinear filter, Reshape,
                              Slice
  skip_add_crop               Slice + Add
  score_skip                  Slice (the kept window) + Mul (scale) + 1x1 Conv + Add
  upsample_argmax             bilinear_upsample2d as above + ArgMax(axis=1)
  upsample_cross_entropy      bilinear_upsample2d + SoftmaxCrossEntropyLoss
  ==========================  ===================================================

* ``predict=True`` exports the label-map path (``model.predict``: int64 (N, H, W)).

TorchScript is refused with one clear error (``fcnfast.ops.TRACE_REFUSAL``,
``fcnfast.nn.SCRIPT_REFUSAL``): a trace would freeze the crop geometry of the traced size.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from . import ops
from .reference import bilinear_filter

__all__ = [
    "Predictor",
    "dynamic_shapes",
    "example_input",
    "export_program",
    "export_onnx",
    "onnx_translation_table",
    "register_cli",
]

# default ranges of the dynamic dims (torch.export needs an upper bound only to reason about
# sizes; these are far above what fits in memory for the VGG16 FCNs)
MAX_BATCH = 1024
MAX_SIDE = 16384


class Predictor(nn.Module):
    """``model.predict`` as a module: int64 label map (N, H, W) of float input (N, C, H, W).

    For an ``FCN`` with a frozen final upsampling this is ``ops.upsample_argmax`` on the coarse
    scores (no C x H x W scores held), otherwise ``model(x).argmax(1)``. For a ``LiteFCN`` the
    input is the normalised float image (``LiteFCN.preprocess``), as for its ``forward``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        if getattr(model, "fixed_upsampling", False) and hasattr(model, "coarse_scores"):
            scores, crop = model.coarse_scores(x)
            return ops.upsample_argmax(scores, model.upscale, crop)
        return model(x).argmax(1)


def example_input(
    model: nn.Module, batch: int = 2, height: int = 67, width: int = 75, dtype=torch.float32
) -> torch.Tensor:
    """A random (batch, in_channels, height, width) input for tracing (sizes not 0 or 1, odd)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    channels = int(getattr(model, "in_channels", 3))
    return torch.randn(batch, channels, height, width, dtype=dtype, device=device)


def dynamic_shapes(max_batch: int = MAX_BATCH, max_side: int = MAX_SIDE):
    """``dynamic_shapes`` for a model taking one (N, C, H, W) tensor: N, H and W dynamic."""
    Dim = torch.export.Dim
    return (
        {
            0: Dim("batch", min=1, max=max_batch),
            2: Dim("height", min=1, max=max_side),
            3: Dim("width", min=1, max=max_side),
        },
    )


def _size_oblivious():
    """Trace with size-oblivious reasoning about sizes that may be 1.

    The fc6 map of a VGG FCN is 1x1 for inputs up to 26 pixels a side (``(H + 197) // 32 - 5``).
    PyTorch's contiguity and convolution shape checks branch on "is this size 1" and would add
    guards such as ``(H + 197) // 32 - 5 != 1`` that fail an export with dynamic height/width;
    size-oblivious reasoning (``backed_size_oblivious``) treats such checks as they are for
    general sizes, which is what the program computes at every size (checked at 1x1 by the
    tests).
    """
    from torch.fx.experimental import _config

    return _config.patch(backed_size_oblivious=True)


def _prepare(model: nn.Module, example: Optional[torch.Tensor], predict: bool):
    if not isinstance(model, nn.Module):
        raise ValueError("model must be a torch.nn.Module, got %s" % type(model).__name__)
    model.eval()
    module = Predictor(model) if predict else model
    if example is None:
        example = example_input(model)
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        got = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ValueError("example must be a (N, C, H, W) tensor, got %s" % (got,))
    if min(example.shape[0], example.shape[2], example.shape[3]) < 2:
        # torch.export specialises sizes 0 and 1; the example must not fix a dynamic dim
        raise ValueError(
            "example must have batch, height and width >= 2 (sizes 0 and 1 are "
            "specialised by torch.export), got %s" % (tuple(example.shape),)
        )
    return module, example


def export_program(
    model: nn.Module,
    example: Optional[torch.Tensor] = None,
    *,
    predict: bool = False,
    max_batch: int = MAX_BATCH,
    max_side: int = MAX_SIDE,
) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model`` (or its ``predict`` path) with dynamic N, H, W.

    The model is put in eval mode. Save with ``torch.export.save(program, "model.pt2")``,
    load with ``torch.export.load`` after ``import fcnfast`` and run
    ``program.module()(x)`` at any batch size and image size in range.
    """
    module, example = _prepare(model, example, predict)
    with torch.no_grad(), _size_oblivious():
        return torch.export.export(
            module, (example,), dynamic_shapes=dynamic_shapes(max_batch, max_side)
        )


# ---------------------------------------------------------------------------
# ONNX translations of the fcnfast ops (onnxscript, traced by the dynamo exporter)
# ---------------------------------------------------------------------------


def onnx_translation_table():
    """``{torch.ops.fcnfast.<op>.default: onnxscript function}`` for ``torch.onnx.export``'s
    ``custom_translation_table``; every op becomes standard ONNX operators (written against
    opset 18; the exporter's default opset, 20 with torch 2.13, keeps their meaning)."""
    from typing import Optional as Opt
    from typing import TypeVar

    import numpy as np
    import onnx_ir as ir
    from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16, INT64
    from onnxscript import opset18 as op

    TFloat = TypeVar("TFloat", FLOAT, DOUBLE, FLOAT16, BFLOAT16)

    def ints(values):
        return op.Constant(value_ints=[int(v) for v in values])

    def crop_hw(y, crop):
        """y[..., top:top+h, left:left+w] with crop an INT64 [top, left, h, w] tensor."""
        starts = op.Slice(crop, ints([0]), ints([2]))
        sizes = op.Slice(crop, ints([2]), ints([4]))
        return op.Slice(y, starts, op.Add(starts, sizes), ints([2, 3]))

    def window(t, offset, like):
        """t[..., oy:oy+H, ox:ox+W] with (H, W) the spatial size of ``like``."""
        starts = ints(offset)
        hw = op.Shape(like, start=2, end=4)
        return op.Slice(t, starts, op.Add(starts, hw), ints([2, 3]))

    def bilinear(x, scale: int, crop):
        k = 2 * scale
        filt = bilinear_filter(k, torch.float32).numpy().reshape(1, 1, k, k).astype(np.float32)
        weight = op.CastLike(op.Constant(value=ir.tensor(filt, name="bilinear_filter_%d" % k)), x)
        flat = op.Reshape(x, op.Concat(ints([-1, 1]), op.Shape(x, start=2, end=4), axis=0))
        up = op.ConvTranspose(flat, weight, strides=[scale, scale])
        up = crop_hw(up, crop)
        return op.Reshape(
            up, op.Concat(op.Shape(x, start=0, end=2), op.Shape(up, start=2, end=4), axis=0)
        )

    def conv_transpose2d(
        x: TFloat,
        weight: TFloat,
        bias: Opt[TFloat],
        stride: Sequence[int],
        padding: Sequence[int],
        output_padding: Sequence[int],
        groups: int,
        dilation: Sequence[int],
        crop: INT64,
    ) -> TFloat:
        attrs = dict(
            strides=list(stride),
            pads=[padding[0], padding[1], padding[0], padding[1]],
            output_padding=list(output_padding),
            group=groups,
            dilations=list(dilation),
        )
        if bias is None:
            y = op.ConvTranspose(x, weight, **attrs)
        else:
            y = op.ConvTranspose(x, weight, bias, **attrs)
        return crop_hw(y, crop)

    def bilinear_upsample2d(x: TFloat, scale: int, crop: INT64) -> TFloat:
        return bilinear(x, scale, crop)

    def skip_add_crop(coarse: TFloat, skip: TFloat, offset: Sequence[int]) -> TFloat:
        return op.Add(coarse, window(skip, offset, coarse))

    def score_skip(
        coarse: TFloat,
        feature: TFloat,
        weight: TFloat,
        bias: Opt[TFloat],
        scale: float,
        offset: Sequence[int],
    ) -> TFloat:
        # the 1x1 conv commutes with the crop: score only the kept window, as the kernel does
        f = window(feature, offset, coarse)
        if scale != 1.0:
            f = op.Mul(f, op.CastLike(op.Constant(value_float=float(scale)), f))
        y = op.Conv(f, weight) if bias is None else op.Conv(f, weight, bias)
        return op.Add(coarse, y)

    def upsample_argmax(x: TFloat, scale: int, crop: INT64) -> INT64:
        return op.ArgMax(bilinear(x, scale, crop), axis=1, keepdims=0)

    def upsample_cross_entropy(
        x: TFloat, target: INT64, scale: int, crop: INT64, ignore_index: int, reduction: str
    ) -> TFloat:
        logits = bilinear(x, scale, crop)
        loss, _ = op.SoftmaxCrossEntropyLoss(
            logits, target, ignore_index=ignore_index, reduction=reduction
        )
        return loss

    T = torch.ops.fcnfast
    return {
        T.conv_transpose2d.default: conv_transpose2d,
        T.bilinear_upsample2d.default: bilinear_upsample2d,
        T.skip_add_crop.default: skip_add_crop,
        T.score_skip.default: score_skip,
        T.upsample_argmax.default: upsample_argmax,
        T.upsample_cross_entropy.default: upsample_cross_entropy,
    }


def export_onnx(
    model: nn.Module,
    path,
    example: Optional[torch.Tensor] = None,
    *,
    predict: bool = False,
    opset_version: Optional[int] = None,
    max_batch: int = MAX_BATCH,
    max_side: int = MAX_SIDE,
    output_names: Optional[Sequence[str]] = None,
):
    """``torch.onnx.export`` (dynamo exporter) of ``model`` to ``path`` with dynamic N, H, W.

    Input ``"input"`` (N, C, H, W) float; output ``"scores"`` (N, num_classes, H, W) or, with
    ``predict=True``, ``"labels"`` (N, H, W) int64 (``output_names`` for a module with several
    outputs). ``opset_version`` None: the exporter's default. Needs the ``onnx`` and
    ``onnxscript`` packages (``pip install fcnfast[onnx]``). Returns the
    ``torch.onnx.ONNXProgram``.
    """
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'fcnfast[onnx]'"
        ) from exc
    module, example = _prepare(model, example, predict)
    with torch.no_grad(), _size_oblivious():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset_version,
            input_names=["input"],
            output_names=list(output_names or ["labels" if predict else "scores"]),
            dynamic_shapes=dynamic_shapes(max_batch, max_side),
            custom_translation_table=onnx_translation_table(),
            verbose=False,
        )
    program.save(str(path))
    return program


# ---------------------------------------------------------------------------
# `fcnfast export`
# ---------------------------------------------------------------------------


def register_cli(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX or a torch.export program (.pt2) "
        "with dynamic batch, height and width",
    )
    p.add_argument("--format", choices=("onnx", "pt2"), required=True)
    p.add_argument(
        "--model",
        required=True,
        help="a training checkpoint (.pt from `fcnfast train`/`finetune`) or a model "
        "name (fcn32s, fcn16s, fcn8s, fcn8s_atonce) built with fresh weights",
    )
    p.add_argument("--backbone", default="vgg16", help="backbone for a model name")
    p.add_argument("--num-classes", type=int, default=21, help="classes for a model name")
    p.add_argument(
        "--fixed-upsampling",
        action="store_true",
        help="frozen bilinear final upsampling (for a model name)",
    )
    p.add_argument(
        "--predict",
        action="store_true",
        help="export the label-map path (int64 (N, H, W)) instead of the scores",
    )
    p.add_argument(
        "--example-size",
        type=int,
        nargs=2,
        default=(67, 75),
        metavar=("H", "W"),
        help="input size traced (any; the export is dynamic in N, H, W)",
    )
    p.add_argument("-o", "--output", required=True, help="output file (.onnx or .pt2)")
    p.set_defaults(func=_cmd_export)


def _model_from_arg(args) -> nn.Module:
    from .models import build_model

    path = Path(args.model)
    if path.exists():
        from . import load_model

        return load_model(path)
    try:
        return build_model(
            args.model,
            num_classes=args.num_classes,
            backbone=args.backbone,
            fixed_upsampling=args.fixed_upsampling,
        )
    except ValueError as exc:
        raise ValueError(
            "--model %r is neither an existing checkpoint file nor "
            "a model name (%s)" % (args.model, exc)
        ) from None


def _cmd_export(args: argparse.Namespace) -> int:
    model = _model_from_arg(args).eval()
    h, w = args.example_size
    example = example_input(model, 2, h, w)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "onnx":
        export_onnx(model, out, example, predict=args.predict)
    else:
        torch.export.save(export_program(model, example, predict=args.predict), str(out))
    print(
        "wrote %s (%s, dynamic batch/height/width, %s)"
        % (out, args.format, "labels" if args.predict else "scores")
    )
    return 0
