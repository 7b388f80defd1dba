"""Named pretrained weights: the registry (data, in one place) and resolving any weights spec to a file.

A weights spec is one of:
- a registry name, short (``"DEFAULT"``, ``"COCO_V1"``, ``"IMAGENET1K_V2"``: looked up for the
  architecture, or for its backbone with ``backbone=True``) or full (``"ssd300_vgg16.COCO_V1"``,
  ``"resnet50.IMAGENET1K_V2"``, or torchvision's own ``"ResNet50_Weights.IMAGENET1K_V2"``);
- one of torchvision's weights enum members (``SSD300_VGG16_Weights.COCO_V1``);
- a local path, an ``s3://`` URI, or an ``http(s)://`` URL.

Entries reuse torchvision's weights enums (URL, categories, metrics, file size and transforms come
from the enum and its ``meta``). Named weights and URLs are downloaded through ``torch.hub`` into
``$TORCH_HOME/hub/checkpoints`` under the URL's file name, the cache and names torchvision uses, so a
file torchvision already fetched is reused (and, as in torchvision, not re-hashed); a download is
checked against the hash in its file name (torch.hub's convention) or the entry's full SHA-256.

Air-gapped clusters: ``ssd weights download NAME --to DIR|s3://...`` copies files to a mirror; with
``SSD_WEIGHTS_MIRROR=DIR|s3://...`` set, a file missing from the cache is copied (hash-checked) from
the mirror instead of being downloaded. A file from the mirror is also usable directly as a path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torchvision import models as tv_models
from torchvision.models import detection as tv_detection
from torchvision.models._api import WeightsEnum
from torchvision.models._meta import _COCO_CATEGORIES

log = logging.getLogger(__name__)

MIRROR_ENV = "SSD_WEIGHTS_MIRROR"
NONE_SPECS = (None, "", "none", "None", "NONE")

__all__ = [
    "MIRROR_ENV",
    "WeightsEntry",
    "WeightsUnavailable",
    "REGISTRY",
    "list_weights",
    "get_weights",
    "is_none",
    "cache_path",
    "cached_file",
    "download",
    "resolve",
    "weights_file",
    "copy_to",
]


class WeightsUnavailable(FileNotFoundError):
    """A named or URL weights file is not in the cache and could not be fetched (or failed its hash
    check). The message is one line naming the URL and the exact cache path to put the file at."""


@dataclass(frozen=True)
class WeightsEntry:
    """One published weights file. `arch` is an SSD variant (kind "detector") or a backbone
    (kind "backbone", named as in SSDConfig.backbone)."""

    arch: str
    name: str
    kind: str
    url: str
    source: str
    categories: tuple[str, ...] | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"COCO-val2017": {"box_map": 25.1}}
    file_size_mb: float | None = None
    preprocessing: str = ""
    sha256: str | None = None  # full digest when published; else the file name's prefix is checked
    enum: WeightsEnum | None = None  # torchvision's member, when the file is torchvision's
    notes: str = ""

    @property
    def full_name(self) -> str:
        return f"{self.arch}.{self.name}"

    @property
    def file_name(self) -> str:
        return os.path.basename(urlparse(self.url).path)

    @property
    def hash_prefix(self) -> str | None:
        """What torch.hub checks a download against: the full SHA-256, else the hex after the last
        '-' of the file name (``ssd300_vgg16_coco-b556d3b4.pth`` -> ``b556d3b4``)."""
        if self.sha256:
            return self.sha256
        return _hash_prefix_of(self.file_name)

    @property
    def coco_ap(self) -> float | None:
        """Published COCO val2017 box AP (0-100), if any."""
        return (self.metrics.get("COCO-val2017") or {}).get("box_map")

    @property
    def transforms(self) -> Any:
        """torchvision's preset for these weights (None for non-torchvision files)."""
        return self.enum.transforms if self.enum is not None else None


def _hash_prefix_of(file_name: str) -> str | None:
    match = torch.hub.HASH_REGEX.search(file_name)
    return match.group(1) if match and match.group(1) else None


