"""A GPU node measured with one command, before anything is deployed to it: ``make gpu-check``, i.e.
``python -m ssd_core.gpucheck``.

It needs only what a stock CUDA PyTorch image has (torch, torchvision, numpy, pillow, pyarrow, tqdm) and
this package on PYTHONPATH: no Ray, Prefect, DuckDB, pycocotools or fsspec, no pip install, no network
(random weights, synthetic images). One table on stdout, the same figures in one JSON file:

- inference images/s of each ``--archs`` model (`ssd_core.bench.speed.bench_infer`): torchvision fp32 and under
  bf16/fp16 autocast + channels_last, beside ours in fp32, in "auto" precision (bf16/fp16 weights in
  channels_last) and that with its network compiled (torch.compile);
- one training step's images/s (`ssd_core.bench.speed.bench_train`), side by side the same way;
- the bulk actor's work on one batch without Ray (`ssd_core.bulk.stages.Detector.detect`): JPEG bytes ->
  ``torchvision.io.decode_jpeg`` on the device -> resize + normalise -> network -> post-processing -> the
  results table, beside the network alone on the same batch.

Without a CUDA device it prints the one line "no CUDA device" and exits 1. ``--device cpu`` runs it all on
the CPU instead: a dry run that shows the check works on a machine (its figures say nothing of a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

NO_CUDA = "no CUDA device"

# Per A100-class GPU. NVIDIA's PyTorch SSD300 (ResNet-50) runs its network alone at 1,058 images/s
# (batch 64, AMP) and trains at 724 images/s.
BULK_GOAL = 1000.0
TRAIN_GOAL = 724.0
NVIDIA_MODEL_ONLY = 1058.0

# The sizes a GPU is measured at, and those of the CPU dry run (``--device cpu``: seconds, not minutes);
# each can be set on the command line.
GPU_DEFAULTS = {"archs": "ssd300_vgg16,ssdlite320_mobilenet_v3_large", "batch_size": 64, "train_arch": "ssd300_vgg16",
                "train_batch_size": 64, "bulk_arch": "ssd300_vgg16", "repeats": 10, "warmup": 3}
DRY_RUN_DEFAULTS = {"archs": "ssdlite320_mobilenet_v3_large", "batch_size": 2, "train_arch": "ssdlite320_mobilenet_v3_large",
                    "train_batch_size": 2, "bulk_arch": "ssdlite320_mobilenet_v3_large", "repeats": 1, "warmup": 0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ssd_core.gpucheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run (default: cuda)")

    def sized(name: str, text: str, kind: type = str) -> None:
        key = name.removeprefix("--").replace("-", "_")
        parser.add_argument(name, type=kind, help=f"{text} (default {GPU_DEFAULTS[key]}; dry run {DRY_RUN_DEFAULTS[key]})")

    sized("--archs", "inference models, comma-separated")
    sized("--batch-size", "inference and bulk batch", int)
    sized("--train-arch", "the model of the training step")
    sized("--train-batch-size", "training batch", int)
    sized("--bulk-arch", "the bulk actor's model")
    sized("--repeats", "timed calls per variant; medians are reported", int)
    sized("--warmup", "untimed calls per variant first (compiling, autotuning)", int)
    parser.add_argument("--height", type=int, default=480, help="input images' height (the models resize them)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="also time the torch.compile'd network (auto: on a GPU only)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="the bulk actor's precision (as `ssd detect --precision`)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="the bulk actor's (as `ssd detect`)")
    parser.add_argument("--json", type=Path, default=Path("gpu-check.json"), help="where the figures go")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, least in (("batch_size", 1), ("train_batch_size", 2), ("repeats", 1), ("warmup", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:  # BatchNorm trains on 2 or more
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    import torch

    with warnings.catch_warnings():  # an old driver's warning is not the one line this prints
        warnings.simplefilter("ignore")
        cuda = torch.cuda.is_available()
    if args.device.startswith("cuda") and not cuda:
        print(NO_CUDA, file=sys.stderr)
        return 1
    from ssd_core.precision import resolve_device

    device = resolve_device(args.device)
    for name, value in (GPU_DEFAULTS if device.type == "cuda" else DRY_RUN_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    from ssd_core.bench.speed import TORCHVISION_ARCHS
    from ssd_core.zoo import list_models

    for arch in [*args.archs.split(","), args.train_arch]:  # side by side with torchvision's own
        if arch.strip() not in TORCHVISION_ARCHS:
            parser.error(f"--archs/--train-arch: {arch!r} is none of torchvision's {', '.join(TORCHVISION_ARCHS)}")
    if args.bulk_arch not in list_models():
        parser.error(f"--bulk-arch: {args.bulk_arch!r} is none of {', '.join(list_models())}")
    report = run_checks(args, device)
    print(format_report(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"figures written to {args.json}")
    return 2 if report["errors"] else 0


def run_checks(args: argparse.Namespace, device) -> dict[str, Any]:
    """Every measurement, in one process; one failing (out of memory, say) is reported, not fatal."""
    import torch

    from ssd_core.bench.speed import bench_infer, bench_train

    started = time.perf_counter()
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)  # cuda:N; plain "cuda" is the current device already
        torch.backends.cudnn.benchmark = True  # fixed shapes: the autotuned kernels, found in the warm-up
    compile_network = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    shape = dict(height=args.height, width=args.width, repeats=args.repeats, warmup=args.warmup, device=device)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    notes: list[str] = []

    def measure(section: str, arch: str, batch_size: int, function) -> dict[str, Any] | None:
        _progress(started, f"{section} {arch} batch {batch_size}")
        try:
            result = function()
        except (RuntimeError, ValueError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            errors.append({"section": section, "arch": arch, "error": _first_line(exc)})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        for row in result["rows"]:
            rows.append({"section": section, "arch": arch, "batch_size": batch_size, **_row(row)})
        return result

    def infer(arch: str) -> dict[str, Any]:
        try:
            return bench_infer(arch, batch_size=args.batch_size, compile=compile_network, postprocess=False, **shape)
        except (RuntimeError, ValueError) as exc:
            if not compile_network:
                raise
            # torch.compile failing here (an image without a C compiler for Triton, say) loses only its row:
            # where it cannot run, it does not help.
            notes.append(f"inference {arch}: without torch.compile, which failed: {_first_line(exc)}")
            return bench_infer(arch, batch_size=args.batch_size, compile=False, postprocess=False, **shape)

    for arch in [a.strip() for a in args.archs.split(",")]:
        measure("inference", arch, args.batch_size, lambda arch=arch: infer(arch))
    measure("training", args.train_arch, args.train_batch_size, lambda: bench_train(
        args.train_arch, batch_size=args.train_batch_size, **shape))
    bulk = measure("bulk", args.bulk_arch, args.batch_size, lambda: bench_bulk(
        args.bulk_arch, batch_size=args.batch_size, precision=args.precision,
        score_threshold=args.score_threshold, **shape))
    return {
        "device": describe_device(device),
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        | {"compile": compile_network},
        "rows": rows,
        "bulk": {key: value for key, value in (bulk or {}).items() if key != "rows"},
        "goals": _goals(device, rows, args),
        "errors": errors,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }


def bench_bulk(arch: str, *, batch_size: int, repeats: int, warmup: int, height: int, width: int, device,
               precision: str = "auto", score_threshold: float = 0.3) -> dict[str, Any]:
    """The bulk actor's work on one batch of ``batch_size`` synthetic JPEGs, as on a GPU node
    (``decode_in_actor``), without Ray: `Detector.detect` (bytes -> the results table) beside its parts on
    the same batch: decode + resize (`Detector.decode_on_device`), the network alone and the network with
    post-processing. Random weights (seeded, as the actors build them)."""
    import numpy as np
    import torch

    from ssd_core.bench.speed import alternate, summarise, synchronizer, synthetic_jpegs
    from ssd_core.bulk.stages import DetectConfig, Detector, PreprocessSpec, preprocess_contents
    from ssd_core.zoo import read_model_metadata

    config = DetectConfig(
        output_uri="", run_id="gpu-check", arch=arch, weights=None, model_name=arch, weights_digest="",
        class_names=[], batch_size=batch_size, score_threshold=score_threshold, precision=precision,
        threads_per_actor=torch.get_num_threads(), decode_in_actor=True,
        preprocess_spec=PreprocessSpec.of(read_model_metadata(None, arch)),
    )
    jpegs = synthetic_jpegs(batch_size, height=height, width=width)
    listing = {"image_uri": [f"synthetic/{index:05d}.jpg" for index in range(batch_size)],
               "size_bytes": [len(data) for data in jpegs], "etag": [""] * batch_size, "sniff": [False] * batch_size}
    batch = preprocess_contents(listing, jpegs, config=config)  # a read task's part: the JPEG headers
    if sum(1 for data in batch["encoded"] if len(data)) != batch_size:
        raise ValueError("the synthetic JPEGs were not all left for the actor to decode")
    detector = Detector(config, device=str(device))
    model = detector.model
    pixels, _, _, widths, heights = detector.decode_on_device(batch)
    sizes = torch.from_numpy(np.stack([heights, widths], axis=1).astype(np.int64))  # [B, 2] (H, W)

    def network():
        with torch.inference_mode():
            model.forward_head(pixels)

    def network_postprocess():
        with torch.inference_mode():
            model.detect(pixels, sizes)

    def decode_resize():
        with torch.inference_mode():
            detector.decode_on_device(batch)

    results = {}

    def actor_batch():
        results["table"] = detector.detect(batch)

    effective = model.effective_precision(detector.device)
    names = {"network": f"network alone ({effective})",
             "decode": f"decode_jpeg + resize on {detector.device.type}",
             "post": "network + post-processing",
             "actor": "actor batch: JPEG bytes -> table"}
    times = alternate({names["network"]: network, names["decode"]: decode_resize,
                       names["post"]: network_postprocess, names["actor"]: actor_batch},
                      repeats, warmup=warmup, synchronize=synchronizer(detector.device))
    table = results["table"]
    if table.num_rows != batch_size or set(table["status"].to_pylist()) != {"ok"}:
        raise ValueError(f"the actor's batch came back with {table.num_rows} rows, statuses "
                         f"{sorted(set(table['status'].to_pylist()))}")
    detections = sum(len(labels) for labels in table["det_label"].to_pylist())
    return {"arch": arch, "batch_size": batch_size, "device": str(detector.device), "precision": effective,
            "score_threshold": score_threshold, "detections_per_image": detections / batch_size,
            "decode": f"torchvision.io.decode_jpeg(device='{detector.device.type}')",
            "efficiency_vs_network": statistics.median(times[names["network"]]) / statistics.median(times[names["actor"]]),
            "rows": summarise(times, batch_size, names["network"])}


def describe_device(device) -> dict[str, Any]:
    import torch
    import torchvision

    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
                            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
                 "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported()}
    else:
        info["name"] = _cpu_name()
    return info


def _row(row: dict[str, Any]) -> dict[str, Any]:
    """A `ssd_core.bench.speed.summarise` row with its anchor ratio under one key."""
    ratio = next(value for key, value in row.items() if key.startswith("speedup_vs_"))
    return {"variant": row["variant"], "images_per_s": round(row["images_per_s"], 3), "median_s": row["median_s"],
            "vs_first": round(ratio, 3), "repeats": row["repeats"]}


def _goals(device, rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The goals per A100-class GPU, with the figures they are judged on (judged on a GPU only)."""
    def figure(section: str, variant_prefix: str) -> float | None:
        found = [r["images_per_s"] for r in rows if r["section"] == section and r["variant"].startswith(variant_prefix)]
        return found[0] if found else None

    judged = device.type == "cuda"
    alone = figure("bulk", "network alone")
    goals = [
        {"what": f"bulk, {args.bulk_arch}, JPEG bytes -> detections (actor batch of {args.batch_size})",
         "images_per_s": figure("bulk", "actor batch"), "goal": BULK_GOAL,
         "reference": f"NVIDIA SSD300 network alone: {NVIDIA_MODEL_ONLY:,.0f} img/s (batch 64, AMP, A100); "
                      f"ours alone: {'n/a' if alone is None else f'{alone:.1f}'} img/s"},
        {"what": f"training step, {args.train_arch}, ssd_core auto (batch {args.train_batch_size})",
         "images_per_s": figure("training", "ssd_core_auto"), "goal": TRAIN_GOAL,
         "reference": "NVIDIA SSD300 training: 724 img/s per A100"},
    ]
    for goal in goals:
        value = goal["images_per_s"]
        goal["met"] = (value >= goal["goal"]) if judged and value is not None else None
    return goals


