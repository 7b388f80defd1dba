"""Pascal VOC and YOLO datasets to the project's COCO layout (`ssd data convert`).

Output: `OUT/annotations/instances_{train,val}.json` and the images copied to `OUT/{train,val}/`.

Box conventions. COCO's `bbox` is [x, y, w, h] in continuous pixel coordinates: the image spans
[0, W] x [0, H], pixel (i, j) (0-based) covers [i, i + 1) x [j, j + 1).
- VOC's `xmin ymin xmax ymax` are 1-based pixel indices, both ends inclusive (the devkit measures a
  box as (xmax - xmin + 1) x (ymax - ymin + 1) pixels). 1-based pixel index p covers [p - 1, p), so
  the box covers [xmin - 1, xmax] x [ymin - 1, ymax]: x = xmin - 1, w = xmax - xmin + 1. This keeps
  every pixel the annotator marked and none besides, and maps back exactly (`coco_box_to_voc`).
- YOLO's `class cx cy w h` are the box centre and size divided by the image width and height:
  x = (cx - w / 2) W, w = w W. A line with more than 4 coordinates is a polygon (x1 y1 x2 y2 ...,
  normalised); its box is the polygon's extent.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")


# -- boxes ------------------------------------------------------------------------------------------


def voc_box_to_coco(xmin: float, ymin: float, xmax: float, ymax: float) -> list[float]:
    """VOC 1-based inclusive pixel indices -> COCO [x, y, w, h] (see the module notes)."""
    return [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]


def coco_box_to_voc(x: float, y: float, w: float, h: float) -> list[float]:
    """The inverse of `voc_box_to_coco`."""
    return [x + 1, y + 1, x + w, y + h]


def yolo_box_to_coco(cx: float, cy: float, w: float, h: float, width: float, height: float) -> list[float]:
    """YOLO normalised centre/size -> COCO [x, y, w, h] in pixels of a `width` x `height` image."""
    return [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]


def coco_box_to_yolo(x: float, y: float, w: float, h: float, width: float, height: float) -> list[float]:
    """The inverse of `yolo_box_to_coco`."""
    return [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]


# -- the output dataset ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One source image: its file, size and annotations (COCO bbox, category name, attributes)."""

    path: Path
    width: int = 0
    height: int = 0
    objects: list[tuple[list[float], str, dict[str, Any]]] = field(default_factory=list)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, EXIF orientation applied as the loader applies it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the image size: {exc}") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def write_coco_dataset(output: str | os.PathLike, splits: dict[str, list[Sample]], class_names: list[str],
                       *, source: str, progress: bool = True) -> dict[str, Any]:
    """Copy the images of each split to OUT/{split}/ and write OUT/annotations/instances_{split}.json.
    Category ids are 1..K in `class_names` order. Returns counts per split."""
    from tqdm.auto import tqdm

    out = Path(output)
    existing = [split for split in splits if (out / "annotations" / f"instances_{split}.json").exists()]
    if existing:
        raise ValueError(f"{out}: already holds a dataset (annotations/instances_{existing[0]}.json); "
                         "choose another --output")
    category_id = {name: index for index, name in enumerate(class_names, start=1)}
    categories = [{"id": category_id[name], "name": name, "supercategory": "none"} for name in class_names]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"output": str(out), "classes": len(class_names)}
    for split, samples in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations, seen = [], [], {}
        for image_id, sample in enumerate(tqdm(samples, desc=f"{split}: copying", unit="img", disable=not progress),
                                          start=1):
            name = sample.path.name
            if name in seen:
                raise ValueError(f"{sample.path} and {seen[name]} would both be {out / split / name}")
            seen[name] = sample.path
            shutil.copyfile(sample.path, out / split / name)
            images.append({"id": image_id, "file_name": name, "width": sample.width, "height": sample.height})
            for bbox, class_name, attributes in sample.objects:
                record = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id[class_name],
                          "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}
                if attributes:
                    record["attributes"] = attributes
                annotations.append(record)
        document = {"info": {"description": f"converted from {source}"}, "images": images,
                    "annotations": annotations, "categories": categories}
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
        summary[split] = {"images": len(images), "boxes": len(annotations)}
    return summary


