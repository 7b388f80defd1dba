"""The SSD family: one builder per variant (the numbers live here), `build_model`, `load_model`,
and import of the weights users already have (ours, torchvision's, NVIDIA's)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models as tv_models
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers as make_vgg_layers

from ssd_core.anchors import DefaultBoxes
from ssd_core.backbones.mobilenet import MobileNetExtractor, freeze_mobilenet, stage_starts
from ssd_core.backbones.resnet import ResNetExtractor, freeze_resnet
from ssd_core.backbones.vgg import VGGExtractor, freeze_vgg
from ssd_core.heads import SSDHead, normal_init
from ssd_core.model import SSD
from ssd_core.postprocess import PostProcessConfig

log = logging.getLogger(__name__)

COCO_91_NAMES: list[str] = list(_COCO_CATEGORIES)  # torchvision's label space: COCO ids, "N/A" gaps
COCO_81_NAMES: list[str] = ["__background__"] + [n for n in _COCO_CATEGORIES[1:] if n != "N/A"]  # NVIDIA's


@dataclass(frozen=True)
class Recipe:
    """An architecture's training defaults. `lr_per_32`: learning rate for a total batch of 32
    images (scaled linearly with the batch); `milestones`: fractions of the run (multistep)."""

    lr_per_32: float
    weight_decay: float
    schedule: str
    milestones: tuple[float, ...]
    warmup_iters: int
    augment: str


# torchvision: SSD300 lr 0.002 at 4 x 8 GPUs, wd 5e-4, steps at epochs 80 and 110 of 120, 1000 warm-up
# iterations. NVIDIA SSD300-ResNet50: lr 2.6e-3 per 32, wd 5e-4, 300 warm-up iterations, steps at 43 and
# 54 of 65. torchvision SSDLite: lr 0.15 at 24 x 8 GPUs (0.025 per 32), wd 4e-5, cosine over 600 epochs;
# for short from-scratch runs we use 0.1 per 32: at 0.025 a few-epoch run has barely started (measured
# with `ssd bench learn`, docs/training.md).
VGG_RECIPE = Recipe(0.002, 5e-4, "multistep", (80 / 120, 110 / 120), 1000, "ssd")
NVIDIA_RECIPE = Recipe(2.6e-3, 5e-4, "multistep", (43 / 65, 54 / 65), 300, "ssd")
SSDLITE_RECIPE = Recipe(0.1, 4e-5, "cosine", (), 1000, "ssdlite")


@dataclass(frozen=True)
class SSDConfig:
    """Everything that defines a variant, and everything else keyed by it: its training `recipe`
    (`TrainConfig` defaults), the weights "DEFAULT" names (`ssd_core.weights` registry names; None:
    no published detector) and the torchvision builder it is compared with (None: torchvision has none).
    Builders fill it in; `build_model(**overrides)` edits its model fields (`MODEL_OPTIONS`)."""

    arch: str
    size: tuple[int, int]
    backbone: str
    aspect_ratios: tuple[tuple[int, ...], ...]
    scales: tuple[float, ...] | None = None
    min_ratio: float = 0.15
    max_ratio: float = 0.9
    steps: tuple[int, ...] | None = None
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    head: str = "plain"
    extra_spec: tuple[tuple[int, ...], ...] = ()
    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    detections_per_img: int = 200
    topk_candidates: int = 400
    iou_threshold: float = 0.5
    neg_to_pos_ratio: float = 3.0
    max_trainable_layers: int = 5
    reduced_tail: bool | None = None  # MobileNetV3 only; None: reduced unless its backbone is pretrained
    extras: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe = SSDLITE_RECIPE
    default_weights: str | None = None
    default_backbone_weights: str | None = None
    torchvision_builder: str | None = None


# The fields a checkpoint or `build_model(**overrides)` may change: the model's, not the registry's.
MODEL_OPTIONS = frozenset(SSDConfig.__dataclass_fields__) - {
    "arch", "recipe", "default_weights", "default_backbone_weights", "torchvision_builder"}


# -- the variants ---------------------------------------------------------------------------------

SSD300_VGG16 = SSDConfig(
    arch="ssd300_vgg16",
    size=(300, 300),
    backbone="vgg16",
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    scales=(0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
    steps=(8, 16, 32, 64, 100, 300),
    # The Caffe VGG weights expect 0..255 pixels minus the mean: undo ToTensor's scaling.
    image_mean=(0.48235, 0.45882, 0.40784),
    image_std=(1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0),
    extra_spec=((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0)),
    recipe=VGG_RECIPE,
    default_weights="ssd300_vgg16.COCO_V1",
    # torchvision's ssd300_vgg16 builder starts from VGG16 IMAGENET1K_FEATURES, not VGG16's DEFAULT.
    default_backbone_weights="vgg16.IMAGENET1K_FEATURES",
    torchvision_builder="ssd300_vgg16",
)

# The official SSD512 COCO tiling: maps 64..1, min sizes 20.48..460.8 px, 24,564 default boxes.
SSD512_VGG16 = replace(
    SSD300_VGG16,
    arch="ssd512_vgg16",
    size=(512, 512),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    scales=(0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06),
    steps=(8, 16, 32, 64, 128, 256, 512),
    extra_spec=(
        (256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 4, 1, 1),
    ),
    default_weights=None,  # no published COCO weights: backbone only
    torchvision_builder=None,
)

# NVIDIA DeepLearningExamples SSD300 v1.1: scales 21..315 px, ImageNet normalisation.
SSD300_RESNET50 = SSDConfig(
    arch="ssd300_resnet50",
    size=(300, 300),
    backbone="resnet50",
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
    scales=(21 / 300, 45 / 300, 99 / 300, 153 / 300, 207 / 300, 261 / 300, 315 / 300),
    steps=(8, 16, 32, 64, 100, 300),
    extra_spec=((256, 512, 2, 1), (256, 512, 2, 1), (128, 256, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0)),
    recipe=NVIDIA_RECIPE,
    default_weights="ssd300_resnet50.COCO_V1",
    default_backbone_weights="resnet50.IMAGENET1K_V1",  # NVIDIA starts from ResNet-50 V1
)

# torchvision's SSDlite320 on MobileNetV3-Large.
SSDLITE320_MOBILENET_V3_LARGE = SSDConfig(
    arch="ssdlite320_mobilenet_v3_large",
    size=(320, 320),
    backbone="mobilenet_v3_large",
    aspect_ratios=((2, 3),) * 6,
    min_ratio=0.2,
    max_ratio=0.95,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    head="separable",
    score_thresh=0.001,
    nms_thresh=0.55,
    detections_per_img=300,
    topk_candidates=300,
    max_trainable_layers=6,
    recipe=SSDLITE_RECIPE,
    default_weights="ssdlite320_mobilenet_v3_large.COCO_V1",
    # torchvision's detection reference trains SSDLite from MobileNetV3 IMAGENET1K_V1.
    default_backbone_weights="mobilenet_v3_large.IMAGENET1K_V1",
    torchvision_builder="ssdlite320_mobilenet_v3_large",
)

# SSDLite on MobileNetV2 (MobileNetV2 paper; the small seed project's tiling at 300 px).
SSDLITE300_MOBILENET_V2 = replace(
    SSDLITE320_MOBILENET_V3_LARGE,
    arch="ssdlite300_mobilenet_v2",
    size=(300, 300),
    backbone="mobilenet_v2",
    scales=(60 / 300, 105 / 300, 150 / 300, 195 / 300, 240 / 300, 285 / 300, 330 / 300),
    steps=(16, 32, 64, 100, 150, 300),
    max_trainable_layers=6,
    default_weights=None,  # no published COCO weights: backbone only
    default_backbone_weights="mobilenet_v2.IMAGENET1K_V1",
    torchvision_builder=None,
)

CONFIGS: dict[str, SSDConfig] = {
    c.arch: c
    for c in (SSD300_VGG16, SSD512_VGG16, SSD300_RESNET50, SSDLITE320_MOBILENET_V3_LARGE, SSDLITE300_MOBILENET_V2)
}


def list_models() -> list[str]:
    return list(CONFIGS)


# -- assembly -------------------------------------------------------------------------------------


def _load_state_file(path: str) -> Any:
    """`checkpoint.read_torch_file` of a weights file (a ValueError says how to recover a cached download)."""
    from ssd_core.checkpoint import read_torch_file

    try:
        return read_torch_file(str(path), what="weights file")
    except ValueError as exc:
        raise ValueError(f"{exc}; if it is a cached download, delete it to fetch it again") from None


class _VGGFeatures(nn.Module):
    """torchvision's VGG without its classifier; keys match `vgg16().features`."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features


