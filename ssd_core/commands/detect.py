"""`ssd detect`: bulk detection over a folder or S3 prefix with Ray Data, written as Parquet."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="detect objects in every image under a folder or s3:// prefix -> Parquet (Ray Data)",
        description="Bulk detection: lists INPUT recursively (or reads the objects from --input-manifest), skips objects already in OUTPUT/images/ for "
        "these weights, and writes OUTPUT/detections/ and OUTPUT/images/ (zstd Parquet, partitioned by "
        "run_id). S3 endpoint and credentials come from the standard AWS environment. With RAY_ADDRESS set it "
        "runs on that cluster (actors laid out from the cluster's nodes, not this machine), else on a local one.",
    )
    parser.add_argument("--input", help="folder or s3://bucket/prefix of images (with --input-manifest: the root "
                        "of the manifest's relative keys)")
    parser.add_argument("--input-manifest", help="local or s3:// file naming the images instead of listing --input: "
                        "an S3 Inventory manifest.json or data file (CSV, Parquet, ORC), a CSV with a header "
                        "(image_uri or key, size, etag), a Parquet file, or one URI/key per line")
    parser.add_argument("--output", required=True, help="folder or s3://bucket/prefix for the Parquet tables")
    parser.add_argument("--arch", help="architecture (needed unless --weights is one of our checkpoints)")
    parser.add_argument("--weights", help="our checkpoint, or a torchvision/NVIDIA state_dict with --arch; "
                        "omitted: random init (demo only)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--run-id", help="partition name for this run (default: UTC timestamp + random suffix)")
    parser.add_argument("--num-actors", type=int, help="a fixed number of inference actors (default: as many as the "
                        "cluster's nodes hold: one per GPU, or on a cluster without GPUs one single-threaded actor "
                        "per CPU, each also reading, decoding and writing)")
    parser.add_argument("--min-actors", type=int, help="autoscaling pool: start with this many actors")
    parser.add_argument("--max-actors", type=int, help="autoscaling pool: grow up to this many actors as the "
                        "cluster grows (alone: start with one)")
    parser.add_argument("--num-gpus-per-actor", type=float,
                        help="GPUs each inference actor reserves, fractional allowed (e.g. 0.5: two per GPU); "
                        "> 0 asks for GPU actors even if no GPU node is up yet (an autoscaler adds them), "
                        "0 forces CPU actors; default: 1 if any node of the cluster has a GPU, else 0")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"],
                        help="auto: int8 for an `ssd quantize` checkpoint on CPU actors, else bf16 where the CPU or "
                        "GPU has it, else fp32")
    parser.add_argument("--rows-per-file", type=int, default=1024,
                        help="images per output block file, at most (fewer on small inputs, so every actor gets work)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssd_core.bulk import detect_bucket

    if not args.input and not args.input_manifest:
        raise ValueError("detect: give --input or --input-manifest")

    summary = detect_bucket(
        args.input, args.output, input_manifest=args.input_manifest, arch=args.arch, weights=args.weights, batch_size=args.batch_size,
        score_threshold=args.score_threshold, run_id=args.run_id, num_actors=args.num_actors,
        min_actors=args.min_actors, max_actors=args.max_actors, num_gpus_per_actor=args.num_gpus_per_actor,
        precision=args.precision, rows_per_file=args.rows_per_file, progress=not args.no_progress,
    )
    print(
        f"run {summary['run_id']}: {summary['images_seen']} images seen, {summary['images_new']} new, "
        f"{summary['ok']} ok, {summary['error']} error, {summary['detections']} detections, "
        f"{summary['images_per_s']:.2f} images/s ({summary['seconds']:.1f} s)"
    )
    print(json.dumps(summary))
    return 0
