"""`ssd query`: SQL (DuckDB) over the Parquet written by `ssd detect` (views `detections`, `images`)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "query",
        help="run SQL over bulk-detection outputs (views: detections, images)",
        description="Run DuckDB SQL over OUTPUT/detections and OUTPUT/images (local or s3://).",
    )
    parser.add_argument("--output", required=True, help="the --output of `ssd detect`")
    parser.add_argument("sql", help='e.g. "SELECT label_name, count(*) FROM detections GROUP BY 1"')
    parser.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    parser.add_argument("--to", help="write the result to this file (local or s3://) instead of stdout")
    parser.add_argument("--max-rows", type=int, default=40, help="rows shown by --format table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssd_core.query import export_table, query

    table = query(args.output, args.sql)
    if args.format == "table":
        if args.to:
            raise ValueError("--to needs --format csv, json or parquet")
        import duckdb

        duckdb.from_arrow(table).show(max_rows=args.max_rows, max_width=200)
        print(f"({table.num_rows} rows)")
        return 0
    if args.format == "parquet" and not args.to:
        raise ValueError("--format parquet needs --to FILE")
    data = export_table(table, args.format, args.to)
    if args.to:
        print(f"wrote {table.num_rows} rows to {args.to}", file=sys.stderr)
    else:
        sys.stdout.write(data.decode())
    return 0