_DETECTION_PREPROCESSING = "RGB in 0..1; the model resizes to {size} and normalises"
_CLASSIFIER_PREPROCESSING = "ImageNet classifier weights; the SSD's own transform normalises its input"


def _from_torchvision(arch: str, member: WeightsEnum, kind: str, preprocessing: str) -> WeightsEntry:
    meta = member.meta
    categories = meta.get("categories")
    metrics = {k: v for k, v in (meta.get("_metrics") or {}).items() if k.startswith("COCO")}
    return WeightsEntry(
        arch=arch, name=member.name, kind=kind, url=member.url, source="torchvision",
        categories=tuple(categories) if categories and kind == "detector" else None,
        metrics=metrics, file_size_mb=meta.get("_file_size"), preprocessing=preprocessing, enum=member,
    )


# NVIDIA DeepLearningExamples SSD300 v1.1 (ResNet-50): the file its torch hub entry `nvidia_ssd`
# downloads. A plain torch.save of {"model", "label_map", "epoch", "iteration", "optimizer",
# "scheduler"}; label 0 is background, 1-80 the COCO categories in id order.
NVIDIA_SSD300_COCO = WeightsEntry(
    arch="ssd300_resnet50", name="COCO_V1", kind="detector",
    url="https://api.ngc.nvidia.com/v2/models/nvidia/ssd_pyt_ckpt_amp/versions/20.06.0/files/nvidia_ssdpyt_amp_200703.pt",
    source="NVIDIA DeepLearningExamples",
    categories=("__background__", *(n for n in _COCO_CATEGORIES[1:] if n != "N/A")),
    metrics={"COCO-val2017": {"box_map": 26.7}},
    preprocessing="RGB in 0..1; the model resizes to 300x300 and normalises with ImageNet mean/std",
    notes="AP from DeepLearningExamples' README (8xA100 AMP training run); no published file hash",
)

REGISTRY: tuple[WeightsEntry, ...] = (
    _from_torchvision("ssd300_vgg16", tv_detection.SSD300_VGG16_Weights.COCO_V1, "detector",
                      _DETECTION_PREPROCESSING.format(size="300x300")),
    _from_torchvision("ssdlite320_mobilenet_v3_large", tv_detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1,
                      "detector", _DETECTION_PREPROCESSING.format(size="320x320")),
    NVIDIA_SSD300_COCO,
    # VGG16 with the original SSD's Caffe weights (0..255 input minus the mean): what SSD300 trains from.
    _from_torchvision("vgg16", tv_models.VGG16_Weights.IMAGENET1K_FEATURES, "backbone",
                      "Caffe-style: RGB 0..255 minus the ImageNet mean (the SSD's transform does this)"),
    _from_torchvision("resnet50", tv_models.ResNet50_Weights.IMAGENET1K_V1, "backbone", _CLASSIFIER_PREPROCESSING),
    _from_torchvision("resnet50", tv_models.ResNet50_Weights.IMAGENET1K_V2, "backbone", _CLASSIFIER_PREPROCESSING),
    _from_torchvision("mobilenet_v3_large", tv_models.MobileNet_V3_Large_Weights.IMAGENET1K_V1, "backbone",
                      _CLASSIFIER_PREPROCESSING),
    _from_torchvision("mobilenet_v3_large", tv_models.MobileNet_V3_Large_Weights.IMAGENET1K_V2, "backbone",
                      _CLASSIFIER_PREPROCESSING),
    _from_torchvision("mobilenet_v2", tv_models.MobileNet_V2_Weights.IMAGENET1K_V1, "backbone",
                      _CLASSIFIER_PREPROCESSING),
    _from_torchvision("mobilenet_v2", tv_models.MobileNet_V2_Weights.IMAGENET1K_V2, "backbone",
                      _CLASSIFIER_PREPROCESSING),
)

_BY_NAME = {entry.full_name: entry for entry in REGISTRY}


def list_weights(arch: str | None = None) -> list[WeightsEntry]:
    """Registry entries, all or those of one architecture (its detector weights and its backbone's)."""
    if arch is None:
        return list(REGISTRY)
    backbone = _config_of(arch).backbone
    return [e for e in REGISTRY if e.arch in (arch, backbone)]


