"""DataLoader helpers: detection collate, reproducible shuffling and augmentation, throughput probe."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def collate(
    batch: list[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Keep images and targets as lists: detection images differ in size and box counts."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs from the per-worker torch seed DataLoader already derived."""
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    workers: int,
    seed: int,
    drop_last: bool = False,
    prefetch_factor: int = 4,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader whose order and augmentation are a function of (`seed`, `workers`).

    Shuffling draws from a `torch.Generator` seeded with `seed`; DataLoader derives each worker's
    torch seed from the same generator, and `seed_worker` extends it to `random` and NumPy. With
    `workers=0` augmentation runs in this process on its global RNG (seed it with torch.manual_seed).
    A `sampler` (instead of `shuffle`) gives the order; batches of it are `loader.batch_sampler`.
    The generator is the loader's own, so starting an epoch leaves the global RNG untouched.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {
            "persistent_workers": True,
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": seed_worker,
        }
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        **extra,
    )


def measure_loader_throughput(loader: Iterable, max_batches: int, *, warmup_batches: int = 1) -> float:
    """Images per second over up to `max_batches` batches, timed from the arrival of the last warm-up
    batch so that worker start-up is excluded."""
    images = 0
    start = time.perf_counter()
    for batch_index, (batch_images, _targets) in enumerate(loader):
        if batch_index < warmup_batches:
            start = time.perf_counter()
            continue
        images += len(batch_images)
        if batch_index + 1 >= max_batches + warmup_batches:
            break
    if images == 0:
        raise ValueError(f"loader yielded no batches beyond the {warmup_batches} warm-up batch(es)")
    return images / max(time.perf_counter() - start, 1e-9)
