"""The work of bulk detection on the cluster: read + decode + resize/normalise, batched inference in
actors that load the model once, and writing each block's two files (see ``ledger`` for the protocol).

Everything here runs in Ray tasks and actors; ``DetectConfig`` is all they are given.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ssd_core import storage
from ssd_core.bulk.ledger import block_id_of, commit_block, detections_schema, images_schema
from ssd_core.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    apply_orientation,
    decode_image,
    jpeg_header,
    sniff_image,
)

__all__ = ["DetectConfig", "build_detector", "PreprocessSpec", "read_and_preprocess", "preprocess_contents", "Detector",
           "write_block", "block_summary"]

DEFAULT_SEED = 0


@dataclass
class DetectConfig:
    """Everything the Ray stages need; small and picklable (no model, no credentials from the env)."""

    output_uri: str
    run_id: str
    arch: str | None
    weights: str | None
    model_name: str
    weights_digest: str
    class_names: list[str]
    batch_size: int = 16
    rows_per_file: int = 1024
    score_threshold: float = 0.3
    precision: str = "auto"
    seed: int = DEFAULT_SEED
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads_per_actor: int = 1
    storage_options: dict[str, Any] = field(default_factory=dict)
    preprocess_spec: Any = None  # PreprocessSpec: resize/normalise as the model does
    # Plain JPEGs are decoded by the inference actors (nvjpeg on a GPU) instead of the read tasks.
    decode_in_actor: bool = False


def build_detector(config: DetectConfig):
    """The model for ``config`` in eval mode (random init is seeded, so every actor gets the same one)."""
    import torch

    from ssd_core.lazy_imports import import_torchvision

    import_torchvision()  # before ssd_core's model modules import it: start-up counts here (see there)
    from ssd_core import build_model, load_model

    if config.weights is None:
        torch.manual_seed(config.seed)
        model = build_model(config.arch, precision=config.precision)
    elif config.arch is None:
        model = load_model(config.weights, precision=config.precision)
    else:
        model = build_model(config.arch, weights=config.weights, precision=config.precision)
    # Set after loading: checkpoints carry their own post-processing settings.
    model.postprocess_config = replace(model.postprocess_config, score_thresh=config.score_threshold)
    return model.eval()


@dataclass(frozen=True)
class PreprocessSpec:
    """What the CPU tasks need to resize and normalise exactly as ``model.preprocess`` does."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, metadata) -> PreprocessSpec:
        """From ``zoo.ModelMetadata`` (the model's own size, mean and std)."""
        return cls(tuple(metadata.size), tuple(metadata.image_mean), tuple(metadata.image_std))

    def mean_std_255(self, device=None):
        """(mean, std) for 0..255 pixels: the model's x / 255 folded in."""
        import torch

        return (255.0 * torch.tensor(self.mean, device=device), 255.0 * torch.tensor(self.std, device=device))


def read_and_preprocess(listing, *, config: DetectConfig) -> dict[str, np.ndarray]:
    """Ray task: listing rows (pyarrow) -> decoded, resized, normalised batch (see `preprocess_contents`)."""
    rows = listing.to_pydict()
    uris = rows["image_uri"]
    fs, _ = storage.filesystem_for(uris[0], config.storage_options) if uris else (None, None)
    paths = [storage.filesystem_for(uri, config.storage_options)[1] for uri in uris]
    # One call fetches the whole block; s3fs runs the GETs concurrently.
    contents = fs.cat(paths, on_error="return") if paths else {}
    return preprocess_contents(rows, [contents.get(path, FileNotFoundError(path)) for path in paths], config=config)