def split_by_fraction(samples: list[Sample], val_fraction: float, seed: int) -> dict[str, list[Sample]]:
    """A deterministic train/val split (sorted by file name, shuffled with `seed`)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    ordered = sorted(samples, key=lambda sample: str(sample.path))
    random.Random(seed).shuffle(ordered)
    count = max(1, round(len(ordered) * val_fraction)) if len(ordered) > 1 else 0
    return {"train": sorted(ordered[count:], key=lambda s: str(s.path)),
            "val": sorted(ordered[:count], key=lambda s: str(s.path))}


# -- Pascal VOC -------------------------------------------------------------------------------------------


def _voc_root(src: Path) -> Path:
    """The folder holding Annotations/ and JPEGImages/: SRC itself or its only VOC20xx/ child."""
    if (src / "Annotations").is_dir():
        return src
    children = [child for child in sorted(src.iterdir()) if (child / "Annotations").is_dir()] if src.is_dir() else []
    if len(children) == 1:
        return children[0]
    if not children:
        raise FileNotFoundError(f"{src}: no Annotations/ folder (expected a VOC folder such as VOCdevkit/VOC2012)")
    raise ValueError(f"{src}: several VOC folders ({', '.join(c.name for c in children)}); pass one of them")


def _flag(obj: ET.Element, name: str) -> bool | None:
    text = obj.findtext(name)
    return None if text is None else text.strip() not in ("0", "", "false", "False")


def read_voc_annotation(path: Path, images_dir: Path) -> Sample:
    """One VOC XML file. Attributes kept per box: difficult, truncated (and occluded, pose when given)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: invalid XML: {exc}") from None
    filename = (root.findtext("filename") or "").strip() or f"{path.stem}.jpg"
    image_path = images_dir / filename
    if not image_path.exists():
        matches = [p for p in (images_dir / f"{path.stem}{s}" for s in IMAGE_SUFFIXES) if p.exists()]
        if not matches:
            raise FileNotFoundError(f"{path}: image {image_path} not found")
        image_path = matches[0]
    size = root.find("size")
    width = int(float(size.findtext("width") or 0)) if size is not None else 0
    height = int(float(size.findtext("height") or 0)) if size is not None else 0
    if width <= 0 or height <= 0:
        width, height = image_size(image_path)
    sample = Sample(image_path, width, height)
    for number, obj in enumerate(root.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if not name or box is None:
            raise ValueError(f"{path}: object {number} has no name or no bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: object {number} ({name}) has a bndbox without 4 numbers") from None
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"{path}: object {number} ({name}) has xmax < xmin or ymax < ymin")
        attributes: dict[str, Any] = {"difficult": bool(_flag(obj, "difficult")),
                                      "truncated": bool(_flag(obj, "truncated"))}
        occluded = _flag(obj, "occluded")
        if occluded is not None:
            attributes["occluded"] = occluded
        pose = (obj.findtext("pose") or "").strip()
        if pose and pose != "Unspecified":
            attributes["pose"] = pose
        sample.objects.append((voc_box_to_coco(xmin, ymin, xmax, ymax), name, attributes))
    return sample