def is_none(spec: Any) -> bool:
    """True for "no weights" (None, "", "none")."""
    return spec is None or (isinstance(spec, str) and spec.strip() in NONE_SPECS)


def _config_of(arch: str) -> Any:
    """The architecture's `SSDConfig`: its backbone and what "DEFAULT" means for it live there."""
    from ssd_core.zoo import CONFIGS

    if arch not in CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[arch]


def _is_location(spec: str) -> bool:
    return "://" in spec or "/" in spec or os.sep in spec or spec.endswith((".pt", ".pth", ".tar", ".ckpt"))


def get_weights(spec: Any, arch: str | None = None, *, backbone: bool = False) -> WeightsEntry | None:
    """The registry entry `spec` names (for `arch`, or for its backbone with `backbone=True`), or None
    when `spec` is a path or URL. Raises ValueError naming the choices for an unknown name."""
    if is_none(spec):
        return None
    if isinstance(spec, WeightsEntry):
        return spec
    if isinstance(spec, WeightsEnum):
        for entry in REGISTRY:
            if entry.url == spec.url:
                return _checked(entry, arch, backbone, str(spec))
        raise ValueError(f"{spec} is not a registered weights file; registered: {', '.join(_BY_NAME)}")
    spec = str(spec).strip()
    if _is_location(spec):
        return None
    if "_Weights." in spec:  # torchvision's own spelling, e.g. ResNet50_Weights.IMAGENET1K_V2
        try:
            member = tv_models.get_weight(spec)
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f"unknown torchvision weights {spec!r}") from None
        return get_weights(member, arch, backbone=backbone)
    if spec in _BY_NAME:
        return _checked(_BY_NAME[spec], arch, backbone, spec)
    if arch is None:
        raise ValueError(f"weights {spec!r}: give the architecture, or a full name ({', '.join(_BY_NAME)})")
    config = _config_of(arch)
    owner = config.backbone if backbone else arch
    if spec.upper() == "DEFAULT":
        full = config.default_backbone_weights if backbone else config.default_weights
        if full is None:
            raise ValueError(
                f"{arch} has no published COCO weights (backbone only): train it with "
                f"--weights-backbone DEFAULT ({config.default_backbone_weights}), or give a checkpoint path"
            )
        return _BY_NAME[full]
    full = f"{owner}.{spec}"
    if full in _BY_NAME:
        return _BY_NAME[full]
    choices = ["DEFAULT", *(e.name for e in REGISTRY if e.arch == owner)]
    what = f"{arch}'s backbone ({owner})" if backbone else arch
    raise ValueError(f"unknown weights {spec!r} for {what}; choose one of {', '.join(choices)}, or a path/URL")


def _checked(entry: WeightsEntry, arch: str | None, backbone: bool, shown: str) -> WeightsEntry:
    if arch is not None:
        owner = _config_of(arch).backbone if backbone else arch
        if entry.arch != owner:
            what = f"{arch}'s backbone ({owner})" if backbone else arch
            raise ValueError(f"weights {shown} are for {entry.arch}, not {what}")
    return entry


# -- files ------------------------------------------------------------------------------------------