def _reduced_tail(config: SSDConfig, weights_backbone: str | None) -> bool:
    """Without pretrained weights MobileNetV3 uses the reduced tail (MobileNetV3 paper, table 6), as
    torchvision does; ImageNet weights need the full one."""
    return config.reduced_tail if config.reduced_tail is not None else weights_backbone is None


def _make_backbone(config: SSDConfig, weights_backbone: str | None, trainable_layers: int) -> nn.Module:
    classifier_state = _load_state_file(weights_backbone) if weights_backbone else None

    def with_weights(model: nn.Module) -> nn.Module:
        if classifier_state is not None:
            missing, unexpected = model.load_state_dict(classifier_state, strict=False)
            missing = [k for k in missing if not k.startswith(("classifier", "fc."))]
            if missing:
                raise ValueError(f"backbone weights {weights_backbone} lack keys: {', '.join(missing[:10])}")
        return model

    if config.backbone == "vgg16":
        # Only VGG's convolutional part: its 120M-parameter classifier would be thrown away.
        vgg = with_weights(_VGGFeatures(make_vgg_layers(vgg_cfgs["D"], batch_norm=False)))
        freeze_vgg(vgg.features, trainable_layers)
        return VGGExtractor(vgg.features, config.extra_spec)
    if config.backbone == "resnet50":
        resnet = with_weights(tv_models.resnet50())
        extractor = ResNetExtractor(resnet, config.extra_spec)
        freeze_resnet(extractor.features, trainable_layers)
        return extractor
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    if config.backbone == "mobilenet_v3_large":
        net = tv_models.mobilenet_v3_large(norm_layer=norm_layer, reduced_tail=_reduced_tail(config, weights_backbone))
    elif config.backbone == "mobilenet_v2":
        net = tv_models.mobilenet_v2(norm_layer=norm_layer)
    else:
        raise ValueError(f"unknown backbone {config.backbone!r}")
    net = with_weights(net)
    if weights_backbone is None:
        normal_init(net)
    features = net.features
    freeze_mobilenet(features, trainable_layers)
    return MobileNetExtractor(features, stage_starts(features)[-2], norm_layer)


