"""Datasets (COCO format over fsspec), augmentation presets, loaders and the synthetic shapes dataset.

Contract: `ds[i]` -> (image FloatTensor[3, H, W] in 0..1, {"boxes": FloatTensor[N, 4] xyxy pixels,
"labels": int64 [N] in 1..K, "image_id": int, "orig_size": (H, W)}); label 0 is background.

Names are imported lazily so that e.g. writing the synthetic dataset does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CocoDataset": "ssd_core.data.coco",
    "dataset_statistics": "ssd_core.data.coco",
    "detections_to_coco_results": "ssd_core.data.coco",
    "parse_coco_document": "ssd_core.data.coco",
    "collate": "ssd_core.data.loader",
    "make_loader": "ssd_core.data.loader",
    "measure_loader_throughput": "ssd_core.data.loader",
    "seed_worker": "ssd_core.data.loader",
    "SHAPE_CATEGORIES": "ssd_core.data.synthetic",
    "SynthConfig": "ssd_core.data.synthetic",
    "write_synthetic_dataset": "ssd_core.data.synthetic",
    "PRESETS": "ssd_core.data.transforms",
    "build_preset": "ssd_core.data.transforms",
}
__all__ = [
    "CocoDataset",
    "PRESETS",
    "SHAPE_CATEGORIES",
    "SynthConfig",
    "build_preset",
    "collate",
    "dataset_statistics",
    "detections_to_coco_results",
    "make_loader",
    "measure_loader_throughput",
    "parse_coco_document",
    "seed_worker",
    "write_synthetic_dataset",
]

if TYPE_CHECKING:  # pragma: no cover
    from ssd_core.data.coco import (
        CocoDataset,
        dataset_statistics,
        detections_to_coco_results,
        parse_coco_document,
    )
    from ssd_core.data.loader import collate, make_loader, measure_loader_throughput, seed_worker
    from ssd_core.data.synthetic import SHAPE_CATEGORIES, SynthConfig, write_synthetic_dataset
    from ssd_core.data.transforms import PRESETS, build_preset


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ssd_core.data' has no attribute {name!r}")
