"""Side-by-side benchmarks against torchvision's implementation of the same architecture.

Every figure is measured in one process, on the same inputs and thread count, with the variants
run in alternating repetitions so that drift in machine load hits them alike; we report medians
and ratios, never a single timing.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssd_core.allocator import tune_allocator
from ssd_core.inference import optimize_for_inference
from ssd_core.postprocess import postprocess
from ssd_core.precision import resolve_precision

# torchvision builders for the architectures it also implements.
TORCHVISION_ARCHS = {
    "ssd300_vgg16": "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large": "ssdlite320_mobilenet_v3_large",
}


def _torchvision_pair(arch: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """torchvision's model with random weights and ours loaded from its state_dict."""
    import torchvision

    from ssd_core.zoo import build_model

    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"torchvision has no {arch}; side-by-side runs for {', '.join(TORCHVISION_ARCHS)}")
    torch.manual_seed(seed)
    reference = getattr(torchvision.models.detection, TORCHVISION_ARCHS[arch])(
        weights=None, weights_backbone=None, num_classes=91
    )
    if arch.startswith("ssdlite"):
        # torchvision's N(0, 0.03) init gives every box the score 1/91 exactly: a degenerate input
        # for post-processing. He init spreads the scores as a trained model's are (both models
        # get the same weights, so the comparison stays like for like).
        with torch.no_grad():
            for module in reference.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, mode="fan_in")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.pt"
        torch.save(reference.state_dict(), path)
        ours = build_model(arch, weights=str(path))
    return reference, ours


def _images(batch_size: int, height: int = 480, width: int = 640, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, height, width, generator=g) for _ in range(batch_size)]


def _targets(batch_size: int, height: int = 480, width: int = 640, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(batch_size):
        xy = torch.rand(4, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = 20 + torch.rand(4, 2, generator=g) * torch.tensor([width * 0.35, height * 0.35])
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 91, (4,), generator=g)})
    return out


def alternate(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, interleaved: v1, v2, ..., v1, v2, ..."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _summarise(times: dict[str, list[float]], images_per_call: int, anchor: str) -> list[dict[str, Any]]:
    base = statistics.median(times[anchor])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({
            "variant": name,
            "median_s": median,
            "images_per_s": images_per_call / median,
            "speedup_vs_" + anchor: base / median,
            "repeats": len(samples),
        })
    return rows


def bench_infer(arch: str, *, batch_size: int = 4, repeats: int = 5, height: int = 480, width: int = 640) -> dict[str, Any]:
    """End-to-end eval forward (resize, network, post-processing) of torchvision fp32, torchvision
    under bf16 autocast + channels_last, ours fp32 and ours with precision="auto"; plus
    post-processing alone on the same head outputs. Both sides run with the malloc settings bulk
    detection uses (`ssd_core.allocator`)."""
    tune_allocator()
    reference, ours = _torchvision_pair(arch)
    reference.eval()
    ours.eval()
    images = _images(batch_size, height, width)
    auto = resolve_precision("auto", "cpu")
    ours_auto = optimize_for_inference(ours, "auto")
    reference_bf16 = _clone_channels_last(reference)

    def tv_fp32():
        with torch.inference_mode():
            reference(images)

    def tv_autocast():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            reference_bf16(images)

    def ours_fp32():
        with torch.inference_mode():
            ours(images)

    def ours_auto_fn():
        with torch.inference_mode():
            ours_auto(images)

    variants = {"torchvision_fp32": tv_fp32, "torchvision_bf16_autocast": tv_autocast,
                "ssd_core_fp32": ours_fp32, f"ssd_core_auto({auto})": ours_auto_fn}
    times = alternate(variants, repeats)
    rows = _summarise(times, batch_size, "torchvision_fp32")
    auto_median = statistics.median(times[f"ssd_core_auto({auto})"])
    result = {
        "arch": arch, "batch_size": batch_size, "image_size": [height, width], "threads": torch.get_num_threads(),
        "rows": rows,
        "ratio_auto_vs_torchvision_fp32": statistics.median(times["torchvision_fp32"]) / auto_median,
        "ratio_auto_vs_torchvision_autocast": statistics.median(times["torchvision_bf16_autocast"]) / auto_median,
    }
    result["postprocess"] = bench_postprocess(reference, ours, images, repeats=max(repeats, 5))
    return result


def bench_postprocess(reference, ours, images, *, repeats: int = 5) -> dict[str, Any]:
    """Post-processing alone (decode, filter, NMS, rescale) on identical head outputs."""
    with torch.inference_mode():
        batch, original = ours.preprocess(images)
        head, anchors = ours.forward_head(batch)
    image_sizes = [tuple(ours.size)] * len(images)
    original_sizes = [tuple(s) for s in original.tolist()]
    tv_anchors = [anchors] * len(images)

    def tv():
        with torch.inference_mode():
            dets = reference.postprocess_detections(head, tv_anchors, image_sizes)
            reference.transform.postprocess(dets, image_sizes, original_sizes)

    def mine():
        with torch.inference_mode():
            postprocess(head["cls_logits"], head["bbox_regression"], anchors, ours.size, original,
                        ours.postprocess_config, ours.box_weights)

    times = alternate({"torchvision": tv, "ssd_core": mine}, repeats)
    return {"rows": _summarise(times, len(images), "torchvision"),
            "ratio": statistics.median(times["torchvision"]) / statistics.median(times["ssd_core"])}


def bench_train(arch: str, *, batch_size: int = 4, repeats: int = 5, height: int = 480, width: int = 640) -> dict[str, Any]:
    """One SGD step (forward, loss, backward, update) of torchvision fp32 and under bf16 autocast (its
    recipe's mixed precision, on its own copy of the weights) vs ours fp32 and auto."""
    import contextlib

    reference, ours = _torchvision_pair(arch)
    reference_bf16 = copy.deepcopy(reference)
    ours_auto = _clone_with_precision(ours, "auto")  # trained: the plain network
    images, targets = _images(batch_size, height, width), _targets(batch_size, height, width)

    def stepper(model, context=contextlib.nullcontext):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

        def step():
            with context():
                losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    auto = resolve_precision("auto", "cpu")
    times = alternate({"torchvision_fp32": stepper(reference),
                       "torchvision_bf16_autocast": stepper(reference_bf16, lambda: torch.autocast("cpu", torch.bfloat16)),
                       "ssd_core_fp32": stepper(ours), f"ssd_core_auto({auto})": stepper(ours_auto)}, repeats)
    auto_median = statistics.median(times[f"ssd_core_auto({auto})"])
    return {"arch": arch, "batch_size": batch_size, "rows": _summarise(times, batch_size, "torchvision_fp32"),
            "ratio_auto_vs_torchvision_fp32": statistics.median(times["torchvision_fp32"]) / auto_median,
            "ratio_auto_vs_torchvision_autocast": statistics.median(times["torchvision_bf16_autocast"]) / auto_median}


def _clone_with_precision(model, precision: str):
    return copy.deepcopy(model).set_precision(precision)


def _clone_channels_last(model):
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def format_rows(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(_fmt(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