def convert_voc(src: str | os.PathLike, output: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """A Pascal VOC folder (Annotations/*.xml, JPEGImages/, optionally ImageSets/Main/{train,val}.txt)
    as a COCO-format dataset. Splits: VOC's own train/val lists when present, else `val_fraction` of the
    images (seeded). Classes: the names found, sorted (VOC's 20 classes come out in their usual order)."""
    root = _voc_root(Path(src))
    annotations_dir, images_dir = root / "Annotations", root / "JPEGImages"
    lists = {split: root / "ImageSets" / "Main" / f"{split}.txt" for split in SPLITS}
    if all(path.exists() for path in lists.values()):
        stems = {split: [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
                 for split, path in lists.items()}
        splits = {split: [read_voc_annotation(annotations_dir / f"{stem}.xml", images_dir) for stem in names]
                  for split, names in stems.items()}
    else:
        samples = [read_voc_annotation(path, images_dir) for path in sorted(annotations_dir.glob("*.xml"))]
        if not samples:
            raise FileNotFoundError(f"{annotations_dir}: no .xml annotation files")
        splits = split_by_fraction(samples, val_fraction, seed)
    class_names = sorted({name for samples in splits.values() for sample in samples for _, name, _ in sample.objects})
    return write_coco_dataset(output, splits, class_names, source=f"Pascal VOC {root}", progress=progress)


# -- YOLO -------------------------------------------------------------------------------------------------------


def _yolo_names(src: Path) -> tuple[list[str], dict[str, Any]]:
    """Class names (and the data.yaml document, if any) from SRC/data.yaml's `names` (list or
    {index: name}) or from classes.txt (one name per line) in SRC or SRC/labels."""
    for yaml_path in [src / "data.yaml", src / "dataset.yaml", *sorted(src.glob("*.yaml"))]:
        if yaml_path.exists():
            import yaml

            document = yaml.safe_load(yaml_path.read_text()) or {}
            names = document.get("names")
            if isinstance(names, dict):
                if sorted(int(k) for k in names) != list(range(len(names))):
                    raise ValueError(f"{yaml_path}: names must be numbered 0..{len(names) - 1}, got {sorted(names)}")
                names = [names[k] for k in sorted(names, key=int)]
            if isinstance(names, list) and names:
                return [str(name) for name in names], {**document, "_file": yaml_path}
    for path in (src / "classes.txt", src / "labels" / "classes.txt", src / "obj.names"):
        if path.exists():
            return [line.strip() for line in path.read_text().splitlines() if line.strip()], {}
    raise FileNotFoundError(f"{src}: no class names (expected data.yaml with `names`, or classes.txt)")


def _label_path(image: Path) -> Path:
    """Ultralytics' rule: the last /images/ of the path becomes /labels/, the suffix .txt."""
    parts = list(image.parts)
    if "images" in parts:
        index = len(parts) - 1 - parts[::-1].index("images")
        parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_yolo_sample(image: Path, class_names: list[str]) -> Sample:
    width, height = image_size(image)
    sample = Sample(image, width, height)
    label = _label_path(image)
    if not label.exists():
        return sample  # an image without objects
    for number, line in enumerate(label.read_text().splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        try:
            class_index, coords = int(values[0]), [float(v) for v in values[1:]]
        except ValueError:
            raise ValueError(f"{label}:{number}: expected 'class cx cy w h' numbers, got {line!r}") from None
        if not 0 <= class_index < len(class_names):
            raise ValueError(f"{label}:{number}: class {class_index} is not in the {len(class_names)} class names")
        if len(coords) == 4:
            bbox = yolo_box_to_coco(*coords, width, height)
        elif len(coords) >= 6 and len(coords) % 2 == 0:
            xs, ys = coords[0::2], coords[1::2]
            bbox = [min(xs) * width, min(ys) * height, (max(xs) - min(xs)) * width, (max(ys) - min(ys)) * height]
        else:
            raise ValueError(f"{label}:{number}: expected 4 box values or a polygon, got {len(coords)} values")
        sample.objects.append((bbox, class_names[class_index], {}))
    return sample


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def convert_yolo(src: str | os.PathLike, output: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """A YOLO dataset (label .txt per image beside an images/ folder, Ultralytics' rule) as a COCO-format
    dataset. Splits: data.yaml's `train`/`val` folders, else SRC/images/{train,val}, else every image
    under SRC/images (or SRC) split by `val_fraction` (seeded). Category k + 1 is YOLO class k."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder")
    class_names, document = _yolo_names(src)
    folders: dict[str, Path] = {}
    if document and all(isinstance(document.get(split), str) for split in SPLITS):
        base = Path(document["_file"]).parent
        if document.get("path"):
            base = base / document["path"]
        folders = {split: base / document[split] for split in SPLITS}
    elif all((src / "images" / split).is_dir() for split in SPLITS):
        folders = {split: src / "images" / split for split in SPLITS}
    if folders:
        for split, folder in folders.items():
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: {split} image folder not found")
        splits = {split: [read_yolo_sample(p, class_names) for p in _images_in(folder)] for split, folder in folders.items()}
    else:
        images = _images_in(src / "images" if (src / "images").is_dir() else src)
        if not images:
            raise FileNotFoundError(f"{src}: no images")
        splits = split_by_fraction([read_yolo_sample(p, class_names) for p in images], val_fraction, seed)
    return write_coco_dataset(output, splits, class_names, source=f"YOLO {src}", progress=progress)


CONVERTERS = {"voc": convert_voc, "yolo": convert_yolo}
