"""`ssd eval`: COCO metrics and a report, for a checkpoint on a dataset or for an existing results file."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="COCO evaluation report (metrics.json, report.md, PR curves, sample pictures)",
        description="Either run a checkpoint over a COCO-format dataset (--weights --data) or score an "
        "existing COCO results file (--annotations --results). Writes REPORT_DIR/metrics.json, "
        "results.json, report.md, pr_curves.png, confusion.png and samples.png.",
    )
    model_group = parser.add_argument_group("evaluate a checkpoint")
    model_group.add_argument("--weights", metavar="W", help="our checkpoint (local path or s3://); with --arch, "
                             "weights from elsewhere: a torchvision SSD state_dict or an NVIDIA SSD300 checkpoint")
    model_group.add_argument("--arch", metavar="A", help="architecture of foreign --weights (ssd300_vgg16, "
                             "ssd300_resnet50, ssdlite320_mobilenet_v3_large, ...); classes are matched to the "
                             "dataset's by name")
    model_group.add_argument("--data", metavar="DIR", help="dataset root: DIR/annotations/instances_{split}.json and "
                             "DIR/{split}/, or COCO 2017's instances_{split}2017.json and {split}2017/ (or give "
                             "--annotations and --images)")
    model_group.add_argument("--split", default="val", help="dataset split (default: val)")
    model_group.add_argument("--batch-size", type=int, default=8, metavar="B")
    model_group.add_argument("--workers", type=int, default=2, metavar="N", help="data loader processes")
    model_group.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16", "int8", "auto"],
                             help="default: the checkpoint's (int8 for `ssd quantize` output), else fp32; int8 needs such a checkpoint")
    model_group.add_argument("--max-images", type=int, default=None, metavar="N", help="evaluate only the first N images")
    files_group = parser.add_argument_group("score a results file")
    files_group.add_argument("--annotations", metavar="GT.json", help="ground-truth COCO annotation JSON (also with "
                             "--weights and --images instead of --data)")
    files_group.add_argument("--results", metavar="DT.json", help="COCO detection results JSON")
    files_group.add_argument("--images", metavar="DIR", help="image folder (default: guessed from the annotations "
                             "path DIR/annotations/instances_SPLIT.json -> DIR/SPLIT)")
    parser.add_argument("--output", required=True, metavar="REPORT_DIR", help="report directory or s3:// prefix")
    parser.add_argument("--samples", type=int, default=8, metavar="N", help="images in samples.png (0: none)")
    parser.add_argument("--show-gt", action="store_true", help="draw ground truth beside the predictions")
    parser.add_argument("--confusion-score", type=float, default=0.25, metavar="T",
                        help="confusion matrix and per-class counts: detections scoring at least T (default 0.25)")
    parser.add_argument("--confusion-iou", type=float, default=0.5, metavar="IOU",
                        help="confusion matrix: IoU that matches a detection to ground truth (default 0.5)")
    parser.set_defaults(func=run)


def _guess_images_dir(annotations: str) -> str | None:
    """DIR/annotations/instances_val.json -> DIR/val if that folder exists (the project's layout)."""
    path = Path(annotations)
    split = path.stem.removeprefix("instances_")
    candidate = path.parent.parent / split
    return str(candidate) if path.parent.name == "annotations" and candidate.is_dir() else None


def run(args: argparse.Namespace) -> int:
    from ssd_core import evaluation

    by_model = args.weights or args.data or args.arch
    by_files = args.results
    if by_model and by_files:
        raise ValueError("give either --weights/--data or --annotations/--results, not both")
    if args.arch and not args.weights:
        raise ValueError("--arch names the architecture of --weights; give --weights too")
    if by_files or (args.annotations and not by_model):
        if not (args.annotations and args.results):
            raise ValueError("--annotations and --results go together")
        metrics = evaluation.coco_metrics(args.annotations, args.results)
        images_dir = args.images or _guess_images_dir(args.annotations)
        report = evaluation.write_report(
            metrics, args.output, results=evaluation.load_results(args.results), gt=args.annotations,
            images_dir=images_dir, sample_images=args.samples if images_dir else 0, show_gt=args.show_gt,
            confusion_score=args.confusion_score, confusion_iou=args.confusion_iou,
        )
    elif args.weights and (args.data or args.annotations):
        from ssd_core import build_model, load_model
        from ssd_core.data import CocoDataset

        if args.arch:
            model = build_model(args.arch, weights=args.weights, num_classes=None, precision=args.precision)
        else:
            try:
                model = load_model(args.weights, precision=args.precision)
            except ValueError as exc:
                if "not an ssd_core checkpoint" not in str(exc):
                    raise
                raise ValueError(f"{args.weights} is not an ssd_core checkpoint: name its architecture with --arch "
                                 "(e.g. --arch ssd300_vgg16 for torchvision's, --arch ssd300_resnet50 for NVIDIA's)") from None
        if args.annotations:
            images = args.images or _guess_images_dir(args.annotations)
            if images is None:
                raise ValueError(f"--images: the image folder of {args.annotations} (not found beside it)")
            dataset = CocoDataset(None, split=args.split, annotation_file=args.annotations, image_folder=images)
        else:
            dataset = CocoDataset(args.data, split=args.split)
        metrics = evaluation.evaluate_model(model, dataset, batch_size=args.batch_size, workers=args.workers,
                                            max_images=args.max_images)
        report = evaluation.write_report(metrics, args.output, dataset=dataset, sample_images=args.samples,
                                         show_gt=args.show_gt, confusion_score=args.confusion_score,
                                         confusion_iou=args.confusion_iou)
    else:
        raise ValueError("give --weights W --data DIR (or --annotations GT.json --images DIR), or --annotations "
                         "GT.json --results DT.json")

    print(f"{metrics['num_images']} images, {metrics['num_detections']} detections")
    print(evaluation.format_summary(metrics))
    print(f"report: {report}")
    return 0