def assemble(
    config: SSDConfig,
    num_classes: int,
    *,
    weights_backbone: str | None = None,
    trainable_backbone_layers: int | None = None,
    class_names: list[str] | None = None,
    precision: str = "fp32",
    pretrained: bool | None = None,
) -> SSD:
    """Build an untrained SSD from a config (`weights_backbone`: a backbone weights file). `pretrained`
    (default: whether `weights_backbone` is given) says whether weights will be loaded, which sets
    the default number of trainable backbone layers."""
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    if trainable_backbone_layers is None:
        pretrained = weights_backbone is not None if pretrained is None else pretrained
        trainable_backbone_layers = default_trainable_layers(config, pretrained=pretrained)
    backbone = _make_backbone(config, weights_backbone, trainable_backbone_layers)
    boxes = DefaultBoxes(
        config.aspect_ratios, scales=config.scales, min_ratio=config.min_ratio, max_ratio=config.max_ratio,
        steps=config.steps,
    )
    head_norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    head = SSDHead(
        backbone.out_channels, boxes.num_anchors_per_location(), num_classes, kind=config.head, norm_layer=head_norm
    )
    if class_names is None:
        class_names = {91: COCO_91_NAMES, 81: COCO_81_NAMES}.get(num_classes)
    model = SSD(
        backbone, boxes, head,
        size=config.size, num_classes=num_classes, image_mean=config.image_mean, image_std=config.image_std,
        iou_threshold=config.iou_threshold, neg_to_pos_ratio=config.neg_to_pos_ratio,
        postprocess_config=PostProcessConfig(
            score_thresh=config.score_thresh, nms_thresh=config.nms_thresh,
            detections_per_img=config.detections_per_img, topk_candidates=config.topk_candidates,
        ),
        precision=precision, arch=config.arch, class_names=class_names,
    )
    # Choices made from the weights rather than the config, recorded so a checkpoint rebuilds the same shapes
    # (build_model adds the SSDConfig overrides it was given).
    model.build_overrides = (
        {"reduced_tail": _reduced_tail(config, weights_backbone)} if config.backbone == "mobilenet_v3_large" else {}
    )
    return model


