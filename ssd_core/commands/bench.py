"""`ssd bench infer|train|detect|ledger|learn`: the command line of the benchmarks in `ssd_core.bench`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="side-by-side benchmarks against torchvision")
    bench = parser.add_subparsers(dest="bench", metavar="BENCH")

    infer = bench.add_parser("infer", help="eval forward: torchvision fp32 / bf16 autocast vs ssd_core fp32 / auto "
                             "(/ int8)")
    _common(infer, batch_size=4)
    infer.add_argument("--precision", choices=["auto", "int8"], default="auto",
                       help="int8: add an ssd_core int8 column (calibrated on other random inputs)")
    infer.add_argument("--breakdown", action="store_true",
                       help="with --precision int8: also time ours in bf16 and int8 stage by stage "
                            "(preprocessing, network, post-processing)")
    infer.set_defaults(func=_run_infer)

    train = bench.add_parser("train", help="training step: torchvision fp32 vs ssd_core (or images/s per Ray worker count)")
    _common(train, batch_size=4)
    train.add_argument("--workers", help="comma-separated Ray worker counts, e.g. 1,2 (runs the Ray benchmark)")
    train.add_argument("--data", help="dataset folder for --workers (COCO layout)")
    train.add_argument("--steps", type=int, default=4, help="steps per worker count with --workers")
    train.set_defaults(func=_run_train)

    _add_detect(bench)
    _add_ledger(bench)
    _add_learn(bench)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _common(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    parser.add_argument("--arch", default="ssd300_vgg16", help="ssd300_vgg16 or ssdlite320_mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions; medians are reported")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (a whole GPU node: python -m ssd_core.gpucheck)")


def _emit(result: Any, path: Path | None) -> None:
    """Write `result` as JSON to `path` (atomically), if a path was given."""
    if path:
        from ssd_core.runs import write_json

        write_json(str(path), result)


def _run_infer(args: argparse.Namespace) -> int:
    from ssd_core.bench.speed import bench_infer, format_rows
    from ssd_core.precision import resolve_device

    if args.breakdown and (args.precision != "int8" or resolve_device(args.device).type != "cpu"):
        raise ValueError("--breakdown compares bf16 with int8 on the CPU: use it with --precision int8 --device cpu")
    result = bench_infer(args.arch, batch_size=args.batch_size, repeats=args.repeats,
                         height=args.height, width=args.width, device=resolve_device(args.device),
                         int8=args.precision == "int8")
    print(f"# inference, {args.arch}, batch {args.batch_size}, {args.height}x{args.width} inputs, "
          f"{result['device']}, {result['threads']} threads, medians of {args.repeats}")
    print(format_rows(result["rows"]))
    print(f"ssd_core auto vs torchvision fp32:          {result['ratio_auto_vs_torchvision_fp32']:.2f}x")
    print(f"ssd_core auto vs torchvision autocast:      {result['ratio_auto_vs_torchvision_autocast']:.2f}x")
    if "ratio_int8_vs_auto" in result:
        print(f"ssd_core int8 vs torchvision fp32:          {result['ratio_int8_vs_torchvision_fp32']:.2f}x")
        print(f"ssd_core int8 vs ssd_core auto:             {result['ratio_int8_vs_auto']:.2f}x")
    print("# post-processing alone (same head outputs)")
    print(format_rows(result["postprocess"]["rows"]))
    print(f"ssd_core vs torchvision post-processing:    {result['postprocess']['ratio']:.2f}x")
    if args.breakdown:
        from ssd_core.bench.int8 import bench_breakdown

        result["breakdown"] = breakdown = bench_breakdown(args.arch, batch_size=args.batch_size, repeats=args.repeats,
                                                          height=args.height, width=args.width)
        print("# ssd_core bf16 vs int8, stage by stage (each timed alone)")
        print(format_rows(breakdown["stages"]))
        print("# the network's convolution kernels by kind, s per batch (profiled)")
        print(format_rows(breakdown["convolutions"]))
    _emit(result, args.json)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    if args.workers:
        from ssd_core.bench.workers import bench_train_workers

        if not args.data:
            raise ValueError("--workers needs --data DIR (a COCO-format dataset, e.g. from `ssd data synth`)")
        counts = [int(n) for n in args.workers.split(",")]
        rows = bench_train_workers(args.arch, args.data, worker_counts=counts, steps=args.steps,
                                   batch_size=args.batch_size)
        from ssd_core.bench.speed import format_rows

        print(format_rows(rows))
        _emit({"rows": rows}, args.json)
        return 0
    from ssd_core.bench.speed import bench_train, format_rows
    from ssd_core.precision import resolve_device

    result = bench_train(args.arch, batch_size=args.batch_size, repeats=args.repeats,
                         height=args.height, width=args.width, device=resolve_device(args.device))
    print(f"# training step, {args.arch}, batch {args.batch_size}, {result['device']}, medians of {args.repeats}")
    print(format_rows(result["rows"]))
    print(f"ssd_core auto vs torchvision fp32:          {result['ratio_auto_vs_torchvision_fp32']:.2f}x")
    print(f"ssd_core auto vs torchvision autocast:      {result['ratio_auto_vs_torchvision_autocast']:.2f}x")
    _emit(result, args.json)
    return 0


def _add_detect(bench: argparse._SubParsersAction) -> None:
    from ssd_core.bench import detect

    defaults = detect.DetectBench()
    parser = bench.add_parser("detect", help="bulk detection images/s vs the model alone and vs a naive loop",
                              description=detect.__doc__)
    parser.add_argument("--arch", default=defaults.arch)
    parser.add_argument("--images", type=int, default=defaults.images, help="synthetic 640x480 JPEGs in the bucket")
    parser.add_argument("--model-images", type=int, default=defaults.model_images,
                        help="images the model-only figure runs on")
    parser.add_argument("--naive-images", type=int, default=defaults.naive_images,
                        help="images the naive loop processes per repetition")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help="alternating repetitions; medians are reported")
    parser.add_argument("--score-threshold", type=float, default=defaults.score_threshold)
    parser.add_argument("--precision", default=defaults.precision, choices=["auto", "fp32", "bf16", "int8"],
                        help="int8: the weights calibrated (`ssd_core.quantize`) on the bucket's first batch and "
                        "saved as an int8 checkpoint, which the pipeline and the model-only figure load")
    parser.add_argument("--work-dir", type=Path, help="where the bucket and outputs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.set_defaults(func=_run_detect)


def _run_detect(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ssd_core.bench.detect import DetectBench, bench_detect, format_report

    result = bench_detect(DetectBench(**{f.name: getattr(args, f.name) for f in fields(DetectBench)}))
    print(format_report(result))
    _emit(result, args.json)
    return 0


def _add_ledger(bench: argparse._SubParsersAction) -> None:
    from ssd_core.bench import ledger

    parser = bench.add_parser("ledger", help="driver peak RSS and wall time of a nothing-new incremental run at N objects",
                              description=ledger.__doc__)
    parser.add_argument("--objects", default="10000,100000,1000000", help="comma-separated bucket sizes")
    parser.add_argument("--rows-per-file", type=int, default=1024, help="rows per committed ledger file")
    parser.add_argument("--work-dir", type=Path, help="where manifests and ledgers go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.set_defaults(func=_run_ledger)


def _run_ledger(args: argparse.Namespace) -> int:
    from ssd_core.bench.ledger import bench_ledger, format_report

    rows = bench_ledger([int(n) for n in args.objects.split(",")], args.rows_per_file, args.work_dir)
    print(format_report(rows))
    _emit({"rows": rows}, args.json)
    return 0


def _add_learn(bench: argparse._SubParsersAction) -> None:
    from ssd_core.bench.learn import DEFAULT_ABLATIONS, LEARN_RECIPE, TARGET_AP50

    parser = bench.add_parser(
        "learn",
        help="train from scratch on the synthetic set side by side with torchvision's SSDLite recipe",
        description="Train ssdlite from scratch on a dataset written by `ssd data synth` within a time budget "
        "(or --steps), evaluate on its val split, then train torchvision's own ssdlite320_mobilenet_v3_large with "
        "its plain recipe on the same data, budget and threads, and print both and the difference; compare fp32 "
        "and bf16 evaluation of our checkpoint. Writes RUN_DIR/learn.json next to the usual run files. With "
        "--ablate, trains one recipe change at a time at --steps on every --data and prints a table.",
    )
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR",
                        help="dataset root (e.g. from `ssd data synth`); several with --ablate")
    parser.add_argument("--output", required=True, metavar="RUN_DIR")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget of each side "
                        "(evaluation excluded)")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of --minutes "
                        "(both sides; the schedules span them)")
    parser.add_argument("--recipe", metavar="CHANGES", help="changes to our recipe, key=value,... as for --ablate "
                        "(e.g. warmup_iters=25,model.min_ratio=0.1)")
    parser.add_argument("--target-ap50", type=float, default=TARGET_AP50)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--size", type=int, default=None, help="square input size of our model "
                        f"(default {LEARN_RECIPE['model']['size'][0]})")
    parser.add_argument("--augment", choices=["ssd", "ssdlite", "flip", "none"], default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-anchor", action="store_true", help="skip torchvision's run")
    parser.add_argument("--no-compare", action="store_true", help="skip the fp32-vs-bf16 evaluation")
    parser.add_argument("--ablate", nargs="*", metavar="VARIANT", default=None,
                        help="train one change at a time at --steps on every --data: 'base' or key=value,... "
                        f"(e.g. size=224 augment=ssdlite batch_size=32,lr=0.15; default: {' '.join(DEFAULT_ABLATIONS)})")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_learn)


def _run_learn(args: argparse.Namespace) -> int:
    from ssd_core.bench.learn import ablate, ablation_table, learn, parse_variant, side_by_side

    overrides: dict[str, Any] = parse_variant(args.recipe) if args.recipe else {}
    for name in ("batch_size", "lr", "augment", "precision", "threads", "seed"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.size is not None:
        overrides["model"] = {**overrides.get("model", {}), "size": [args.size, args.size]}
    if args.no_progress:
        overrides["progress"] = False
    if args.ablate is not None:
        if args.steps is None:
            raise ValueError("--ablate needs --steps: the ablation compares runs of the same step count")
        rows = ablate(args.data, args.output, steps=args.steps, variants=args.ablate or None,
                      anchor=not args.no_anchor, **overrides)
        print(ablation_table(rows))
        _emit(rows, Path(args.output, "ablation.json"))
        return 0
    if len(args.data) != 1:
        raise ValueError("give one --data folder (several only with --ablate)")
    report = learn(args.data[0], args.output, minutes=args.minutes, steps=args.steps, target_ap50=args.target_ap50,
                   compare=not args.no_compare, anchor=not args.no_anchor, **overrides)
    print(json.dumps({k: v for k, v in report.items() if k not in ("recipe", "torchvision")}, indent=2))
    print(side_by_side(report))
    return 0 if report["reached_target"] else 1
