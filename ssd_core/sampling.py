"""Reproducible, resumable training batches.

The batches of an epoch are a function of (seed, epoch) alone: `EpochSampler` draws the permutation
from them and hands each index to the dataset together with a per-sample seed that `SeededSamples`
uses for that sample's augmentation. So a resumed run skips the batches already done and sees exactly
the remaining ones, whatever the number of loader workers or ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ssd_core.train_config import TrainConfig

log = logging.getLogger(__name__)

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (independent of batch and worker layout)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (augmentation seed, dataset index) for one epoch of one rank.

    The order is a permutation drawn from (seed, epoch) (identity when not shuffling), padded to a
    multiple of `world_size` and dealt out rank::world_size like DistributedSampler; `set_epoch(epoch,
    start)` also skips the first `start` samples of this rank (resuming mid-epoch).
    """

    def __init__(self, num_samples: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> Tensor:
        """Dataset indices of this rank for the current epoch (before skipping `start`)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        padded = math.ceil(self.num_samples / self.world_size) * self.world_size
        order = torch.cat([order, order[: padded - self.num_samples]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.order()[self.start :].tolist():
            yield sample_seed(self.seed, self.epoch, index), index

    def __len__(self) -> int:
        return max(0, math.ceil(self.num_samples / self.world_size) - self.start)


class SeededSamples(Dataset):
    """`dataset[index]` with torch's RNG seeded per sample (its transforms draw from torch's RNG), so
    augmentation depends on the (seed, index) key only. The caller's RNG state is left untouched.

    An image that is missing or cannot be decoded (`UnreadableImageError`) is replaced by the next
    readable one (index + 1, + 2, ...; the same for every run), so batches stay full and DDP ranks stay
    in step; the replacement's target lists the skipped "path: reason" strings under "skipped_images".
    `strict` raises instead.
    """

    max_replacements = 16

    def __init__(self, dataset: Dataset, *, strict: bool = False) -> None:
        self.dataset = dataset
        self.strict = strict

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        from ssd_core.data.coco import UnreadableImageError

        seed, index = key
        skipped: list[str] = []
        for offset in range(min(self.max_replacements, len(self.dataset))):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    image, target = self.dataset[(index + offset) % len(self.dataset)]
                except UnreadableImageError as exc:
                    if self.strict:
                        raise
                    skipped.append(str(exc))
                    continue
            if skipped:
                target["skipped_images"] = skipped
            return image, target
        raise ValueError(f"{len(skipped)} unreadable images in a row, from dataset index {index}: "
                         f"{'; '.join(skipped[:3])}")


def make_train_loader(
    dataset: Dataset, batch_size: int, *, workers: int, seed: int, rank: int = 0, world_size: int = 1,
    strict: bool = False,
) -> DataLoader:
    """Loader of full batches (drop_last: BatchNorm and step counts need them) over an `EpochSampler`;
    its sampler is `loader.batch_sampler.sampler`."""
    from ssd_core.data.loader import make_loader

    sampler = EpochSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    # Only worker base seeds come from the loader's generator: augmentation is seeded per sample.
    return make_loader(SeededSamples(dataset, strict=strict), batch_size, workers=workers, seed=seed,
                       drop_last=True, sampler=sampler)


def epoch_sampler(loader: DataLoader) -> EpochSampler:
    return loader.batch_sampler.sampler


def steps_in_epoch(loader: DataLoader, config: TrainConfig) -> int:
    full = len(epoch_sampler(loader).order()) // config.batch_size
    return full if config.max_steps_per_epoch is None else min(full, config.max_steps_per_epoch)


def probe_loader(loader: DataLoader, config: TrainConfig) -> float | None:
    """Loader-only images/s over a few batches of an unused epoch (the sampler is reset afterwards)."""
    if not config.loader_probe_batches:
        return None
    from ssd_core.data import measure_loader_throughput

    sampler = epoch_sampler(loader)
    saved = (sampler.epoch, sampler.start)
    sampler.set_epoch(10**6)  # a throw-away epoch: the probe must not touch the run's batches
    batches = min(config.loader_probe_batches, len(loader) - 1)
    try:
        rate = measure_loader_throughput(loader, batches) if batches > 0 else None
    finally:
        sampler.set_epoch(*saved)
    if rate is not None:
        log.info("loader: %.1f images/s with %d worker(s)", rate, config.workers)
    return rate
