"""`ssd export`: the whole inference path (normalisation, network, decoding, NMS) as ONNX or TorchScript."""

from __future__ import annotations

import argparse

CONTRACT = """\
input:  images float32 [B, 3, H, W], RGB in 0..1, already resized to the model's input size (H, W)
        (300x300 for ssd300_*, 512x512 for ssd512_vgg16, 320x320 for ssdlite320_*, 300x300 for ssdlite300_*);
        B is dynamic; mean/std normalisation is inside the graph.
output: boxes [B, D, 4] float32 xyxy in input pixels, scores [B, D] float32, labels [B, D] int64
        (contiguous class indices, 0 = padding), num_detections [B] int64 (the first num_detections[b]
        rows of image b are real); D = the model's detections_per_img, best first.
The post-processing matches the eager model except that its exact pool-growing fallback (for images
whose top 1000 candidates collapse under NMS) is skipped. TorchScript: `import torchvision` before
torch.jit.load (for torchvision::nms). ONNX: NonMaxSuppression needs opset >= 11."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a detector (with decoding and NMS) to ONNX or TorchScript",
        description="Export a checkpoint's full inference path, decoding and NMS included, with a dynamic "
        "batch dimension.\n\n" + CONTRACT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", metavar="W",
                        help="our checkpoint (local or s3://), or a torchvision/NVIDIA state_dict with --arch")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    parser.add_argument("--output", required=True, metavar="FILE")
    parser.add_argument("--arch", metavar="A", help="architecture of a foreign state_dict that does not name it")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 11; default: 17)")
    parser.add_argument("--score-threshold", type=float, default=None, metavar="T",
                        help="bake a score threshold into the graph (default: the model's own)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssd_core.export import export_model
    from ssd_core.predict import load_detector

    model = load_detector(args.weights, arch=args.arch, score_threshold=args.score_threshold, device="cpu")
    path = export_model(model, args.output, format=args.format, opset=args.opset)
    config = model.postprocess_config
    height, width = model.size
    print(f"wrote {path} ({args.format}, {model.arch}, {model.num_classes} classes)")
    print(f"input:  images [B, 3, {height}, {width}] float32 RGB 0..1")
    print(f"output: boxes [B, {config.detections_per_img}, 4], scores [B, {config.detections_per_img}], "
          f"labels [B, {config.detections_per_img}], num_detections [B]; score threshold {config.score_thresh:g}")
    return 0
