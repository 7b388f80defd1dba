"""Bulk detection over an image bucket (local folder or ``s3://bucket/prefix``) with Ray Data -> Parquet.

Pipeline (streaming, so decoding and inference overlap)::

    list (driver, fsspec)  ->  read + decode + resize/normalise (CPU tasks; in the actors on CPU-only nodes)
        ->  batched inference (actor pool, model loaded once per actor)
        ->  write block (tasks; in the actors on CPU-only nodes)

Outputs under ``OUTPUT`` (zstd Parquet, Hive-partitioned by ``run_id``):

- ``detections/run_id=R/block-<id>.parquet``: one row per box (image_uri, label, label_name, score,
  x1, y1, x2, y2 in original pixels, image_width, image_height, model, weights_digest, block_id).
- ``images/run_id=R/block-<id>.parquet``: one row per input object (image_uri, size_bytes, etag,
  width, height, num_detections, status ``ok``/``error``, error, model, weights_digest, block_id,
  processed_at).

Exactly once. ``images/`` is the ledger. A block's detections file is written first and its images
file last, each atomically (local: temp file + rename; S3: one PUT), so a block counts as committed
exactly when its images file exists. Readers (``ssd_core.query`` views, the incremental check) only see
detections whose ``(run_id, block_id)`` has an images file; a rerun deletes detections files left
without one by a kill. The block id is a hash of the block's (image_uri, etag) pairs and the weights
digest, so a retried task rewrites the same files. The ledger key is (image_uri, etag, size_bytes,
weights_digest): a run processes only objects not yet in it, so new or changed objects and new weights
are processed, everything else is skipped. One writer per output at a time.

What becomes an ``error`` row (the run never stops for a bad input):
zero-byte objects; objects that are not images (e.g. text named ``.jpg``); truncated or corrupt files;
headers announcing more than ``max_pixels`` pixels (decompression bombs; checked before decoding);
objects deleted or unreadable between listing and reading.

What is decoded and detected (``ok``): grayscale (L, LA, 1) -> replicated to RGB; CMYK and YCbCr ->
converted to RGB by PIL; 16-bit grayscale PNG/TIFF -> scaled to 8 bit (value / 257, rounded); 16-bit
RGB PNG -> PIL's 8-bit RGB; RGBA, LA and palette images with transparency -> alpha dropped (colour
as stored); animated GIF/WebP -> first frame; EXIF orientation applied before anything else; WebP,
TIFF, BMP read by PIL.

Listing is recursive. An object is an input if its extension is an image extension, or if it has
no extension and its first bytes are an image signature (sniffed in the read tasks; extension-less
non-images are skipped without a row).
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import io
import logging
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ssd_core import storage

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "DetectConfig",
    "ImageDecodeError",
    "decode_image",
    "sniff_image",
    "list_images",
    "weights_digest",
    "read_ledger",
    "remove_uncommitted",
    "detections_schema",
    "images_schema",
    "detect_bucket",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp"})
# PIL's own default limit (Image.MAX_IMAGE_PIXELS): about 89.5 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_SEED = 0
_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

# Leading bytes of the formats PIL reads here, for extension-less objects.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (8, b"WEBP", "webp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"BM", "bmp"),
)


class ImageDecodeError(ValueError):
    """An input object that cannot become an image; the message is the ``error`` column."""


def sniff_image(head: bytes) -> str | None:
    """Format name if ``head`` (the first >= 12 bytes of a file) starts with a known image signature."""
    for offset, signature, name in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            if name == "webp" and head[:4] != b"RIFF":
                continue
            return name
    return None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> ``uint8[H, W, 3]`` RGB with EXIF orientation applied.

    Raises ImageDecodeError for anything that is not a decodable image within ``max_pixels``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel-count guard below replaces PIL's warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header; nothing decoded yet
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels > max_pixels={max_pixels} "
                    "(possible decompression bomb)"
                )
            image.seek(0)  # animated formats: first frame
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb_array(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        # PIL reports truncated/corrupt data with these types.
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None


def _to_rgb_array(image) -> np.ndarray:
    """PIL image of any mode -> ``uint8[H, W, 3]``."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PIL may widen it to 32-bit "I"): map 0..65535 onto 0..255.
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency, then drop alpha below
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)


def weights_digest(weights: str | os.PathLike | None, arch: str | None, seed: int = DEFAULT_SEED,
                   storage_options: Mapping[str, Any] | None = None) -> str:
    """``sha256:<hex>`` of the weights file, or ``random-init-<arch>-<seed>`` without weights."""
    if weights is None:
        return f"random-init-{arch}-{seed}"
    digest = hashlib.sha256()
    with storage.open_uri(weights, "rb", storage_options) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


