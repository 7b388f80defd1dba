"""COCO-format detection datasets read from a local folder or any fsspec URL (s3://, gs://, ...).

Layouts: the project's `ROOT/annotations/instances_{split}.json` with the images under `ROOT/{split}/`,
COCO 2017's as downloaded (`ROOT/annotations/instances_{split}2017.json`, `ROOT/{split}2017/`), found
automatically, or an explicit annotation file and image folder (each local or remote).
Category ids map to contiguous labels: 0 is background, 1..K follow the sorted category ids.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

BACKGROUND_NAME = "__background__"
MIN_BOX_SIDE = 1.0  # pixels; thinner boxes (after clipping to the image) are dropped as degenerate
_REQUIRED_KEYS = {
    "document": ("images", "annotations", "categories"),
    "image": ("id", "file_name", "width", "height"),
    "annotation": ("id", "image_id", "category_id", "bbox"),
    "category": ("id", "name"),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_records(records: Any, kind: str, source: str) -> None:
    """Raise ValueError naming `source` and the record when a record misses a required key."""
    if not isinstance(records, list):
        raise ValueError(f"{source}: '{kind}s' must be a list, got {type(records).__name__}")
    required = _REQUIRED_KEYS[kind]
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{source}: {kind} #{position} is not an object")
        missing = [key for key in required if key not in record]
        if missing:
            name = f"{kind} id {record['id']}" if "id" in record else f"{kind} #{position}"
            raise ValueError(f"{source}: {name} is missing required key(s) {missing}")


def parse_coco_document(document: Any, source: str) -> dict[str, Any]:
    """Validate a COCO instances document and turn it into training arrays.

    Crowd annotations are left out; boxes are clipped to their image and dropped when thinner than
    one pixel afterwards. Returns a dict with `image_ids` int64 [I], `file_names` list[str],
    `category_ids` (sorted) list[int], `class_names` list[str] (background first), `boxes` float32
    [A, 4] xyxy pixels and `labels` int64 [A] grouped by image, `offsets` int64 [I + 1] (image i owns
    rows offsets[i]:offsets[i+1]), and `counts` of crowd / dropped / clipped annotations.
    """
    if not isinstance(document, dict):
        raise ValueError(f"{source}: expected a JSON object with images/annotations/categories")
    missing = [key for key in _REQUIRED_KEYS["document"] if key not in document]
    if missing:
        raise ValueError(f"{source}: missing required key(s) {missing}")
    images, annotations, categories = document["images"], document["annotations"], document["categories"]
    for records, kind in ((images, "image"), (annotations, "annotation"), (categories, "category")):
        _check_records(records, kind, source)

    categories = sorted(categories, key=lambda category: category["id"])
    category_ids = [int(category["id"]) for category in categories]
    if len(set(category_ids)) != len(category_ids):
        raise ValueError(f"{source}: duplicate category ids in {category_ids}")
    label_of_category = {category_id: label for label, category_id in enumerate(category_ids, start=1)}

    image_ids = [image["id"] for image in images]
    image_index = {image_id: index for index, image_id in enumerate(image_ids)}
    if len(image_index) != len(image_ids):
        raise ValueError(f"{source}: duplicate image ids")
    for image in images:
        if not isinstance(image["id"], int) or isinstance(image["id"], bool):
            raise ValueError(f"{source}: image id {image['id']!r} is not an integer")
        if not (_is_number(image["width"]) and _is_number(image["height"])):
            raise ValueError(f"{source}: image id {image['id']} has a non-numeric width/height")
    image_sizes = np.array([[image["width"], image["height"]] for image in images], dtype=np.float64).reshape(
        -1, 2
    )

    # One pass of checks per annotation: parsing JSON records cannot be vectorised, the maths below is.
    for annotation in annotations:
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise ValueError(
                f"{source}: annotation id {annotation['id']} has bbox {bbox!r}; expected 4 numbers [x, y, w, h]"
            )
        if annotation["category_id"] not in label_of_category:
            raise ValueError(
                f"{source}: annotation id {annotation['id']} has unknown category_id {annotation['category_id']!r}"
            )
        if annotation["image_id"] not in image_index:
            raise ValueError(
                f"{source}: annotation id {annotation['id']} has unknown image_id {annotation['image_id']!r}"
            )

    xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    owner = np.array([image_index[a["image_id"]] for a in annotations], dtype=np.int64)
    labels = np.array([label_of_category[a["category_id"]] for a in annotations], dtype=np.int64)
    is_crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)

    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # [A, 4] xyxy
    upper = np.tile(image_sizes[owner], 2)  # [A, 4]: W, H, W, H
    clipped = np.clip(boxes, 0.0, upper)
    sides = clipped[:, 2:] - clipped[:, :2]
    degenerate = (sides < MIN_BOX_SIDE).any(axis=1) & ~is_crowd
    was_clipped = (clipped != boxes).any(axis=1) & ~degenerate & ~is_crowd
    keep = ~is_crowd & ~degenerate

    order = np.argsort(owner[keep], kind="stable")
    kept_owner = owner[keep][order]
    offsets = np.searchsorted(kept_owner, np.arange(len(images) + 1), side="left")
    return {
        "image_ids": np.array(image_ids, dtype=np.int64),
        "file_names": [str(image["file_name"]) for image in images],
        "category_ids": category_ids,
        "class_names": [BACKGROUND_NAME] + [str(category["name"]) for category in categories],
        "boxes": clipped[keep][order].astype(np.float32),
        "labels": labels[keep][order],
        "offsets": offsets.astype(np.int64),
        "counts": {
            "crowd": int(is_crowd.sum()),
            "dropped": int(degenerate.sum()),
            "clipped": int(was_clipped.sum()),
        },
    }


class UnreadableImageError(ValueError):
    """An image file that is missing or cannot be decoded. One message argument ("path: reason"), so
    that DataLoader can re-raise it from a worker process."""


def split_paths(root: str, split: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """(annotation file, image folder) of `split` under `root`: the project's layout
    (annotations/instances_{split}.json, {split}/) if present, else COCO 2017's as downloaded
    (annotations/instances_{split}2017.json, {split}2017/)."""
    import fsspec

    root = str(root).rstrip("/")
    candidates = [(f"{root}/annotations/instances_{split}.json", f"{root}/{split}")]
    if not split.endswith("2017"):
        candidates.append((f"{root}/annotations/instances_{split}2017.json", f"{root}/{split}2017"))
    fs, _ = fsspec.core.url_to_fs(root, **(storage_options or {}))
    for annotation_file, image_folder in candidates:
        if fs.exists(annotation_file):
            return annotation_file, image_folder
    tried = " nor ".join(annotation_file.removeprefix(root + "/") for annotation_file, _ in candidates)
    raise FileNotFoundError(f"{root}: annotation file not found for split {split!r} (neither {tried})")


class CocoDataset(torch.utils.data.Dataset):
    """A COCO-format split as a map-style dataset.

    `ds[i]` -> (image FloatTensor[3, H, W] in 0..1, target) with target `boxes` FloatTensor[N, 4]
    xyxy pixels, `labels` int64 [N] in 1..K, `image_id` (the COCO id) and `orig_size` (H, W) of the
    decoded file. `transforms(image, target)` sees a uint8 `tv_tensors.Image` and
    `tv_tensors.BoundingBoxes`; whatever it returns is converted back to the plain tensors above.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Callable | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        annotation_file: str | None = None,
        image_folder: str | None = None,
    ) -> None:
        import fsspec

        self.split = split
        self.transforms = transforms
        self.storage_options = dict(storage_options or {})
        if (annotation_file is None) != (image_folder is None):
            raise ValueError(f"split {split!r}: give both annotation_file and image_folder, or neither")
        if annotation_file is None:
            annotation_file, image_folder = split_paths(str(root), split, self.storage_options)
        self.annotation_path = str(annotation_file)
        self.image_folder = str(image_folder).rstrip("/")
        # The image folder's filesystem reads the images; the annotation file may live elsewhere.
        self.root = str(root or self.image_folder).rstrip("/")
        fs, _ = fsspec.core.url_to_fs(self.image_folder, **self.storage_options)
        self._fs, self._fs_pid = fs, os.getpid()

        document = self._read_annotations()
        parsed = parse_coco_document(document, self.annotation_path)
        del document
        self.image_ids: list[int] = parsed["image_ids"].tolist()
        self.class_names: list[str] = parsed["class_names"]
        self.label_to_category_id: list[int] = [0, *parsed["category_ids"]]
        self.category_id_to_label = {
            cid: label for label, cid in enumerate(self.label_to_category_id) if label
        }
        self._file_names: list[str] = parsed["file_names"]
        # One flat tensor per field instead of per-image Python objects: cheap to pickle into workers.
        self._boxes = torch.from_numpy(parsed["boxes"])
        self._labels = torch.from_numpy(parsed["labels"])
        self._offsets = torch.from_numpy(parsed["offsets"])
        self.skipped_counts: dict[str, int] = parsed["counts"]
        if any(self.skipped_counts.values()):
            logger.warning(
                "%s: left out %d crowd and %d degenerate/outside boxes; clipped %d boxes to their image",
                self.annotation_path,
                self.skipped_counts["crowd"],
                self.skipped_counts["dropped"],
                self.skipped_counts["clipped"],
            )
        self._coco = None

    # --- files -------------------------------------------------------------------------------

    @property
    def fs(self):
        """The fsspec filesystem; re-created after a fork so workers never share a parent's session."""
        if self._fs is None or self._fs_pid != os.getpid():
            import fsspec

            self._fs, _ = fsspec.core.url_to_fs(self.image_folder, **self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def _read_annotations(self) -> Any:
        import fsspec

        try:
            with fsspec.open(self.annotation_path, "rb", **self.storage_options) as handle:
                raw = handle.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.annotation_path}: annotation file not found") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.annotation_path}: invalid JSON: {exc}") from None

    def image_path(self, index: int) -> str:
        return f"{self.image_folder}/{self._file_names[index]}"

    def read_image(self, index: int) -> torch.Tensor:
        """uint8 [3, H, W] RGB of image `index` (a view of [H, W, 3] memory, as torchvision's decoders give)
        from ``ssd_core.images.decode_image``; UnreadableImageError when the file is missing, cannot be read or cannot be decoded."""
        from ssd_core.images import decode_image

        path, image_id = self.image_path(index), self.image_ids[index]
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise UnreadableImageError(f"{path}: image file for image id {image_id} not found") from None
        except OSError as exc:
            raise UnreadableImageError(f"{path}: cannot read image id {image_id}: {exc}") from None
        try:
            pixels = decode_image(data)
        except ValueError as exc:
            raise UnreadableImageError(f"{path}: cannot decode image id {image_id}: {exc}") from None
        return torch.from_numpy(pixels).permute(2, 0, 1)

    # --- dataset -----------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """K + 1 (background included)."""
        return len(self.class_names)

    @property
    def coco(self):
        """pycocotools COCO of the ground truth exactly as in the file (crowd boxes included)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = self._read_annotations()
            with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotations(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes FloatTensor[N, 4] xyxy, labels int64 [N]) of image `index` as used for training."""
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._boxes[start:end].clone(), self._labels[start:end].clone()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision import tv_tensors

        image = self.read_image(index)
        height, width = image.shape[-2:]
        boxes, labels = self.annotations(index)
        # The JSON's width/height can disagree with the file (e.g. EXIF rotation): the pixels win.
        boxes = boxes.clamp(min=0).minimum(torch.tensor([width, height, width, height], dtype=boxes.dtype))
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": labels,
            "image_id": self.image_ids[index],
            "orig_size": (int(height), int(width)),
        }
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return _to_plain(image, target)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None  # re-opened lazily in the receiving process
        state["_coco"] = None
        return state

    def __repr__(self) -> str:
        return f"CocoDataset({self.root!r}, split={self.split!r}, images={len(self)}, classes={self.num_classes - 1})"


