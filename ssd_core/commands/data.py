"""`ssd data ...`: write the synthetic dataset, download COCO 2017, summarise a COCO-format dataset."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="datasets: synthetic shapes, dataset summaries")
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

    stats = actions.add_parser("stats", help="load a COCO-format split and print counts per class and scale")
    stats.add_argument(
        "root", help="dataset folder or s3:// prefix (annotations/instances_SPLIT.json, SPLIT/)"
    )
    stats.add_argument("--split", default="val", metavar="SPLIT", help="split name (default val)")
    stats.set_defaults(func=run_stats)


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

    dataset = CocoDataset(args.root, split=args.split)
    print(json.dumps(dataset_statistics(dataset), indent=2))
    return 0