# ----------------------------------------------------------------------------------------- listing


def list_images(input_uri: str, storage_options: Mapping[str, Any] | None = None):
    """Recursive listing -> ``pyarrow.Table`` (image_uri, size_bytes, etag, sniff) sorted by image_uri.

    ``etag`` is the S3 ETag (quotes stripped), or the modification time in ns for local files.
    ``sniff`` marks extension-less objects whose content decides whether they are images.
    """
    import pyarrow as pa

    fs, root = storage.filesystem_for(input_uri, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"input not found: {input_uri}")
    if fs.isfile(root):
        entries = {root: fs.info(root)}
    else:
        entries = fs.find(root, detail=True)
    s3 = storage.is_s3(input_uri)
    uris, sizes, etags, sniff = [], [], [], []
    for path, info in sorted(entries.items()):
        if info.get("type") == "directory":
            continue
        name = path.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue  # hidden files, our own temp files
        extension = os.path.splitext(name)[1].lower()
        if extension and extension not in IMAGE_EXTENSIONS:
            continue
        uris.append(f"s3://{path}" if s3 else path)
        sizes.append(int(info.get("size") or 0))
        etags.append(_etag_of(info))
        sniff.append(not extension)
    return pa.table(
        {
            "image_uri": pa.array(uris, pa.string()),
            "size_bytes": pa.array(sizes, pa.int64()),
            "etag": pa.array(etags, pa.string()),
            "sniff": pa.array(sniff, pa.bool_()),
        }
    )


def _etag_of(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if isinstance(mtime, _dt.datetime):
        return mtime.isoformat()
    return f"mtime:{int(float(mtime) * 1e9)}" if mtime is not None else ""


# ------------------------------------------------------------------------------------------ ledger

_LEDGER_KEY = ["image_uri", "etag", "size_bytes", "weights_digest"]


def _dataset(output_uri: str, table: str, storage_options: Mapping[str, Any] | None):
    """pyarrow dataset over OUTPUT/<table> (Hive partitions), or None if nothing is there yet."""
    import pyarrow.dataset as pads

    fs, root = storage.pyarrow_filesystem_for(storage.join_uri(output_uri, table), storage_options)
    try:
        return pads.dataset(
            root, filesystem=fs, format="parquet", partitioning="hive", exclude_invalid_files=False,
            ignore_prefixes=[".", "_"],
        )
    except FileNotFoundError:
        return None


def read_ledger(output_uri: str, storage_options: Mapping[str, Any] | None = None, columns=None):
    """Committed ``images/`` rows (every images file is a commit), or an empty table."""
    import pyarrow as pa

    dataset = _dataset(output_uri, "images", storage_options)
    if dataset is None or not dataset.files:
        columns = columns or _LEDGER_KEY
        schema = images_schema()
        return pa.table({name: pa.array([], schema.field(name).type) for name in columns})
    return dataset.to_table(columns=columns)


def remove_uncommitted(output_uri: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Delete detections files whose block has no images file (left by a killed run); returns how many."""
    fs, root = storage.filesystem_for(output_uri, storage_options)
    committed = {_block_key(path) for path in _parquet_files(fs, f"{root}/images")}
    orphans = [path for path in _parquet_files(fs, f"{root}/detections") if _block_key(path) not in committed]
    if orphans:
        fs.rm(orphans)
        log.info("removed %d uncommitted detections file(s) from an interrupted run", len(orphans))
    return len(orphans)


def _parquet_files(fs, root: str) -> list[str]:
    try:
        return [p for p in fs.find(root) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")]
    except FileNotFoundError:
        return []


def _block_key(path: str) -> tuple[str, str]:
    """(run partition dir, file name) of a block file."""
    parts = path.rstrip("/").split("/")
    return parts[-2], parts[-1]


# --------------------------------------------------------------------------------- output schemas


def detections_schema():
    """Schema of the files under ``detections/`` (``run_id`` comes from the Hive partition)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image_uri", pa.string()),
            ("label", pa.int32()),
            ("label_name", pa.string()),
            ("score", pa.float32()),
            ("x1", pa.float32()),
            ("y1", pa.float32()),
            ("x2", pa.float32()),
            ("y2", pa.float32()),
            ("image_width", pa.int32()),
            ("image_height", pa.int32()),
            ("model", pa.string()),
            ("weights_digest", pa.string()),
            ("block_id", pa.string()),
        ]
    )