def _to_plain(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Float 0..1 image and plain-tensor target, whatever the transforms returned."""
    image = image.as_subclass(torch.Tensor)
    if not image.is_floating_point():
        image = image.float().div_(255.0)
    target = dict(target)
    target["boxes"] = target["boxes"].as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4)
    target["labels"] = torch.as_tensor(target["labels"], dtype=torch.int64)
    return image, target


def detections_to_coco_results(
    detections: Sequence[dict[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO results (`image_id`, `category_id`, `bbox` [x, y, w, h], `score`) from model outputs.

    `detections[i]` holds `boxes` [N, 4] xyxy in original pixels, `labels` int64 [N] (contiguous),
    `scores` [N] for image `image_ids[i]`.
    """
    from torchvision.ops import box_convert

    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detections for {len(image_ids)} image ids")
    category_lookup = torch.as_tensor(list(label_to_category_id), dtype=torch.int64)
    results: list[dict[str, Any]] = []
    for detection, image_id in zip(detections, image_ids):
        boxes = box_convert(detection["boxes"].detach().float().cpu(), "xyxy", "xywh").round(decimals=2)
        category_ids = category_lookup[detection["labels"].detach().cpu().long()]
        scores = detection["scores"].detach().float().cpu()
        results.extend(
            {"image_id": int(image_id), "category_id": category_id, "bbox": bbox, "score": score}
            for bbox, category_id, score in zip(boxes.tolist(), category_ids.tolist(), scores.tolist())
        )
    return results


def dataset_statistics(dataset: CocoDataset) -> dict[str, Any]:
    """Counts of images, training boxes per class and per COCO scale (by box area: <32^2, <96^2, larger)."""
    boxes, labels = dataset._boxes, dataset._labels
    box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    per_class = torch.bincount(labels, minlength=dataset.num_classes).tolist()
    boxes_per_image = dataset._offsets.diff()
    return {
        "annotation_file": dataset.annotation_path,
        "images": len(dataset),
        "images_without_boxes": int((boxes_per_image == 0).sum()),
        "boxes": int(labels.numel()),
        "boxes_per_class": dict(zip(dataset.class_names[1:], per_class[1:])),
        "boxes_per_scale": {
            "small": int((box_areas < 32**2).sum()),
            "medium": int(((box_areas >= 32**2) & (box_areas < 96**2)).sum()),
            "large": int((box_areas >= 96**2).sum()),
        },
        "left_out": dict(dataset.skipped_counts),
    }
