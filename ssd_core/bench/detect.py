"""`ssd bench detect`: end-to-end bulk detection (Ray Data -> Parquet) against (a) the model's own
forward + post-processing alone at the same batch size and (b) a plain single-process loop (PIL decode,
torchvision's model of the same arch, batch 1, one file written per image). All three use the same random
weights. Medians of alternating repetitions; goals: (a) efficiency >= 0.85, (b) speed-up >= 3x.

End to end counts everything `ssd detect` does (listing, Ray start-up of the actors, writing). A second
run over a quarter of the bucket separates the fixed start-up cost from the steady rate:
steady = (N - N/4) / (t(N) - t(N/4)), start-up = t(N/4) - (N/4) / steady.
The quarter-bucket run is reported too: the same pipeline end to end on a small bucket, where the fixed
start-up weighs most. Every timed figure starts on a settled local cluster, as a scheduled job does: the
previous run's actors have exited (SETTLE_S between runs).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EFFICIENCY_GOAL = 0.85
SPEEDUP_GOAL = 3.0
# An exiting actor still uses CPU for up to ~1 s here; without a pause that would land in the next
# figure (the next run's start-up, or the model-only figure after the last run).
SETTLE_S = 3.0


@dataclass(frozen=True)
class DetectBench:
    """What `ssd bench detect` runs (its options, see ssd_core/commands/bench.py)."""

    arch: str = "ssdlite320_mobilenet_v3_large"
    images: int = 4096  # synthetic 640x480 JPEGs in the bucket
    model_images: int = 256  # images the model-only figure runs on
    naive_images: int = 48  # images the naive loop processes per repetition
    batch_size: int = 16
    repeats: int = 3
    score_threshold: float = 0.3
    precision: str = "auto"
    work_dir: Path | None = None  # where the bucket and outputs go (default: a temp dir)


def write_jpeg_bucket(folder: Path, count: int, *, height: int = 480, width: int = 640, seed: int = 0) -> list[Path]:
    """`count` synthetic JPEGs (`ssd_core.bench.speed.synthetic_jpegs`) written to ``folder``."""
    from ssd_core.bench.speed import synthetic_jpegs

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, data in enumerate(synthetic_jpegs(count, height=height, width=width, seed=seed)):
        path = folder / f"img{index:05d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _pipeline_seconds(bucket: Path, output: Path, weights: Path, args: DetectBench) -> tuple[int, float, int]:
    """(images written, seconds, actors) of one `detect_bucket` run into a fresh output, on a settled cluster."""
    from ssd_core.bulk import detect_bucket

    time.sleep(SETTLE_S)
    summary = detect_bucket(
        str(bucket), str(output), arch=args.arch, weights=str(weights), batch_size=args.batch_size,
        score_threshold=args.score_threshold, precision=args.precision, progress=False,
    )
    return summary["ok"] + summary["error"], summary["seconds"], summary["actors"]["max"]


def _read_tasks_images_per_s(paths: list[Path], args: DetectBench) -> float:
    """What one CPU does of the CPU tasks in front of GPU actors: read, decode, resize and normalise
    (`read_and_preprocess` on one thread, in-process), in batches of --batch-size."""
    import pyarrow as pa
    import torch

    from ssd_core.bulk.stages import DetectConfig, PreprocessSpec, read_and_preprocess
    from ssd_core.zoo import read_model_metadata

    config = DetectConfig(output_uri="", run_id="bench", arch=args.arch, weights=None, model_name=args.arch,
                          weights_digest="", class_names=[], preprocess_spec=PreprocessSpec.of(read_model_metadata(None, args.arch)))
    listing = pa.table({"image_uri": [str(p) for p in paths], "size_bytes": [p.stat().st_size for p in paths],
                        "etag": [""] * len(paths), "sniff": [False] * len(paths)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        for start in range(0, len(paths), args.batch_size):
            read_and_preprocess(listing.slice(start, args.batch_size), config=config)
        return len(paths) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def _model_only_images_per_s(model, batches: list, sizes: list) -> float:
    """Forward + post-processing on preprocessed batches (no decode, no resize, no writes)."""
    import torch

    started = time.perf_counter()
    count = 0
    with torch.inference_mode():
        for batch, size in zip(batches, sizes):
            model.detect(batch, size)
            count += len(batch)
    return count / (time.perf_counter() - started)


def _naive_images_per_s(paths: list[Path], output: Path, tv_model) -> float:
    """PIL decode, torchvision model, batch 1, one JSON file per image."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            image = to_tensor(Image.open(path).convert("RGB"))
            result = tv_model([image])[0]
            record = {"image": str(path), **{key: value.tolist() for key, value in result.items()}}
            (output / f"{path.stem}.json").write_text(json.dumps(record))
    return len(paths) / (time.perf_counter() - started)


