"""Fixtures for the data tests: a small synthetic dataset and a writer for hand-made COCO datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ssd_core.data import write_synthetic_dataset


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """24 train / 8 val synthetic images, written once per session."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), 24, 8, seed=0, progress=False)


def write_coco(
    root: Path,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    split: str = "train",
    write_files: bool = True,
) -> Path:
    """Write ROOT/annotations/instances_SPLIT.json and a flat grey PNG for each image record."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    document = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    if write_files:
        for image in images:
            pixels = np.full((image["height"], image["width"], 3), 128, dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / image["file_name"])
    return root


@pytest.fixture
def coco_writer():
    return write_coco


@pytest.fixture(autouse=True)
def single_torch_thread():
    """The data tests work on tiny tensors: one intra-op thread avoids OpenMP spin-waiting against
    other processes on a busy machine (which made them 50x slower), restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
