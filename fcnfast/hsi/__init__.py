"""Hyperspectral image (HSI) classification: patch-based CNN vs fully convolutional network.

The study notes this project started from classify hyperspectral pixels with a CNN on the
``w x w`` patch around each pixel and want an FCN instead: patches cost storage, recompute the
overlap of neighbouring patches and see only a small context. This package makes the comparison
measurable:

* ``fcnfast.data.hsi`` -- loaders (.mat / .npy), per-band normalisation, synthetic scenes;
* ``splits`` -- random per-class and spatially disjoint (per-class tiles or blocks, + buffer)
  train/test masks, and ``split_report`` (per-class counts, classes without test pixels);
* ``models`` -- ``PatchCNN`` (the baseline), ``HSIFCN`` (whole-scene FCN on fcnfast layers);
* ``fcnfast.models.convolutionalize`` -- the patch CNN as an exactly equivalent dense net;
* ``metrics`` -- OA, AA, Cohen's kappa, per-class accuracy, confusion matrix (test pixels);
* ``cli`` -- ``fcnfast hsi`` (``register_cli``), the side-by-side experiment and its report;
* ``published`` -- published results quoted next to ours, with paper, table and protocol.
"""

from .cli import add_arguments, register_cli, run, run_experiment
from .metrics import classification_scores, confusion_matrix
from .models import HSIFCN, PatchCNN, extract_patches, receptive_field, reflect_pad
from .splits import block_split, disjoint_split, mask_indices, random_split, split_report

__all__ = [
    "register_cli",
    "add_arguments",
    "run",
    "run_experiment",
    "classification_scores",
    "confusion_matrix",
    "HSIFCN",
    "PatchCNN",
    "extract_patches",
    "receptive_field",
    "reflect_pad",
    "block_split",
    "disjoint_split",
    "random_split",
    "split_report",
    "mask_indices",
]
