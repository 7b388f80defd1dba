"""Test datasets in other layouts than the project's (import: ``from dataset_layouts import as_coco2017``)."""

from __future__ import annotations

import shutil
from pathlib import Path


def as_coco2017(source: Path, target: Path) -> Path:
    """A copy of a project-layout dataset in COCO 2017's downloaded layout."""
    (target / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(source / split, target / f"{split}2017")
        shutil.copy(source / "annotations" / f"instances_{split}.json",
                    target / "annotations" / f"instances_{split}2017.json")
    return target