def images_schema():
    """Schema of the files under ``images/`` (the ledger; ``run_id`` comes from the Hive partition)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image_uri", pa.string()),
            ("size_bytes", pa.int64()),
            ("etag", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("num_detections", pa.int32()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("model", pa.string()),
            ("weights_digest", pa.string()),
            ("block_id", pa.string()),
            ("processed_at", pa.timestamp("us", tz="UTC")),
        ]
    )


# ------------------------------------------------------------------------------------ the job


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
    preprocess_spec: Any = None  # picklable resize/normalise spec from the model (see _preprocessor_of)


def _load_model(config: DetectConfig):
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


def _inference_model(config: DetectConfig, device):
    from ssd_core.inference import optimize_for_inference

    return optimize_for_inference(_load_model(config), device=device)


@dataclass(frozen=True)
class PreprocessSpec:
    """What the CPU tasks need to resize and normalise exactly as ``model.preprocess`` does."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, model) -> PreprocessSpec:
        return cls(tuple(model.size), tuple(model.image_mean.tolist()), tuple(model.image_std.tolist()))


def _read_and_preprocess(listing, *, config: DetectConfig) -> dict[str, np.ndarray]:
    """Ray task: listing rows (pyarrow) -> decoded, resized, normalised batch.

    Returns columns image_uri, size_bytes, etag, width, height, status, error and
    pixels float32[B, 3, H, W] (zeros for error rows, which inference skips).
    """
    import torch

    from ssd_core.model import group_by_shape, resize_normalize

    spec: PreprocessSpec = config.preprocess_spec
    rows = listing.to_pydict()
    uris = rows["image_uri"]
    fs, _ = storage.filesystem_for(uris[0], config.storage_options) if uris else (None, None)
    paths = [storage.filesystem_for(uri, config.storage_options)[1] for uri in uris]
    # One call fetches the whole block; s3fs runs the GETs concurrently.
    contents = fs.cat(paths, on_error="return") if paths else {}

    keep, widths, heights, statuses, errors = [], [], [], [], []
    decoded: list[np.ndarray | None] = []  # uint8[H, W, 3], None for error rows
    for index, (path, sniff) in enumerate(zip(paths, rows["sniff"])):
        data = contents.get(path, FileNotFoundError(path))
        if isinstance(data, BaseException):
            if sniff:
                continue
            keep.append(index)
            widths.append(0), heights.append(0), statuses.append("error")
            errors.append(_read_error_message(data))
            decoded.append(None)
            continue
        if sniff and sniff_image(data[:16]) is None:
            continue  # extension-less and not an image: not an input
        keep.append(index)
        try:
            pixels = decode_image(data, max_pixels=config.max_pixels)
        except ImageDecodeError as exc:
            widths.append(0), heights.append(0), statuses.append("error"), errors.append(str(exc))
            decoded.append(None)
            continue
        heights.append(pixels.shape[0]), widths.append(pixels.shape[1])
        statuses.append("ok"), errors.append("")  # "" not None: object columns of None do not survive Ray
        decoded.append(pixels)

    batch = np.zeros((len(keep), 3, *spec.size), dtype=np.float32)
    ok_index = [i for i, pixels in enumerate(decoded) if pixels is not None]
    # The model's own grouping, resize and normalisation, on 0..255 values (x / 255 folded into mean and
    # std): [3, H, W] views of the uint8 arrays stack into channels_last, so the float copy is the only one.
    mean, std = 255.0 * torch.tensor(spec.mean), 255.0 * torch.tensor(spec.std)
    views = [torch.from_numpy(decoded[i]).permute(2, 0, 1) for i in ok_index]
    for group, stacked in group_by_shape(views):
        batch_rows = [ok_index[g] for g in group]
        batch[batch_rows] = resize_normalize(stacked.float(), spec.size, mean, std, normalize_first=False).numpy()
    take = np.asarray(keep, dtype=np.int64)
    return {
        "image_uri": np.asarray(uris, dtype=object)[take],
        "size_bytes": np.asarray(rows["size_bytes"], dtype=np.int64)[take],
        "etag": np.asarray(rows["etag"], dtype=object)[take],
        "width": np.asarray(widths, dtype=np.int32),
        "height": np.asarray(heights, dtype=np.int32),
        "status": np.asarray(statuses, dtype=object),
        "error": np.asarray(errors, dtype=object),
        "pixels": batch,
    }


