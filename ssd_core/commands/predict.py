"""`ssd predict`: detections on an image, a folder of images or a video -> annotated copies + JSON."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="detect objects in an image, a folder or a video; write annotated copies and a JSON",
        description="Runs a detector on INPUT (an image, a folder of images searched recursively, or a video) "
        "and writes boxes with class names and scores drawn on the pictures / every video frame (at the "
        "source frame rate), plus a JSON of detections per image or frame (boxes xyxy in original pixels, "
        "labels, label_names, scores). OUTPUT: an image (or video) file name for an image (or video) input, "
        "with the JSON beside it (same name, .json); otherwise a folder holding the annotated file(s) and "
        "detections.json. Class names come from the checkpoint.",
    )
    parser.add_argument("--weights", metavar="W",
                        help="our checkpoint (e.g. RUN_DIR/last.pt; local or s3://), or a torchvision/NVIDIA "
                        "SSD state_dict together with --arch")
    parser.add_argument("--input", required=True, metavar="IMAGE|DIR|VIDEO", help="a local path, or an s3:// or "
                        "https:// image, video, prefix or folder (a web page listing its files as links)")
    parser.add_argument("--output", required=True, metavar="PATH")
    parser.add_argument("--score-threshold", type=float, default=0.3, metavar="T",
                        help="keep detections scoring above T (default: 0.3)")
    parser.add_argument("--arch", metavar="A", help="architecture of a foreign state_dict that does not name it")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16", "int8", "auto"],
                        help="default: the checkpoint's (int8 for `ssd quantize` output), else fp32; int8 needs such a checkpoint")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="images or frames per forward pass")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssd_core.predict import input_kind, load_detector, predict

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    from pathlib import Path

    input_kind(args.input)  # a missing or unsupported input fails before the model loads
    model = load_detector(args.weights, arch=args.arch, precision=args.precision,
                          score_threshold=args.score_threshold, device=args.device)
    result = predict(model, args.input, args.output, batch_size=args.batch_size,
                     progress=not args.no_progress, weights=args.weights)
    unit = "frames" if result.kind == "video" else "images"
    skipped = f", {result.num_errors} unreadable (listed in the JSON)" if result.num_errors else ""
    print(f"{result.num_images} {unit}, {result.num_detections} detections above {args.score_threshold:g}{skipped}")
    where = result.outputs[0] if len(result.outputs) == 1 else (Path(args.output) if result.outputs else None)
    if where is not None:
        print(f"annotated: {where}")
    print(f"detections: {result.json_path}")
    return 0
