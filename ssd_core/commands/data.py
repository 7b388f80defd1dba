"""`ssd data ...`: write the synthetic dataset, download COCO 2017, summarise a COCO-format dataset,
convert VOC / YOLO datasets."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="datasets: synthetic shapes, summaries, VOC/YOLO conversion")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = actions.add_parser("synth", help="write the deterministic synthetic shapes dataset (COCO format)")
    synth.add_argument("out", help="output folder (gets annotations/, train/, val/)")
    synth.add_argument(
        "--num-train", type=int, metavar="N", default=1000, help="training images (default 1000)"
    )
    synth.add_argument(
        "--num-val", type=int, metavar="M", default=200, help="validation images (default 200)"
    )
    synth.add_argument(
        "--seed", type=int, metavar="S", default=0, help="same seed -> identical files (default 0)"
    )
    synth.set_defaults(func=run_synth)

    download = actions.add_parser("download", help="download a public dataset into the project's layout")
    download.add_argument("name", choices=["coco"], help="dataset (coco: COCO 2017 images + instances)")
    download.add_argument("--output", required=True, metavar="DIR", help="folder or s3:// prefix")
    download.add_argument("--splits", nargs="+", choices=["train", "val"], default=["train", "val"],
                          help="image splits (default: train val; the annotations always come)")
    download.add_argument("--base-url", default=None, metavar="URL", help="a mirror of images.cocodataset.org")
    download.add_argument("--staging-dir", default=None, metavar="DIR",
                          help="where archives are unpacked before an s3:// upload (default: the temp dir)")
    download.add_argument("--keep-archives", action="store_true", help="keep the zip files after extraction")
    download.set_defaults(func=run_download)

    stats = actions.add_parser("stats", help="images, boxes per class and box sizes of a COCO-format dataset")
    stats.add_argument(
        "root", help="dataset folder or s3:// prefix (annotations/instances_SPLIT.json and SPLIT/, or COCO 2017's "
        "annotations/instances_SPLIT2017.json and SPLIT2017/)"
    )
    stats.add_argument("--split", default=None, metavar="SPLIT", help="one split (default: train and val)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of tables")
    stats.set_defaults(func=run_stats)

    convert = actions.add_parser(
        "convert", help="write a Pascal VOC or YOLO dataset as a COCO-format dataset",
        description="Convert a Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/{train,val}.txt) or a "
        "YOLO dataset (images/ and labels/ folders, class names in data.yaml or classes.txt) into OUT/annotations/"
        "instances_{train,val}.json and OUT/{train,val}/ (images copied). VOC boxes are 1-based inclusive pixel "
        "indices: COCO x = xmin - 1, w = xmax - xmin + 1. VOC's difficult/truncated flags are kept as annotation "
        "attributes.",
    )
    convert.add_argument("src", help="the dataset folder")
    convert.add_argument("--from", dest="source_format", required=True, choices=["voc", "yolo"])
    convert.add_argument("--output", required=True, metavar="OUT", help="new dataset folder")
    convert.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                         help="share of images for val when the source has no train/val split (default 0.1)")
    convert.add_argument("--seed", type=int, default=0, help="seed of that split (default 0)")
    convert.set_defaults(func=run_convert)


def run_synth(args: argparse.Namespace) -> int:
    from ssd_core.data.synthetic import write_synthetic_dataset

    out = write_synthetic_dataset(args.out, args.num_train, args.num_val, seed=args.seed)
    print(f"wrote {args.num_train} train and {args.num_val} val images to {out}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    import logging

    from ssd_core.data.download import COCO_BASE_URL, download_coco

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = download_coco(args.output, args.splits, base_url=args.base_url or COCO_BASE_URL,
                           staging_dir=args.staging_dir, keep_archives=args.keep_archives)
    print(f"COCO 2017 ({', '.join(args.splits)}) is in {output}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from ssd_core.data.coco import CocoDataset, dataset_statistics

    stats, missing = {}, []
    for split in [args.split] if args.split else ["train", "val"]:
        try:
            stats[split] = dataset_statistics(CocoDataset(args.root, split=split))
        except FileNotFoundError as exc:
            missing.append(exc)  # a dataset may hold one split only (e.g. COCO's val2017 alone)
    if not stats:
        raise missing[0]
    print(json.dumps(stats if args.split is None else stats[args.split], indent=2) if args.json
          else "\n\n".join(format_statistics(split, value) for split, value in stats.items()))
    return 0


def format_statistics(split: str, stats: dict) -> str:
    """`dataset_statistics` as a short text table."""
    lines = [f"{split}: {stats['images']} images ({stats['images_without_boxes']} without boxes), "
             f"{stats['boxes']} boxes  [{stats['annotation_file']}]"]
    width = max([len(name) for name in stats["boxes_per_class"]] + [5])
    lines.append(f"  {'class':<{width}}  {'boxes':>8}")
    lines += [f"  {name:<{width}}  {count:>8}" for name, count in stats["boxes_per_class"].items()]
    scales = stats["boxes_per_scale"]
    lines.append(f"  box sizes by COCO area: small (< 32x32) {scales['small']}, medium {scales['medium']}, "
                 f"large (>= 96x96) {scales['large']}")
    left_out = {key: value for key, value in stats["left_out"].items() if value}
    if left_out:
        lines.append("  left out of training: " + ", ".join(f"{value} {key}" for key, value in left_out.items()))
    return "\n".join(lines)


def run_convert(args: argparse.Namespace) -> int:
    from ssd_core.data.convert import CONVERTERS

    summary = CONVERTERS[args.source_format](args.src, args.output, val_fraction=args.val_fraction, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0