def default_trainable_layers(config: SSDConfig, *, pretrained: bool) -> int:
    """torchvision's defaults: a randomly initialised backbone trains entirely; a pretrained VGG or
    ResNet keeps its first stages frozen (4 trainable), MobileNets train all 6."""
    if pretrained and config.backbone in ("vgg16", "resnet50"):
        return 4
    return config.max_trainable_layers


def resolve_config(arch: str, overrides: dict[str, Any]) -> SSDConfig:
    if arch not in CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(CONFIGS)}")
    config = CONFIGS[arch]
    unknown = set(overrides) - MODEL_OPTIONS
    if unknown:
        raise ValueError(f"unknown model options for {arch}: {', '.join(sorted(unknown))}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(config, **overrides)


# -- weights users already have -------------------------------------------------------------------


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def detect_weights_format(payload: Any) -> str:
    """"ssd_core" (our checkpoint), "nvidia" (DeepLearningExamples SSD300) or "torchvision" (state_dict)."""
    if isinstance(payload, dict) and "arch" in payload and "model" in payload:
        return "ssd_core"
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    if isinstance(state, dict) and state:
        keys = list(_strip_prefix(state, "module.").keys())
        if any(k.startswith(("feature_extractor.feature_extractor.", "additional_blocks.")) for k in keys):
            return "nvidia"
        if any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys):
            return "torchvision"
    raise ValueError(
        "unrecognised weights: expected an ssd_core checkpoint, a torchvision SSD state_dict or an NVIDIA SSD300 checkpoint"
    )


