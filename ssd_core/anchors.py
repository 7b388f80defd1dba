"""Default boxes (the SSD paper's section 2.2, with the official implementation's tiling)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ssd_core.boxes import cxcywh_to_xyxy


class DefaultBoxes:
    """Per feature map k: boxes of scale s_k and sqrt(s_k * s_k+1) at aspect 1, and s_k at each
    aspect ratio r and 1/r, centred on every cell. Ordered by cell (row, column), then box type, the
    layout the heads produce (and torchvision's DefaultBoxGenerator uses).

    `scales` has one more entry than there are feature maps; when omitted it spreads linearly from
    `min_ratio` to `max_ratio` with 1.0 appended (the paper's formula). `steps` (pixels per cell) sets
    the centres; without it the cells divide the image evenly.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[Sequence[float]],
        *,
        scales: Sequence[float] | None = None,
        min_ratio: float = 0.15,
        max_ratio: float = 0.9,
        steps: Sequence[int] | None = None,
        clip: bool = True,
    ) -> None:
        num_maps = len(aspect_ratios)
        if scales is None:
            spread = max_ratio - min_ratio
            scales = [min_ratio + spread * k / (num_maps - 1.0) for k in range(num_maps)] + [1.0]
        if len(scales) != num_maps + 1:
            raise ValueError(f"scales needs {num_maps + 1} entries for {num_maps} feature maps, got {len(scales)}")
        if steps is not None and len(steps) != num_maps:
            raise ValueError(f"steps needs {num_maps} entries, got {len(steps)}")
        self.aspect_ratios = [list(r) for r in aspect_ratios]
        self.scales = list(scales)
        self.steps = list(steps) if steps is not None else None
        self.clip = clip
        self._cache: dict[tuple, Tensor] = {}

    def num_anchors_per_location(self) -> list[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def _wh_pairs(self, k: int) -> Tensor:
        s_k, s_next = self.scales[k], self.scales[k + 1]
        pairs = [[s_k, s_k], [math.sqrt(s_k * s_next)] * 2]
        for ratio in self.aspect_ratios[k]:
            w, h = s_k * math.sqrt(ratio), s_k / math.sqrt(ratio)
            pairs += [[w, h], [h, w]]
        wh = torch.as_tensor(pairs, dtype=torch.float32)  # [P, 2]
        return wh.clamp(min=0, max=1) if self.clip else wh

    def cxcywh(self, grid_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> Tensor:
        """Default boxes as (cx, cy, w, h) relative to the image: FloatTensor[A, 4]."""
        boxes = []
        for k, (rows, cols) in enumerate(grid_sizes):
            if self.steps is not None:
                cells_x, cells_y = image_size[1] / self.steps[k], image_size[0] / self.steps[k]
            else:
                cells_y, cells_x = rows, cols
            centre_x = ((torch.arange(cols) + 0.5) / cells_x).to(torch.float32)
            centre_y = ((torch.arange(rows) + 0.5) / cells_y).to(torch.float32)
            cy, cx = torch.meshgrid(centre_y, centre_x, indexing="ij")
            wh = self._wh_pairs(k)  # [P, 2]
            centres = torch.stack((cx.reshape(-1), cy.reshape(-1)), dim=-1)  # [R*C, 2]
            centres = centres[:, None, :].expand(-1, len(wh), 2)  # [R*C, P, 2]
            sizes = wh[None].expand(rows * cols, -1, 2)  # [R*C, P, 2]
            boxes.append(torch.cat((centres, sizes), dim=-1).reshape(-1, 4))
        return torch.cat(boxes, dim=0)

    def xyxy(
        self, grid_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int], device: torch.device | str = "cpu"
    ) -> Tensor:
        """Default boxes as xyxy in pixels of the (resized) input image: FloatTensor[A, 4]. Cached."""
        key = (tuple(map(tuple, grid_sizes)), tuple(image_size), str(device))
        cached = self._cache.get(key)
        if cached is None:
            scale = torch.tensor([image_size[1], image_size[0]], dtype=torch.float32)
            rel = self.cxcywh(grid_sizes, image_size)
            cached = torch.cat(
                ((rel[:, :2] - 0.5 * rel[:, 2:]) * scale, (rel[:, :2] + 0.5 * rel[:, 2:]) * scale), dim=-1
            ).to(device)
            self._cache[key] = cached
        return cached

    def relative_xyxy(self, grid_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> Tensor:
        """Default boxes as xyxy in 0..1 image coordinates: FloatTensor[A, 4]."""
        return cxcywh_to_xyxy(self.cxcywh(grid_sizes, image_size))