def preprocess_contents(rows: Mapping[str, list], contents: list[bytes | BaseException], *,
                        config: DetectConfig) -> dict[str, np.ndarray]:
    """Listing rows (columns image_uri, size_bytes, etag, sniff) and each object's bytes (or the error
    reading it) -> decoded, resized, normalised batch: the CPU work of a read task.

    Returns columns image_uri, size_bytes, etag, width, height, status, error and
    pixels float32[B, 3, H, W] (zeros for error rows, which inference skips). With
    ``config.decode_in_actor``, plain JPEGs (RGB or grayscale, within ``max_pixels``) are not decoded here:
    their bytes go in ``encoded`` and their EXIF orientation in ``orientation``, for the inference actor to
    decode on its device (see ``Detector``); other rows have ``encoded`` b"". ``pixels`` is then one bytes
    value per row, the float32 [3, H, W] array of a row decoded here and b"" for the others, so that rows
    the actor decodes carry no pixels through the object store (1 MB each at 300x300).
    """
    import torch

    from ssd_core.model import resize_normalize

    spec: PreprocessSpec = config.preprocess_spec
    uris = rows["image_uri"]
    keep, widths, heights, statuses, errors = [], [], [], [], []
    decoded: list[np.ndarray | None] = []  # uint8[H, W, 3], None for error rows and deferred JPEGs
    encoded: list[bytes] = []  # deferred JPEGs' bytes, b"" otherwise
    orientations: list[int] = []
    for index, (data, sniff) in enumerate(zip(contents, rows["sniff"])):
        if isinstance(data, BaseException):
            if sniff:
                continue
            keep.append(index)
            widths.append(0), heights.append(0), statuses.append("error")
            errors.append(_read_error_message(data))
            decoded.append(None), encoded.append(b""), orientations.append(1)
            continue
        if sniff and sniff_image(data[:16]) is None:
            continue  # extension-less and not an image: not an input
        keep.append(index)
        header = jpeg_header(data, config.max_pixels) if config.decode_in_actor else None
        if header is not None:
            (height, width), orientation = header
            heights.append(height), widths.append(width), statuses.append("ok"), errors.append("")
            decoded.append(None), encoded.append(data), orientations.append(orientation)
            continue
        encoded.append(b""), orientations.append(1)
        try:
            pixels = decode_image(data, max_pixels=config.max_pixels)
        except ImageDecodeError as exc:
            widths.append(0), heights.append(0), statuses.append("error"), errors.append(str(exc))
            decoded.append(None)
            continue
        heights.append(pixels.shape[0]), widths.append(pixels.shape[1])
        statuses.append("ok"), errors.append("")  # "" not None: object columns of None do not survive Ray
        decoded.append(pixels)

    ok_index = [i for i, pixels in enumerate(decoded) if pixels is not None]
    # One array row per kept row; with decode_in_actor, one per row decoded here (the rest carry none).
    batch = np.zeros((len(ok_index) if config.decode_in_actor else len(keep), 3, *spec.size), dtype=np.float32)
    # The model's own resize and normalisation, on 0..255 values (x / 255 folded into mean and std):
    # [3, H, W] views of the uint8 HWC arrays resize as channels_last, so the float copy is the only one.
    mean, std = spec.mean_std_255()
    for position, i in enumerate(ok_index):
        view = torch.from_numpy(decoded[i]).permute(2, 0, 1)
        row = position if config.decode_in_actor else i
        batch[row] = resize_normalize(view.float(), spec.size, mean, std, normalize_first=False).numpy()
    take = np.asarray(keep, dtype=np.int64)
    columns = {
        "image_uri": np.asarray(uris, dtype=object)[take],
        "size_bytes": np.asarray(rows["size_bytes"], dtype=np.int64)[take],
        "etag": np.asarray(rows["etag"], dtype=object)[take],
        "width": np.asarray(widths, dtype=np.int32),
        "height": np.asarray(heights, dtype=np.int32),
        "status": np.asarray(statuses, dtype=object),
        "error": np.asarray(errors, dtype=object),
        "pixels": batch,
    }
    if config.decode_in_actor:
        slot = {row: index for index, row in enumerate(ok_index)}
        columns["pixels"] = np.array([batch[slot[row]].tobytes() if row in slot else b"" for row in range(len(keep))],
                                     dtype=object)
        columns["encoded"] = np.array(encoded, dtype=object)
        columns["orientation"] = np.asarray(orientations, dtype=np.int8)
    return columns


def _read_error_message(exc: BaseException) -> str:
    """Error text for an object that could not be read (no credentials or endpoints in it)."""
    if isinstance(exc, FileNotFoundError):
        return "object not found when reading (deleted after listing?)"
    if isinstance(exc, PermissionError):
        return "permission denied when reading"
    return f"cannot read object: {type(exc).__name__}"