def _decoded(paths: list[Path]) -> list:
    """The images at ``paths`` as FloatTensor[3, H, W] in 0..1."""
    import torch

    from ssd_core.images import decode_image

    return [torch.from_numpy(decode_image(p.read_bytes())).permute(2, 0, 1).float() / 255 for p in paths]


def _int8_checkpoint(arch: str, weights: Path, paths: list[Path], score_threshold: float, output: Path) -> Path:
    """``weights`` calibrated for int8 on the images at ``paths``, written as an int8 checkpoint to ``output``."""
    import torch

    from ssd_core import build_model
    from ssd_core.checkpoint import write_checkpoint
    from ssd_core.quantize import calibrate
    from ssd_core.zoo import checkpoint_payload

    model = build_model(arch, weights=str(weights), score_thresh=score_threshold).eval()
    with torch.no_grad():
        calibrate(model, [model.preprocess(_decoded(paths))[0]])
    write_checkpoint(str(output), checkpoint_payload(model))
    return output


def bench_detect(args: DetectBench) -> dict[str, Any]:
    """The figures of one `ssd bench detect` run (images/s, medians over `args.repeats`)."""
    import torch

    from ssd_core import build_model
    from ssd_core.allocator import tune_allocator
    from ssd_core.bench.speed import torchvision_pair
    from ssd_core.cluster import init_ray
    from ssd_core.inference import optimize_for_inference

    tune_allocator()  # as the pipeline's actors do: the model-only and naive figures get it too
    with tempfile.TemporaryDirectory(prefix="ssd-bench-detect-") as tmp:
        work = Path(args.work_dir or tmp)
        paths = write_jpeg_bucket(work / "bucket", args.images)
        quarter = work / "bucket-quarter"  # the first N/4 images again, for the start-up/steady split
        quarter.mkdir(parents=True, exist_ok=True)
        for path in paths[: max(1, args.images // 4)]:
            if not (quarter / path.name).exists():
                (quarter / path.name).hardlink_to(path)
        init_ray()  # the local cluster's own start is not part of any figure (actor start-up is)

        # One set of random weights for all three: torchvision's model (He init for SSDLite, so scores are
        # not all 1/91 and post-processing gets a realistic load), saved as the pipeline's --weights.
        tv_model, _ = torchvision_pair(args.arch)
        tv_model.score_thresh = args.score_threshold
        tv_model.eval()
        weights = work / "weights.pt"
        torch.save(tv_model.state_dict(), weights)
        if args.precision == "int8":
            weights = _int8_checkpoint(args.arch, weights, paths[: args.batch_size], args.score_threshold,
                                       work / "weights-int8.pt")
        model = optimize_for_inference(build_model(args.arch, weights=str(weights), precision=args.precision,
                                                   score_thresh=args.score_threshold))
        batches, sizes = [], []
        model_paths = paths[: args.model_images]
        for start in range(0, len(model_paths), args.batch_size):
            chunk = model_paths[start : start + args.batch_size]
            batch, size = model.preprocess(_decoded(chunk))
            batches.append(batch), sizes.append(size)
        # Warm-up, untimed: an int8 network compiles on its first batch. The actors compile again (part of
        # the pipeline's start-up) but reuse the C++ kernel builds this leaves in inductor's cache on the node.
        _model_only_images_per_s(model, batches[:1], sizes[:1])

        figures: dict[str, list[float]] = {"pipeline": [], "pipeline_quarter": [], "steady": [], "startup_s": [],
                                           "model_only": [], "naive": [], "steady_per_actor": [],
                                           "read_decode_resize_per_cpu": []}
        for repeat in range(args.repeats):
            count, seconds, actors = _pipeline_seconds(work / "bucket", work / f"out-{repeat}", weights, args)
            small_count, small_seconds, _ = _pipeline_seconds(quarter, work / f"out-quarter-{repeat}", weights, args)
            # nan when start-up dominates both runs (the full run no slower than the quarter): no split.
            steady = (count - small_count) / (seconds - small_seconds) if seconds > small_seconds else math.nan
            figures["pipeline"].append(count / seconds)
            figures["pipeline_quarter"].append(small_count / small_seconds)
            figures["steady"].append(steady)
            figures["startup_s"].append(small_seconds - small_count / steady)
            figures["steady_per_actor"].append(steady / actors)
            time.sleep(SETTLE_S)  # the last run's actors exit before the model-only figure, too
            figures["model_only"].append(_model_only_images_per_s(model, batches, sizes))
            figures["naive"].append(_naive_images_per_s(paths[: args.naive_images], work / f"naive-{repeat}", tv_model))
            figures["read_decode_resize_per_cpu"].append(_read_tasks_images_per_s(model_paths, args))
    medians = {name: statistics.median(values) for name, values in figures.items()}
    return {
        "arch": args.arch, "images": args.images, "model_images": len(model_paths),
        "naive_images": args.naive_images, "batch_size": args.batch_size,
        "precision": args.precision, "effective_precision": model.effective_precision("cpu"),
        "score_threshold": args.score_threshold, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "quarter_images": small_count,
        "images_per_s": {name: round(medians[name], 3)
                         for name in ("pipeline", "pipeline_quarter", "steady", "model_only", "naive",
                                      "steady_per_actor", "read_decode_resize_per_cpu")},
        "actors": actors,
        "startup_s": round(medians["startup_s"], 2),
        "runs": {name: [round(v, 3) for v in values] for name, values in figures.items()},
        "efficiency_vs_model": round(medians["pipeline"] / medians["model_only"], 3),
        "quarter_efficiency_vs_model": round(medians["pipeline_quarter"] / medians["model_only"], 3),
        "steady_efficiency_vs_model": round(medians["steady"] / medians["model_only"], 3),
        "speedup_vs_naive": round(medians["pipeline"] / medians["naive"], 3),
    }


def format_report(result: dict[str, Any]) -> str:
    """The table `ssd bench detect` prints for `bench_detect`'s result."""
    rate = result["images_per_s"]
    lines = []
    lines.append(f"# bulk detection, {result['arch']}, batch {result['batch_size']}, {result['images']} 640x480 JPEGs, "
                 f"precision {result['effective_precision']}, medians of {result['repeats']}")
    lines.append(f"{'what':<44} {'images/s':>10}")
    lines.append(f"{'ssd detect (Ray Data -> Parquet, end to end)':<44} {rate['pipeline']:>10.2f}   ({result['images']} images)")
    lines.append(f"{'  the same on a quarter of the bucket':<44} {rate['pipeline_quarter']:>10.2f}   "
                 f"({result['quarter_images']} images)")
    if math.isnan(rate["steady"]):
        lines.append(f"{'  steady rate, after start-up':<44} {'n/a':>10}   (start-up dominates both runs: use more --images)")
    else:
        lines.append(f"{'  steady rate, after start-up':<44} {rate['steady']:>10.2f}   (start-up {result['startup_s']:.1f} s)")
    lines.append(f"{'  per actor (steady / ' + str(result['actors']) + ' actors)':<44} {rate['steady_per_actor']:>10.2f}")
    lines.append(f"{'read + decode + resize, one CPU':<44} {rate['read_decode_resize_per_cpu']:>10.2f}   "
                 "(the CPU tasks in front of GPU actors)")
    lines.append(f"{'(a) model forward + post-processing alone':<44} {rate['model_only']:>10.2f}")
    lines.append(f"{'(b) naive loop (PIL, torchvision, batch 1)':<44} {rate['naive']:>10.2f}")
    efficiency, speedup = result["efficiency_vs_model"], result["speedup_vs_naive"]
    lines.append(f"efficiency vs (a): {efficiency:.2f} (goal >= {EFFICIENCY_GOAL}) "
                 f"{'OK' if efficiency >= EFFICIENCY_GOAL else 'BELOW GOAL'}; quarter bucket "
                 f"{result['quarter_efficiency_vs_model']:.2f}; steady {result['steady_efficiency_vs_model']:.2f}")
    lines.append(f"speed-up vs (b):   {speedup:.2f}x (goal >= {SPEEDUP_GOAL}x) {'OK' if speedup >= SPEEDUP_GOAL else 'BELOW GOAL'}")
    return "\n".join(lines)