def _read_error_message(exc: BaseException) -> str:
    """Error text for an object that could not be read (no credentials or endpoints in it)."""
    if isinstance(exc, FileNotFoundError):
        return "object not found when reading (deleted after listing?)"
    if isinstance(exc, PermissionError):
        return "permission denied when reading"
    return f"cannot read object: {type(exc).__name__}"


class _Detector:
    """Ray actor: loads the model once, then turns batches into per-image detections.

    With ``owns_blocks`` (CPU-only nodes) it takes a block of listing rows, reads, decodes and detects
    them ``batch_size`` at a time, writes the block's files and returns the block's summary row;
    otherwise it takes the preprocessed batches of the read tasks and returns their detections for the
    write tasks (GPU nodes). See ``_run_pipeline`` for why.
    """

    def __init__(self, config: DetectConfig, owns_blocks: bool = False) -> None:
        import torch

        from ssd_core.allocator import tune_allocator

        tune_allocator()
        torch.set_num_threads(max(1, config.threads_per_actor))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = _inference_model(config, self.device)
        self.config, self.owns_blocks = config, owns_blocks
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
            self.detect(_read_and_preprocess(batch.slice(start, step), config=self.config))
            for start in range(0, batch.num_rows, step)
        ]
        return _write_block(pa.concat_tables(parts), config=self.config) if parts else _block_summary(0, 0, 0)

    def detect(self, batch: Mapping[str, np.ndarray]):
        """A preprocessed batch (see `_read_and_preprocess`) -> results table: the image columns pass
        through; adds list columns det_label, det_score and det_box (4 per box)."""
        import pyarrow as pa
        import torch

        ok = batch["status"] == "ok"
        count = len(ok)
        labels, scores, boxes = [], [], []
        counts = np.zeros(count, dtype=np.int32)
        if ok.any():
            pixels = batch["pixels"]
            if not (ok.all() and pixels.flags.writeable):
                pixels = pixels[ok]  # a boolean index copies (into a writable array): once, and only if needed
            pixels = torch.from_numpy(pixels).to(self.device)
            sizes = torch.from_numpy(np.stack([batch["height"][ok], batch["width"][ok]], axis=1).astype(np.int64))
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
                "width": pa.array(batch["width"], pa.int32()),
                "height": pa.array(batch["height"], pa.int32()),
                "status": pa.array(batch["status"].tolist(), pa.string()),
                "error": pa.array(batch["error"].tolist(), pa.string()),
                "det_label": pa.ListArray.from_arrays(offsets, pa.array(label_values)),
                "det_score": pa.ListArray.from_arrays(offsets, pa.array(score_values)),
                "det_box": pa.ListArray.from_arrays(pa.array(offsets.to_numpy() * 4), pa.array(box_values)),
            }
        )


def _block_summary(images: int, ok: int, detections: int):
    """The one-row table a written block reports to the driver."""
    import pyarrow as pa

    return pa.table({"images": [images], "ok": [ok], "error": [images - ok], "detections": [detections]})


def block_id_of(image_uris, etags, weights_digest: str) -> str:
    """Deterministic id of a block: a retried or re-run block with the same content gets the same files."""
    digest = hashlib.sha256(weights_digest.encode())
    for uri, etag in sorted(zip(image_uris, etags)):
        digest.update(f"\n{uri}\t{etag}".encode())
    return digest.hexdigest()[:20]


