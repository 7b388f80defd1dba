"""Datasets (COCO format over fsspec), augmentation presets, loaders and the synthetic shapes dataset.

Contract: `ds[i]` -> (image FloatTensor[3, H, W] in 0..1, {"boxes": FloatTensor[N, 4] xyxy pixels,
"labels": int64 [N] in 1..K, "image_id": int, "orig_size": (H, W)}); label 0 is background.
"""

from ssd_core.data.coco import CocoDataset, detections_to_coco_results, parse_coco_document
from ssd_core.data.loader import collate, make_loader, measure_loader_throughput, seed_worker
from ssd_core.data.synthetic import SHAPE_CATEGORIES, SynthConfig, write_synthetic_dataset
from ssd_core.data.transforms import PRESETS, build_preset

__all__ = [
    "PRESETS",
    "SHAPE_CATEGORIES",
    "CocoDataset",
    "SynthConfig",
    "build_preset",
    "collate",
    "detections_to_coco_results",
    "make_loader",
    "measure_loader_throughput",
    "parse_coco_document",
    "seed_worker",
    "write_synthetic_dataset",
]