def nvidia_to_ssd_core(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an NVIDIA SSD300 state_dict onto ssd300_resnet50's keys, keeping each weight's meaning.

    NVIDIA's heads order output channels as k*boxes + a (value k of box a); ours as a*K + k.
    """
    state = _strip_prefix(state, "module.")
    num_boxes = (4, 6, 6, 6, 4, 4)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("feature_extractor.feature_extractor."):
            out["backbone.features." + key[len("feature_extractor.feature_extractor."):]] = value
        elif key.startswith("additional_blocks."):
            out["backbone.extra." + key[len("additional_blocks."):]] = value
        elif match := re.fullmatch(r"(loc|conf)\.(\d)\.(weight|bias)", key):
            kind, level, param = match.group(1), int(match.group(2)), match.group(3)
            boxes = num_boxes[level]
            values_per_box = value.shape[0] // boxes
            # NVIDIA channel k*boxes + a  ->  ours a*K + k
            perm = torch.arange(value.shape[0]).view(values_per_box, boxes).t().reshape(-1)
            head = "regression_head" if kind == "loc" else "classification_head"
            out[f"head.{head}.module_list.{level}.{param}"] = value[perm]
        else:
            out[key] = value  # reported as unexpected by the strict load
    return out


def _load_strict(model: SSD, state: dict[str, Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys: {', '.join(result.missing_keys[:20])}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys: {', '.join(result.unexpected_keys[:20])}")
    if problems:
        raise ValueError(f"weights {source} do not fit {model.arch}: " + "; ".join(problems))


def _num_classes_in(state: dict[str, Tensor], config: SSDConfig) -> int:
    key = "head.classification_head.module_list.0.weight"
    if key not in state:
        key = "head.classification_head.module_list.0.1.weight"  # separable predictor
    anchors0 = 2 + 2 * len(config.aspect_ratios[0])
    return int(state[key].shape[0]) // anchors0


_CLASSIFICATION_HEAD = "head.classification_head."


def _load_weights(model: SSD, state: dict[str, Tensor], source: str, found: int,
                  found_names: list[str] | None = None) -> None:
    """Load `state` (for `found` classes named `found_names`) into `model`. For other classes (count,
    or names when both are known), everything but the classification head is loaded (strictly) and
    the head keeps its fresh initialisation."""
    same_names = found_names is None or list(found_names) == list(model.class_names)
    if found == model.num_classes and same_names:
        _load_strict(model, state, source)
        return
    kept = {k: v for k, v in state.items() if not k.startswith(_CLASSIFICATION_HEAD)}
    result = model.load_state_dict(kept, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_CLASSIFICATION_HEAD)]
    if missing or result.unexpected_keys:
        _load_strict(model, kept, source)  # raises, naming the keys
    log.info("classification head re-initialised: %d -> %d classes%s", found, model.num_classes,
             "" if found != model.num_classes else " (other class names)")


def _nvidia_class_names(payload: dict[str, Any], num_classes: int) -> list[str] | None:
    """NVIDIA's `label_map` ({0: "background", 1: "person", ...}) as a list, when it fits."""
    label_map = payload.get("label_map")
    if not isinstance(label_map, dict) or len(label_map) != num_classes - (0 not in label_map):
        return None
    names = [str(label_map.get(i, "__background__")) for i in range(num_classes)]
    names[0] = "__background__"
    return names


def build_model(
    arch: str,
    *,
    num_classes: int | None = None,
    weights: Any = None,
    weights_backbone: Any = None,
    precision: str | None = None,
    trainable_backbone_layers: int | None = None,
    class_names: list[str] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> SSD:
    """Build `arch` (see `list_models()`).

    `weights` and `weights_backbone` are weights specs (see ssd_core.weights): a registry name
    ("DEFAULT", "COCO_V1", "IMAGENET1K_V2"...), a torchvision weights enum member, or a local path,
    s3:// URI or http(s):// URL. A weights file is an ssd_core checkpoint, a torchvision SSD
    state_dict of the same architecture or an NVIDIA SSD300 checkpoint; the format is detected.
    `weights_backbone` is ignored when `weights` is given (as in torchvision).

    `num_classes` (background included) defaults to the weights' (91 without weights); a different
    count keeps every weight but the classification head, which is re-initialised (fine-tuning).
    `class_names` default to the weights' categories. `precision` defaults to the checkpoint's (int8 for
    `ssd quantize` output), else fp32. `overrides` edit the variant's SSDConfig
    (e.g. score_thresh=0.05, size=(256, 256))."""
    from ssd_core.weights import is_none, resolve

    if is_none(weights):
        config = resolve_config(arch, overrides)
        backbone_file = None
        if not is_none(weights_backbone):
            backbone_file, _ = resolve(weights_backbone, arch, backbone=True, progress=progress)
        model = assemble(
            config, num_classes or 91, weights_backbone=backbone_file,
            trainable_backbone_layers=trainable_backbone_layers, class_names=class_names,
            precision=precision or "fp32",
        )
        model.build_overrides = {**overrides, **model.build_overrides}
        return model
    if not is_none(weights_backbone):
        log.debug("weights given: weights_backbone %s not used", weights_backbone)
    path, entry = resolve(weights, arch, progress=progress)
    source = entry.full_name if entry is not None else str(path)
    payload = _load_state_file(path)
    kind = detect_weights_format(payload)
    if kind == "ssd_core":
        if payload["arch"] != arch:
            raise ValueError(f"checkpoint {source} is a {payload['arch']} model, not {arch}")
        return model_from_checkpoint(payload, precision=precision, source=source, num_classes=num_classes,
                                     trainable_backbone_layers=trainable_backbone_layers,
                                     class_names=class_names, pretrained=True)
    config = resolve_config(arch, overrides)
    if kind == "nvidia":
        if arch != "ssd300_resnet50":
            raise ValueError(f"{source} is an NVIDIA SSD300-ResNet50 checkpoint; use arch ssd300_resnet50, not {arch}")
        state = nvidia_to_ssd_core(payload.get("model", payload))
        found = _num_classes_in(state, config)
        weights_names = _nvidia_class_names(payload, found)
    else:
        state = _strip_prefix(payload, "module.")
        found = _num_classes_in(state, config)
        weights_names = None
    if weights_names is None and entry is not None and entry.categories and len(entry.categories) == found:
        weights_names = list(entry.categories)
    target = num_classes or found
    if class_names is None and target == found:
        class_names = weights_names
    model = assemble(
        config, target, trainable_backbone_layers=trainable_backbone_layers, class_names=class_names,
        precision="fp32", pretrained=True,
    )
    _load_weights(model, state, source, found, weights_names)
    model.build_overrides = {**overrides, **model.build_overrides}
    return model.set_precision(precision or "fp32")


# -- our checkpoints ------------------------------------------------------------------------------


def checkpoint_payload(model: SSD, config_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild `model` alone (the engine adds optimizer state etc.). A model
    calibrated for int8 (`ssd_core.quantize`) is saved with precision "int8" and its int8 state beside
    the fp32 weights."""
    payload = {
        "arch": model.arch,
        "num_classes": model.num_classes,
        "class_names": list(model.class_names),
        "model_config": {**(config_overrides or {}), **getattr(model, "build_overrides", {})},
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    if model.int8_state is not None:
        from ssd_core.quantize import BACKEND, INT8_FORMAT

        payload["precision"] = "int8"
        payload["int8"] = {"format": INT8_FORMAT, "backend": BACKEND, "torch": str(torch.__version__),
                           "state": dict(model.int8_state)}
    return payload


def _int8_state(payload: dict[str, Any], source: str) -> dict[str, Tensor] | None:
    """The int8 state of an `ssd quantize` checkpoint (None for others)."""
    from ssd_core.quantize import INT8_FORMAT

    int8 = payload.get("int8")
    if int8 is None:
        return None
    if not isinstance(int8, dict) or int8.get("format") != INT8_FORMAT or not isinstance(int8.get("state"), dict):
        found = int8.get("format") if isinstance(int8, dict) else type(int8).__name__
        raise ValueError(f"checkpoint {source}: int8 section of format {found!r}, this version reads "
                         f"{INT8_FORMAT!r}; run `ssd quantize` on its fp32 weights again")
    return int8["state"]


def model_from_checkpoint(
    payload: dict[str, Any], *, precision: str | None = None, source: str = "checkpoint",
    num_classes: int | None = None, trainable_backbone_layers: int | None = None,
    class_names: list[str] | None = None, pretrained: bool = False,
) -> SSD:
    """Rebuild the model of one of our checkpoints; a different `num_classes` re-initialises the
    classification head (fine-tuning), with `class_names` for the new classes. `precision` defaults to
    the checkpoint's ("int8" for `ssd quantize` output, else fp32); an int8 checkpoint keeps its
    calibration unless the classes change."""
    found = int(payload["num_classes"])
    target = num_classes or found
    if class_names is None and target == found:
        class_names = payload.get("class_names")
    config = resolve_config(payload["arch"], payload.get("model_config") or {})
    model = assemble(
        config, target, class_names=class_names, trainable_backbone_layers=trainable_backbone_layers,
        pretrained=pretrained,
    )
    _load_weights(model, payload["model"], source, found, payload.get("class_names"))
    model.build_overrides = {**(payload.get("model_config") or {}), **model.build_overrides}
    int8_state = _int8_state(payload, source)
    if int8_state is not None and target == found and payload.get("class_names") in (None, model.class_names):
        model.int8_state = int8_state  # the calibration fits: same weights, same head
    return model.set_precision(precision or ("int8" if model.int8_state is not None else "fp32"))


def load_model(path: str, *, precision: str | None = None) -> SSD:
    """Rebuild a model (architecture, classes, names, weights) from one of our checkpoints, in
    `precision` (default: the checkpoint's, int8 for `ssd quantize` output, else fp32)."""
    payload = _load_state_file(path)
    if detect_weights_format(payload) != "ssd_core":
        raise ValueError(f"{path} is not an ssd_core checkpoint; use build_model(arch, weights=...) for foreign weights")
    return model_from_checkpoint(payload, precision=precision, source=str(path))


@dataclass(frozen=True)
class ModelMetadata:
    """What a model built from some weights will be, known without building it: enough for a driver to
    plan work, label outputs and preprocess images exactly as ``SSD.preprocess`` does."""

    arch: str
    num_classes: int
    class_names: tuple[str, ...]
    size: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    precision: str = "fp32"  # the checkpoint's: "int8" for `ssd quantize` output


def read_model_metadata(weights: str | None, arch: str | None = None) -> ModelMetadata:
    """Metadata of ``build_model(arch, weights=weights)`` (or ``load_model(weights)`` if ``arch`` is None)
    from the checkpoint's fields, or for foreign weights from the architecture registry and the
    classifier's shape; no network is built. ``weights=None``: the random-init model of ``arch``."""
    precision = "fp32"
    if weights is None:
        if arch is None:
            raise ValueError("give an architecture or weights")
        config, num_classes, class_names = resolve_config(arch, {}), 91, None
    else:
        payload = _load_state_file(weights)
        kind = detect_weights_format(payload)
        if kind == "ssd_core":
            if arch is not None and payload["arch"] != arch:
                raise ValueError(f"checkpoint {weights} is a {payload['arch']} model, not {arch}")
            config = resolve_config(payload["arch"], payload.get("model_config") or {})
            num_classes, class_names = int(payload["num_classes"]), payload.get("class_names")
            precision = payload.get("precision", "fp32")
        elif arch is None:
            raise ValueError(f"{weights} is not an ssd_core checkpoint; give its architecture too")
        else:
            if kind == "nvidia" and arch != "ssd300_resnet50":
                raise ValueError(f"{weights} is an NVIDIA SSD300-ResNet50 checkpoint; use arch ssd300_resnet50, not {arch}")
            state = nvidia_to_ssd_core(payload.get("model", payload)) if kind == "nvidia" else _strip_prefix(payload, "module.")
            config = resolve_config(arch, {})
            num_classes, class_names = _num_classes_in(state, config), None
    if class_names is None:
        class_names = {91: COCO_91_NAMES, 81: COCO_81_NAMES}.get(num_classes) or (
            ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
        )
    # The model keeps mean and std as float32 buffers: the same values here.
    mean, std = (tuple(torch.tensor(v, dtype=torch.float32).tolist()) for v in (config.image_mean, config.image_std))
    return ModelMetadata(config.arch, num_classes, tuple(class_names), tuple(config.size), mean, std, precision)


def config_as_dict(config: SSDConfig) -> dict[str, Any]:
    return asdict(config)


Builder = Callable[..., SSD]


def _builder(arch: str) -> Builder:
    def build(**kwargs: Any) -> SSD:
        return build_model(arch, **kwargs)

    build.__name__ = arch
    build.__doc__ = f"Build {arch}; keyword arguments as for build_model."
    return build


ssd300_vgg16 = _builder("ssd300_vgg16")
ssd512_vgg16 = _builder("ssd512_vgg16")
ssd300_resnet50 = _builder("ssd300_resnet50")
ssdlite320_mobilenet_v3_large = _builder("ssdlite320_mobilenet_v3_large")
ssdlite300_mobilenet_v2 = _builder("ssdlite300_mobilenet_v2")