class Detector:
    """Ray actor: loads the model once, then turns batches into per-image detections.

    With ``owns_blocks`` (CPU-only nodes) it takes a block of listing rows, reads, decodes and detects
    them ``batch_size`` at a time, writes the block's files and returns the block's summary row;
    otherwise it takes the preprocessed batches of the read tasks and returns their detections for the
    write tasks (GPU nodes). See ``pipeline._run_pipeline`` for why. Nothing in it needs Ray: ``detect``
    is a batch's whole work on ``device`` (``ssd_core.gpucheck`` times it so, without Ray).
    """

    def __init__(self, config: DetectConfig, owns_blocks: bool = False, device: str = "auto") -> None:
        import torch

        from ssd_core.allocator import tune_allocator

        tune_allocator()
        torch.set_num_threads(max(1, config.threads_per_actor))
        from ssd_core.inference import optimize_for_inference
        from ssd_core.precision import resolve_device

        self.device = resolve_device(device)
        self.model = optimize_for_inference(build_detector(config), device=self.device)
        self.config, self.owns_blocks = config, owns_blocks
        self.node_id = _ray_node_id()
        # Everything loaded so far (torch, torchvision, the model) lives as long as the process: keep it
        # out of the collector. Besides shorter full collections, it makes the actor's exit quick: without
        # it each actor spent ~2 s of CPU in the interpreter's final collection, on cores the next run
        # (or the next job on the node) was already using.
        gc.freeze()

    def __call__(self, batch):
        if not self.owns_blocks:
            return self.detect(batch)
        import pyarrow as pa

        step = self.config.batch_size
        parts = [
            self.detect(read_and_preprocess(batch.slice(start, step), config=self.config))
            for start in range(0, batch.num_rows, step)
        ]
        return write_block(pa.concat_tables(parts), config=self.config) if parts else block_summary(0, 0, 0)

    def detect(self, batch: Mapping[str, np.ndarray]):
        """A preprocessed batch (see `read_and_preprocess`) -> results table: the image columns pass
        through (a deferred JPEG that fails to decode here becomes an error row); adds list columns
        det_label, det_score and det_box (4 per box), and node_id (where the inference ran)."""
        import pyarrow as pa
        import torch

        status, error = batch["status"], batch["error"]
        width, height = batch["width"], batch["height"]
        pixels = batch["pixels"]
        if "encoded" in batch:  # decode_in_actor: pixels as bytes per row (see preprocess_contents)
            pixels, status, error, width, height = self.decode_on_device(batch)
        ok = status == "ok"
        count = len(ok)
        labels, scores, boxes = [], [], []
        counts = np.zeros(count, dtype=np.int32)
        if ok.any():
            if isinstance(pixels, np.ndarray):
                if not (ok.all() and pixels.flags.writeable):
                    pixels = pixels[ok]  # a boolean index copies (into a writable array): once, and only if needed
                pixels = torch.from_numpy(pixels).to(self.device)
            elif not ok.all():
                pixels = pixels[torch.from_numpy(ok).to(pixels.device)]
            sizes = torch.from_numpy(np.stack([height[ok], width[ok]], axis=1).astype(np.int64))
            with torch.inference_mode():
                outputs = self.model.detect(pixels, sizes)
            counts[ok] = [len(out["scores"]) for out in outputs]
            labels = [out["labels"] for out in outputs]
            scores = [out["scores"] for out in outputs]
            boxes = [out["boxes"] for out in outputs]
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        label_values = torch.cat(labels).cpu().numpy().astype(np.int32) if labels else np.zeros(0, np.int32)
        score_values = torch.cat(scores).float().cpu().numpy() if scores else np.zeros(0, np.float32)
        box_values = torch.cat(boxes).float().cpu().numpy().reshape(-1) if boxes else np.zeros(0, np.float32)
        return pa.table(
            {
                "image_uri": pa.array(batch["image_uri"].tolist(), pa.string()),
                "size_bytes": pa.array(batch["size_bytes"], pa.int64()),
                "etag": pa.array(batch["etag"].tolist(), pa.string()),
                "width": pa.array(width, pa.int32()),
                "height": pa.array(height, pa.int32()),
                "status": pa.array(status.tolist(), pa.string()),
                "error": pa.array(error.tolist(), pa.string()),
                "det_label": pa.ListArray.from_arrays(offsets, pa.array(label_values)),
                "det_score": pa.ListArray.from_arrays(offsets, pa.array(score_values)),
                "det_box": pa.ListArray.from_arrays(pa.array(offsets.to_numpy() * 4), pa.array(box_values)),
                "node_id": pa.array([self.node_id] * count, pa.string()),
            }
        )

    def decode_on_device(self, batch: Mapping[str, np.ndarray]):
        """Decode the batch's deferred JPEGs on the actor's device (nvjpeg on a GPU, libjpeg-turbo on a
        CPU), orient, resize and normalise them there -> (pixels FloatTensor[B, 3, H, W] on the device,
        status, error, width, height). A JPEG the batched decode rejects is decoded alone, then by PIL
        (``decode_image``) as the read tasks would; one that PIL rejects too becomes an error row."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        from ssd_core.model import resize_normalize

        spec: PreprocessSpec = self.config.preprocess_spec
        status, error = batch["status"].copy(), batch["error"].copy()
        width, height = batch["width"].copy(), batch["height"].copy()
        rows = [i for i, data in enumerate(batch["encoded"]) if len(data)]
        # Only the rows the read tasks decoded cross to the device.
        pixels = torch.zeros((len(status), 3, *spec.size), device=self.device)
        ready = [i for i, data in enumerate(batch["encoded"]) if not len(data) and status[i] == "ok"]
        if ready:
            arrays = [np.frombuffer(batch["pixels"][i], dtype=np.float32).reshape(3, *spec.size) for i in ready]
            pixels[ready] = torch.from_numpy(np.stack(arrays)).to(self.device)
        tensors = [torch.from_numpy(np.frombuffer(batch["encoded"][i], dtype=np.uint8).copy()) for i in rows]

        def decode(items):
            with warnings.catch_warnings():  # torchvision marks its decoders as moving to torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(items, mode=ImageReadMode.RGB, device=self.device)

        try:
            images = decode(tensors)
        except RuntimeError:  # one bad file fails the whole batched call
            images = []
            for tensor in tensors:
                try:
                    images.append(decode([tensor])[0])
                except RuntimeError:
                    images.append(None)
        decoded, decoded_rows = [], []
        for row, image in zip(rows, images):
            if image is None:
                try:
                    image = torch.from_numpy(decode_image(batch["encoded"][row], max_pixels=self.config.max_pixels))
                except ImageDecodeError as exc:
                    status[row], error[row], width[row], height[row] = "error", str(exc), 0, 0
                    continue
                image = image.permute(2, 0, 1).to(self.device)  # already oriented by PIL
            else:
                image = apply_orientation(image, int(batch["orientation"][row]))
            height[row], width[row] = image.shape[-2:]
            decoded.append(image), decoded_rows.append(row)
        mean, std = spec.mean_std_255(self.device)
        for row, image in zip(decoded_rows, decoded):
            pixels[row] = resize_normalize(image.float(), spec.size, mean, std, normalize_first=False)
        return pixels, status, error, width, height


def _ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray, which is then not imported)."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it already
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - bookkeeping only
        return ""


def block_summary(images: int, ok: int, detections: int, nodes: Mapping[str, int] | None = None):
    """The one-row table a written block reports to the driver; ``nodes``: images per Ray node id that
    ran their inference (JSON)."""
    import pyarrow as pa

    return pa.table({"images": [images], "ok": [ok], "error": [images - ok], "detections": [detections],
                     "nodes": [json.dumps(dict(nodes or {}))]})


def write_block(results, *, config: DetectConfig):
    """Ray task: write one block's detections file, then its images file (the commit). Returns a
    one-row summary (images, ok, error, detections)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    num_images = results.num_rows
    if num_images == 0:  # e.g. a block of extension-less objects that were not images: nothing to commit
        return block_summary(0, 0, 0)
    block_id = block_id_of(results["image_uri"].to_pylist(), results["etag"].to_pylist(), config.weights_digest)
    parent = pc.list_parent_indices(results["det_label"])  # box -> row
    labels = pc.list_flatten(results["det_label"])
    num_boxes = len(labels)
    corners = pc.list_flatten(results["det_box"]).to_numpy().reshape(num_boxes, 4)
    class_names = pa.array(config.class_names, pa.string())
    detections = pa.table(
        {
            "image_uri": pc.take(results["image_uri"], parent),
            "label": labels,
            "label_name": pc.take(class_names, labels),
            "score": pc.list_flatten(results["det_score"]),
            "x1": corners[:, 0], "y1": corners[:, 1], "x2": corners[:, 2], "y2": corners[:, 3],
            "image_width": pc.take(results["width"], parent),
            "image_height": pc.take(results["height"], parent),
            "model": pa.array([config.model_name] * num_boxes, pa.string()),
            "weights_digest": pa.array([config.weights_digest] * num_boxes, pa.string()),
            "block_id": pa.array([block_id] * num_boxes, pa.string()),
        },
        schema=detections_schema(),
    )
    now = _dt.datetime.now(_dt.UTC)
    ok = pc.equal(results["status"], "ok")
    images = pa.table(
        {
            "image_uri": results["image_uri"],
            "size_bytes": results["size_bytes"],
            "etag": results["etag"],
            "width": pc.if_else(ok, results["width"], None),
            "height": pc.if_else(ok, results["height"], None),
            "num_detections": pc.list_value_length(results["det_label"]).cast(pa.int32()),
            "status": results["status"],
            "error": pc.if_else(ok, pa.scalar(None, pa.string()), results["error"]),
            "model": pa.array([config.model_name] * num_images, pa.string()),
            "weights_digest": pa.array([config.weights_digest] * num_images, pa.string()),
            "block_id": pa.array([block_id] * num_images, pa.string()),
            "processed_at": pa.array([now] * num_images, pa.timestamp("us", tz="UTC")),
        },
        schema=images_schema(),
    )
    commit_block(config.output_uri, config.run_id, block_id, detections, images, config.storage_options)
    num_ok = int(pc.sum(ok.cast(pa.int64())).as_py() or 0)
    nodes = {}
    if "node_id" in results.column_names:
        for entry in results["node_id"].value_counts().to_pylist():
            nodes[entry["values"]] = int(entry["counts"])
    return block_summary(num_images, num_ok, num_boxes, nodes)
