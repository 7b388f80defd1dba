"""`ssd quantize`: post-training int8 calibration of a detector for CPU inference (ssd_core.quantize)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="calibrate weights for int8 CPU inference -> an int8 checkpoint",
        description="Post-training int8 quantization (torchao PT2E, x86 inductor quantizer; compiled on first use): backbone and head get "
        "per-channel int8 weights and uint8 activations whose ranges are calibrated on training images of --data "
        "(read and resized as inference does); box decoding and NMS stay fp32. OUTPUT is a checkpoint with "
        "precision int8 that `ssd predict`, `ssd eval`, `ssd detect` and load_model/build_model load like any "
        "other; it keeps the fp32 weights too (--precision fp32 runs them).",
    )
    parser.add_argument("--weights", required=True, metavar="W",
                        help="our checkpoint, or with --arch a torchvision/NVIDIA SSD state_dict or a registry name")
    parser.add_argument("--arch", metavar="A", help="architecture of foreign --weights")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="dataset root (local or s3://) whose train split calibrates the activations")
    parser.add_argument("--calibration-images", type=int, default=128, metavar="N",
                        help="training images to calibrate on, a seeded sample of the split (default 128)")
    parser.add_argument("--check-images", type=int, default=100, metavar="N",
                        help="val images of --data on which fp32 and int8 AP are compared before writing (default "
                        "100; 0: no check)")
    parser.add_argument("--max-ap-loss", type=float, default=1.0, metavar="POINTS",
                        help="refuse to write the checkpoint when int8 loses more than this many AP or AP50 points "
                        "(0-100 scale) against fp32 on the check (default 1.0)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B")
    parser.add_argument("--workers", type=int, default=1, metavar="K", help="data loader processes")
    parser.add_argument("--output", required=True, metavar="W_int8.pt", help="int8 checkpoint to write (local or s3://)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssd_core.quantize import quantize_checkpoint

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    summary = quantize_checkpoint(args.weights, args.output, data=args.data, arch=args.arch,
                                  num_images=args.calibration_images, batch_size=args.batch_size,
                                  workers=args.workers, check_images=args.check_images,
                                  max_ap_loss=args.max_ap_loss)
    print(json.dumps(summary))
    return 0
