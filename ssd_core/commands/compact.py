"""`ssd compact`: merge the small block files of bulk-detection outputs into large ones."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compact",
        help="merge the small Parquet files of committed detect runs into large ones (queries unchanged)",
        description="Merges, within each run_id partition, the block files of OUTPUT/detections/ and "
        "OUTPUT/images/ into files of about --target-mb, committed so that `ssd query` sees every row once "
        "at every point (see ssd_core.bulk.compact for plain readers). Do not run it while `ssd detect` "
        "writes to the same OUTPUT: the detect-bucket flow (compact=true) and the compact-output flow hold "
        "the per-output lock that serialises them.",
    )
    parser.add_argument("--output", required=True, help="folder or s3://bucket/prefix of the Parquet tables")
    parser.add_argument("--target-mb", type=float, default=256, help="target size of a compacted file (MiB)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssd_core.bulk.compact import compact_output

    summary = compact_output(args.output, target_bytes=int(args.target_mb * 2**20))
    print(f"compacted {args.output}: {summary['files_before']} files -> {summary['files_after']} "
          f"({summary['groups']} merged groups)")
    print(json.dumps(summary))
    return 0
