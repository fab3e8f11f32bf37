"""Segmentation data: VOC reader, synthetic scenes, image/label I/O and normalisation."""

from .images import (
    IGNORE_INDEX,
    MEAN_RGB,
    STD_RGB,
    VOC_CLASSES,
    image_to_tensor,
    load_image,
    load_label,
    save_label_png,
    tensor_to_image,
    voc_palette,
)
from .layouts import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    CamVid,
    FolderPairSegmentation,
    ListFileSegmentation,
    NormalizedImages,
    detect_layout,
    open_segmentation,
)
from .synthetic import SyntheticScenes, class_appearance, render_scene
from .voc import VOCSegmentation, read_split, write_synthetic_voc

__all__ = [
    "IGNORE_INDEX",
    "MEAN_RGB",
    "STD_RGB",
    "VOC_CLASSES",
    "image_to_tensor",
    "load_image",
    "load_label",
    "save_label_png",
    "tensor_to_image",
    "voc_palette",
    "SyntheticScenes",
    "class_appearance",
    "render_scene",
    "VOCSegmentation",
    "read_split",
    "write_synthetic_voc",
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "CamVid",
    "FolderPairSegmentation",
    "ListFileSegmentation",
    "NormalizedImages",
    "detect_layout",
    "open_segmentation",
]
