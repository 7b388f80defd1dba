"""Loaders: reproducible order and augmentation per seed with worker processes; throughput probe."""

from __future__ import annotations

import pytest
import torch

from ssd_core.data import CocoDataset, build_preset, collate, make_loader, measure_loader_throughput


def _epoch(loader):
    return [
        (torch.stack(images), [t["image_id"] for t in targets], [t["boxes"] for t in targets])
        for images, targets in loader
    ]


def test_two_workers_same_seed_same_batches(synth_dir):
    dataset = CocoDataset(synth_dir, "train", transforms=build_preset("ssd", size=(96, 96)))
    runs = [_epoch(make_loader(dataset, 4, shuffle=True, workers=2, seed=seed)) for seed in (3, 3, 4)]
    first, second, other = runs
    assert len(first) == 6
    for (images_a, ids_a, boxes_a), (images_b, ids_b, boxes_b) in zip(first, second):
        assert ids_a == ids_b
        assert torch.equal(images_a, images_b)
        assert all(torch.equal(a, b) for a, b in zip(boxes_a, boxes_b))
    assert [ids for _, ids, _ in first] != [ids for _, ids, _ in other]
    assert sorted(i for _, ids, _ in first for i in ids) == dataset.image_ids  # each image once per epoch


def test_unshuffled_loader_order_drop_last_and_collate(synth_dir):
    dataset = CocoDataset(synth_dir, "val")
    loader = make_loader(dataset, 3, shuffle=False, workers=0, seed=0, drop_last=True)
    batches = list(loader)
    assert len(batches) == 2
    images, targets = batches[0]
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 3
    assert [t["image_id"] for t in targets] == dataset.image_ids[:3]
    assert collate([]) == ([], [])


def test_measure_loader_throughput_counts_images(synth_dir):
    dataset = CocoDataset(synth_dir, "train", transforms=build_preset("ssdlite", size=(128, 128)))
    loader = make_loader(dataset, 4, shuffle=False, workers=0, seed=0)
    rate = measure_loader_throughput(loader, max_batches=3)
    assert 1.0 < rate < 1e6
    with pytest.raises(ValueError, match="no batches"):
        measure_loader_throughput([([torch.zeros(1)], [{}])], max_batches=3)
