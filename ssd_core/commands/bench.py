"""`ssd bench infer|train|detect|ledger|learn`: side-by-side figures and ratios."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

# Sub-benchmarks owned by other modules: (module, function adding the sub-parser).
_EXTERNAL = [("ssd_core.commands.bench_detect", "register_bench"), ("ssd_core.commands.bench_ledger", "register_bench"),
             ("ssd_core.learn", "register_bench")]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="side-by-side benchmarks against torchvision")
    bench = parser.add_subparsers(dest="bench", metavar="BENCH")

    infer = bench.add_parser("infer", help="eval forward: torchvision fp32 / bf16 autocast vs ssd_core fp32 / auto "
                             "(/ int8)")
    _common(infer, batch_size=4)
    infer.add_argument("--precision", choices=["auto", "int8"], default="auto",
                       help="int8: add an ssd_core int8 column (calibrated on other random inputs)")
    infer.set_defaults(func=_run_infer)

    train = bench.add_parser("train", help="training step: torchvision fp32 vs ssd_core (or images/s per Ray worker count)")
    _common(train, batch_size=4)
    train.add_argument("--workers", help="comma-separated Ray worker counts, e.g. 1,2 (runs the Ray benchmark)")
    train.add_argument("--data", help="dataset folder for --workers (COCO layout)")
    train.add_argument("--steps", type=int, default=4, help="steps per worker count with --workers")
    train.set_defaults(func=_run_train)

    for module_name, function in _EXTERNAL:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        getattr(module, function)(bench)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _common(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    parser.add_argument("--arch", default="ssd300_vgg16", help="ssd300_vgg16 or ssdlite320_mobilenet_v3_large")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions; medians are reported")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (a whole GPU node: python -m ssd_core.gpucheck)")


def _emit(result: dict, path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


def _run_infer(args: argparse.Namespace) -> int:
    from ssd_core.bench import bench_infer, format_rows
    from ssd_core.precision import resolve_device

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
    _emit(result, args.json)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    if args.workers:
        try:
            from ssd_core.distributed import bench_train_workers
        except ModuleNotFoundError:
            raise ValueError("Ray training benchmark is not available (ssd_core.distributed missing)") from None
        if not args.data:
            raise ValueError("--workers needs --data DIR (a COCO-format dataset, e.g. from `ssd data synth`)")
        counts = [int(n) for n in args.workers.split(",")]
        rows = bench_train_workers(args.arch, args.data, worker_counts=counts, steps=args.steps,
                                   batch_size=args.batch_size)
        from ssd_core.bench import format_rows

        print(format_rows(rows))
        _emit({"rows": rows}, args.json)
        return 0
    from ssd_core.bench import bench_train, format_rows
    from ssd_core.precision import resolve_device

    result = bench_train(args.arch, batch_size=args.batch_size, repeats=args.repeats,
                         height=args.height, width=args.width, device=resolve_device(args.device))
    print(f"# training step, {args.arch}, batch {args.batch_size}, {result['device']}, medians of {args.repeats}")
    print(format_rows(result["rows"]))
    print(f"ssd_core auto vs torchvision fp32:          {result['ratio_auto_vs_torchvision_fp32']:.2f}x")
    print(f"ssd_core auto vs torchvision autocast:      {result['ratio_auto_vs_torchvision_autocast']:.2f}x")
    _emit(result, args.json)
    return 0