def format_report(report: dict[str, Any]) -> str:
    """The one table: a header line, a row per figure, the goals."""
    info, settings = report["device"], report["settings"]
    where = info["name"] + (f" ({info['capability']}, {info['memory_gib']} GiB, CUDA {info['cuda']})"
                            if "capability" in info else " (CPU dry run: no GPU figures)")
    lines = [f"# gpu-check on {info['device']}: {where}; torch {info['torch']}, torchvision {info['torchvision']}, "
             f"Python {info['python']}",
             f"# {settings['height']}x{settings['width']} inputs, random weights, synthetic images; medians of "
             f"{settings['repeats']} timed calls after {settings['warmup']} warm-up; "
             "vs = img/s over the first row of its block (torchvision_fp32; bulk: the network alone)"]
    header = ("section", "arch", "variant", "batch", "img/s", "vs")
    table = [header] + [(r["section"], r["arch"], r["variant"], str(r["batch_size"]), f"{r['images_per_s']:.1f}",
                         f"{r['vs_first']:.2f}x") for r in report["rows"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {3, 4, 5}
    for row in table:
        lines.append("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    bulk = report["bulk"]
    if bulk:
        lines.append(f"# bulk: {bulk['decode']}, {bulk['detections_per_image']:.1f} detections per image at score "
                     f">= {bulk['score_threshold']}; actor batch / network alone = {bulk['efficiency_vs_network']:.2f}")
    for goal in report["goals"]:
        value = "n/a" if goal["images_per_s"] is None else f"{goal['images_per_s']:.1f}"
        verdict = {True: "MET", False: "NOT MET", None: "not judged (goals are for an A100-class GPU)"}[goal["met"]]
        lines.append(f"goal {goal['what']}: {value} img/s, goal >= {goal['goal']:,.0f}: {verdict}; {goal['reference']}")
    lines += [f"note: {note}" for note in report["notes"]]
    for error in report["errors"]:
        lines.append(f"FAILED {error['section']} {error['arch']}: {error['error']}")
    lines.append(f"# {report['seconds']:.0f} s in all")
    return "\n".join(lines)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} ({len(names)} CPUs)" if names else platform.processor() or platform.machine()


def _progress(started: float, what: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f} s] {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
