"""FCN models: FCN-32s/16s/8s and at-once FCN-8s on VGG16 (or reduced-width) backbones."""

from .backbones import BACKBONES, BackboneSpec
from .convolutionalize import convolutionalize
from .efficientnet import EfficientNetLite0, lite0_state_dict_from_package, load_lite0_state_dict
from .fcn import FCN, VARIANTS, build_model, fcn8s, fcn8s_atonce, fcn16s, fcn32s
from .lite_fcn import LITE_VARIANTS, LiteFCN
from .pretrained import PRETRAINED, pretrained
from .vgg import load_vgg16, vgg16_key_map

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "convolutionalize",
    "FCN",
    "VARIANTS",
    "build_model",
    "fcn32s",
    "fcn16s",
    "fcn8s",
    "fcn8s_atonce",
    "load_vgg16",
    "vgg16_key_map",
    "EfficientNetLite0",
    "load_lite0_state_dict",
    "lite0_state_dict_from_package",
    "LITE_VARIANTS",
    "LiteFCN",
    "PRETRAINED",
    "pretrained",
]