def _parquet_bytes(table, row_group_size: int = 256_000) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def _write_block(results, *, config: DetectConfig):
    """Ray task: write one block's detections file, then its images file (the commit). Returns a
    one-row summary (images, ok, error, detections)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    num_images = results.num_rows
    if num_images == 0:  # e.g. a block of extension-less objects that were not images: nothing to commit
        return _block_summary(0, 0, 0)
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
    name = f"block-{block_id}.parquet"
    partition = f"run_id={config.run_id}"
    storage.atomic_write_bytes(
        storage.join_uri(config.output_uri, "detections", partition, name), _parquet_bytes(detections),
        config.storage_options,
    )
    # Written last: this file is the commit of the whole block.
    storage.atomic_write_bytes(
        storage.join_uri(config.output_uri, "images", partition, name), _parquet_bytes(images),
        config.storage_options,
    )
    num_ok = int(pc.sum(ok.cast(pa.int64())).as_py() or 0)
    return _block_summary(num_images, num_ok, num_boxes)


def default_run_id() -> str:
    """``YYYYmmddTHHMMSSZ-xxxxxx``: sortable and unique enough for one writer."""
    return f"{_dt.datetime.now(_dt.UTC):%Y%m%dT%H%M%SZ}-{os.urandom(3).hex()}"


def _validate_run_id(run_id: str) -> str:
    if not _RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run_id {run_id!r}: use letters, digits, '_', '.', '-' (up to 128, no leading symbol)")
    return run_id


def pending_objects(listing, ledger, digest: str):
    """Listing rows whose (image_uri, etag, size_bytes, weights_digest) is not in the ledger."""
    import pyarrow as pa

    keyed = listing.append_column("weights_digest", pa.array([digest] * listing.num_rows, pa.string()))
    done = ledger.select(_LEDGER_KEY).group_by(_LEDGER_KEY).aggregate([])
    pending = keyed.join(done, keys=_LEDGER_KEY, join_type="left anti")
    return pending.drop_columns(["weights_digest"]).sort_by("image_uri")


def _worker_storage_options(storage_options, *uris: str) -> dict[str, Any]:
    """The caller's options plus the S3 endpoint resolved here, so Ray workers started before the
    environment was set still reach the same endpoint (the endpoint is not a secret; keys stay in the
    credential chain)."""
    options = dict(storage_options or {})
    endpoint = storage.s3_endpoint_from_env()
    if endpoint and any(storage.is_s3(uri) for uri in uris) and "endpoint_url" not in options:
        options["endpoint_url"] = endpoint
    return options


def _init_ray(num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)


def detect_bucket(
    input_uri: str,
    output_uri: str,
    *,
    arch: str | None = None,
    weights: str | None = None,
    batch_size: int = 16,
    score_threshold: float = 0.3,
    run_id: str | None = None,
    num_actors: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    precision: str = "auto",
    rows_per_file: int = 1024,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Detect objects in every image under ``input_uri`` not yet processed with these weights, writing
    Parquet under ``output_uri`` (see the module docstring). Returns the summary: run_id, images_seen
    (objects listed), images_new (not yet in the ledger), images_skipped, ok, error, not_images,
    detections, seconds, images_per_s, model, weights_digest.

    ``weights``: one of our checkpoints (``arch`` may be omitted) or a foreign state_dict for ``arch``;
    None means random initialisation (seeded; for demos and tests only).
    """
    import ray
    import torch

    if weights is None and arch is None:
        raise ValueError("detect: give --arch (and usually --weights)")
    if batch_size < 1 or rows_per_file < 1:
        raise ValueError(f"batch_size ({batch_size}) and rows_per_file ({rows_per_file}) must be >= 1")
    if weights is None:
        log.warning(
            "NO WEIGHTS GIVEN: %s is randomly initialised (seed %d); detections are meaningless. "
            "Pass --weights for real results.", arch, seed,
        )
    elif not storage.exists(weights, storage_options):
        raise FileNotFoundError(f"weights file not found: {weights}")
    run_id = _validate_run_id(run_id or default_run_id())
    started = time.perf_counter()

    digest = weights_digest(weights, arch, seed, storage_options)
    model = _load_model(
        DetectConfig(output_uri, run_id, arch, weights, "", digest, [], score_threshold=score_threshold,
                     precision="fp32", seed=seed)
    )
    listing = list_images(input_uri, storage_options)
    remove_uncommitted(output_uri, storage_options)
    ledger = read_ledger(output_uri, storage_options, columns=_LEDGER_KEY)
    pending = pending_objects(listing, ledger, digest)
    log.info("%d objects listed under %s, %d to process", listing.num_rows, input_uri, pending.num_rows)

    summary: dict[str, Any] = {
        "run_id": run_id, "model": model.arch, "weights_digest": digest, "images_seen": listing.num_rows,
        "images_new": pending.num_rows, "images_skipped": listing.num_rows - pending.num_rows,
        "ok": 0, "error": 0, "detections": 0,
    }
    if pending.num_rows:
        gpus = torch.cuda.device_count()
        _init_ray()
        cpus = max(1, int(ray.available_resources().get("CPU", os.cpu_count() or 1)))
        num_actors = num_actors or (gpus if gpus else cpus)  # CPU: one single-threaded actor per CPU
        block_rows = batch_size if gpus else cpu_block_rows(pending.num_rows, batch_size, rows_per_file, num_actors)
        # An actor with no block to work on would only cost its start-up; the others get its threads.
        num_actors = min(num_actors, -(-pending.num_rows // block_rows))
        config = DetectConfig(
            output_uri=output_uri, run_id=run_id, arch=arch or model.arch, weights=weights, model_name=model.arch,
            weights_digest=digest, class_names=list(model.class_names), batch_size=batch_size,
            rows_per_file=rows_per_file, score_threshold=score_threshold, precision=precision, seed=seed,
            max_pixels=max_pixels, threads_per_actor=1 if gpus else max(1, cpus // num_actors),
            storage_options=_worker_storage_options(storage_options, input_uri, output_uri),
            preprocess_spec=PreprocessSpec.of(model),
        )
        del model
        _run_pipeline(pending, config, block_rows=block_rows, num_actors=num_actors, use_gpu=gpus > 0,
                      summary=summary, progress=progress)
    # Extension-less objects whose content was not an image (checked anew each run: they have no row).
    summary["not_images"] = summary["images_new"] - summary["ok"] - summary["error"]
    seconds = time.perf_counter() - started
    summary["seconds"] = round(seconds, 3)
    summary["images_per_s"] = round((summary["ok"] + summary["error"]) / seconds, 3) if seconds > 0 else 0.0
    return summary


def cpu_block_rows(num_pending: int, batch_size: int, rows_per_file: int, num_actors: int) -> int:
    """Images per block on CPU-only nodes, where a block is read, detected and written by one actor as
    one file pair: ``rows_per_file``, but small enough that each actor gets at least four blocks (so no
    actor sits idle at the end while another finishes a big one), rounded up to whole batches."""
    batches_per_actor_share = -(-num_pending // (4 * max(1, num_actors) * batch_size))
    return max(1, min(rows_per_file, batches_per_actor_share * batch_size))


def _run_pipeline(pending, config: DetectConfig, *, block_rows: int, num_actors: int, use_gpu: bool,
                  summary: dict, progress: bool) -> None:
    """Ray Data: read/decode -> inference actors -> write tasks, consumed as summaries. Reading and
    decoding run in CPU tasks before GPU actors, and inside the actors on CPU-only nodes."""
    import ray
    from tqdm.auto import tqdm

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours below counts images, not blocks
    context.enable_operator_progress_bars = False
    listing_blocks = [pending.slice(start, block_rows) for start in range(0, pending.num_rows, block_rows)]
    # from_blocks keeps our blocks as they are and takes their metadata here; from_arrow would run a
    # remote task per block for it (booting worker processes before anything useful starts).
    dataset = ray.data.from_blocks(listing_blocks)
    if use_gpu:
        # GPU nodes: CPU tasks read and decode while the GPU actors infer. num_cpus differs from the
        # actors' on purpose: equal remote args would let Ray fuse decoding into the inference actor.
        dataset = dataset.map_batches(
            _read_and_preprocess, batch_size=None, batch_format="pyarrow", fn_kwargs={"config": config},
            num_cpus=0.5,
        ).map_batches(
            _Detector, batch_size=config.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"config": config}, compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=0, num_gpus=1,
        )
        # Writing is light (a few Parquet files per 1024 images) and must not wait for the GPU actors.
        dataset = dataset.map_batches(_write_block, batch_size=config.rows_per_file, batch_format="pyarrow",
                                      fn_kwargs={"config": config}, num_cpus=0.5)
    else:
        # CPU-only nodes: one single-threaded actor per CPU reads, decodes and infers; decoding and
        # inference overlap across actors. Measured on the first 2-core reference machine (ssdlite320,
        # 640x480 JPEGs), steady state: 70-78 img/s this way against 47-55 with read tasks feeding one
        # 2-thread actor: the 20 MB float batches no longer go through the object store, and two
        # one-thread models used two cores better than one two-thread model (2 x 64 against 96 img/s).
        # The actors write their blocks' files too: a separate write stage needs worker processes of its
        # own, and each boots (Python, Ray, Ray Data: 2.7 s of CPU here) while the cores are busy, once
        # when the first file is due and again for the last one, after the detectors have finished.
        dataset = dataset.map_batches(
            _Detector, batch_size=None, batch_format="pyarrow",
            fn_constructor_kwargs={"config": config, "owns_blocks": True},
            compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=1,
        )
    with tqdm(total=pending.num_rows, unit="img", desc="detect", disable=not progress) as bar:
        for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            counts = {name: int(sum(block[name].to_pylist())) for name in ("images", "ok", "error", "detections")}
            for name in ("ok", "error", "detections"):
                summary[name] += counts[name]
            bar.update(counts["images"])
            bar.set_postfix(ok=summary["ok"], error=summary["error"], boxes=summary["detections"])