def _checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache: $TORCH_HOME/hub/checkpoints (torchvision's too)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(entry_or_url: WeightsEntry | str) -> Path:
    """Where the file lives in the cache (whether or not it is there yet)."""
    url = entry_or_url.url if isinstance(entry_or_url, WeightsEntry) else entry_or_url
    return _checkpoint_dir() / os.path.basename(urlparse(url).path)


def cached_file(entry: WeightsEntry) -> Path | None:
    path = cache_path(entry)
    return path if path.is_file() else None


def _mirror_uri(file_name: str) -> str | None:
    from ssd_core.storage import exists, join_uri

    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return None
    uri = join_uri(mirror, file_name)
    try:
        return uri if exists(uri) else None
    except Exception as exc:  # an unreachable mirror must not stop a download that would work
        log.warning("weights mirror %s unreadable (%s); downloading instead", mirror, exc)
        return None


def _check_digest(digest: str, expected: str | None, what: str) -> None:
    if expected and not digest.startswith(expected):
        raise WeightsUnavailable(
            f"{what} failed its hash check (expected sha256 {expected}..., got {digest[:len(expected)]}...): "
            "the file is corrupted or not the published one"
        )


def _copy_from_mirror(uri: str, dest: Path, expected: str | None) -> None:
    """Stream `uri` (local or s3://) into `dest`, hash-checked, via a temp file and a rename."""
    from ssd_core.storage import open_uri

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        sha = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open_uri(uri, "rb") as src:
            while chunk := src.read(1 << 20):
                sha.update(chunk)
                out.write(chunk)
        _check_digest(sha.hexdigest(), expected, uri)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fetch(url: str, expected: str | None, *, progress: bool) -> Path:
    """The cached file for `url`: from the cache, else the mirror, else downloaded by torch.hub."""
    dest = cache_path(url)
    if dest.is_file():
        return dest
    mirrored = _mirror_uri(dest.name)
    if mirrored is not None:
        log.info("copying %s from the mirror %s to %s", dest.name, mirrored, dest)
        _copy_from_mirror(mirrored, dest, expected)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    try:
        # torch.hub writes a temp file next to dest and renames it only after the hash check passes.
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=expected, progress=progress)
    except RuntimeError as exc:
        if "invalid hash value" in str(exc):
            raise WeightsUnavailable(
                f"download of {url} failed its hash check ({exc}): the file is corrupted or not the published "
                f"one; nothing was written to {dest}"
            ) from None
        raise WeightsUnavailable(_offline_message(url, dest, exc)) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise WeightsUnavailable(_offline_message(url, dest, exc)) from None
    return dest


def _offline_message(url: str, dest: Path, exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return (f"could not download {url} ({str(reason).splitlines()[0] if str(reason) else type(exc).__name__}); "
            f"without network, put that file at {dest} (or in ${MIRROR_ENV})")


def download(entry: WeightsEntry | str, *, progress: bool = True) -> Path:
    """The local cached file of a registry entry (or full name), fetched if missing."""
    if not isinstance(entry, WeightsEntry):
        found = get_weights(entry)
        if found is None:
            raise ValueError(f"{entry!r} is not a registry name; choose one of {', '.join(_BY_NAME)}")
        entry = found
    return _fetch(entry.url, entry.hash_prefix, progress=progress)


def resolve(spec: Any, arch: str | None = None, *, backbone: bool = False,
            progress: bool = True) -> tuple[str, WeightsEntry | None]:
    """(file, registry entry or None) for any weights spec: a local path (checked to exist), an
    s3:// URI (returned as is) or the cached file of a registry name, enum or http(s) URL."""
    if is_none(spec):
        raise ValueError("no weights given")
    entry = get_weights(spec, arch, backbone=backbone)
    if entry is not None:
        return str(download(entry, progress=progress)), entry
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec).strip()
    scheme = urlparse(text).scheme
    if scheme in ("http", "https"):
        return str(_fetch(text, _hash_prefix_of(os.path.basename(urlparse(text).path)), progress=progress)), None
    if scheme in ("", "file"):
        path = text.removeprefix("file://")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        return path, None
    return text, None  # s3:// and other fsspec URIs: read where they are


def weights_file(spec: Any, arch: str | None = None, *, backbone: bool = False, progress: bool = True) -> str:
    """A local path or s3:// URI holding the weights `spec` names (name, enum, path or URL), fetching a
    named or URL file into the cache first. Short names ("DEFAULT", "COCO_V1") need `arch`."""
    return resolve(spec, arch, backbone=backbone, progress=progress)[0]


def copy_to(entry: WeightsEntry, destination: str, *, progress: bool = True) -> str:
    """Fetch `entry` and copy it to `destination` (a folder or s3:// prefix) under its file name, the
    layout SSD_WEIGHTS_MIRROR expects; returns the written URI."""
    from ssd_core.storage import is_s3, join_uri, open_uri

    source = download(entry, progress=progress)
    target = join_uri(destination, entry.file_name)
    if is_s3(target):
        with open(source, "rb") as src, open_uri(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        if Path(target).resolve() != source.resolve():
            tmp = f"{target}.partial"
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
    return target

