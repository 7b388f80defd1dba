"""Bulk detection: decoding of bad/unusual inputs, listing, the ledger, and end-to-end Ray Data runs on
local folders and a real moto S3 server, checked against the model called directly and DuckDB."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import boto3
import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageOps
from s3_server import FAKE_SECRET, moto_s3, ray_local, s3_bucket  # noqa: F401

from ssd_core import bulk
from ssd_core.bulk import detect_bucket
from ssd_core.images import ImageDecodeError, decode_image, sniff_image

REPO = Path(__file__).resolve().parents[1]
ARCH = "ssdlite320_mobilenet_v3_large"
SCORE = 0.3
CAP = 300  # ssdlite320's detections per image


# ------------------------------------------------------------------------------- image fixtures


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth noise: blocks of colour, so JPEG keeps it and the model sees structure.
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, channels), dtype=np.uint8)
    return np.kron(small, np.ones((16, 16, 1), dtype=np.uint8))[:height, :width]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR announces width x height (valid CRC) with almost no pixel data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def _exif_rotated_jpeg(seed: int) -> bytes:
    image = Image.fromarray(_noise(120, 200, seed))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    return _encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def _animated_gif() -> bytes:
    red = Image.new("RGB", (64, 48), (255, 0, 0))
    blue = Image.new("RGB", (64, 48), (0, 0, 255))
    return _encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)


def good_images() -> dict[str, bytes]:
    """Valid images of every kind the module docstring promises to detect on (name -> bytes)."""
    rgba = Image.fromarray(_noise(96, 128, 3, channels=4), "RGBA")
    palette = Image.fromarray(_noise(100, 90, 4)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    gray16 = Image.fromarray(_noise(80, 100, 5, 1)[..., 0].astype(np.uint16) * 256 + 3)  # mode I;16
    return {
        "photos/a.jpg": _encode(Image.fromarray(_noise(480, 640, 0)), "JPEG", quality=92),
        "photos/nested/b.JPEG": _encode(Image.fromarray(_noise(300, 200, 1)), "JPEG", quality=92),
        "gray.png": _encode(Image.fromarray(_noise(90, 120, 2, 1)[..., 0], "L"), "PNG"),
        "cmyk.jpg": _encode(Image.fromarray(_noise(100, 140, 6, 4), "CMYK"), "JPEG", quality=95),
        "gray16.png": _encode(gray16, "PNG"),
        "rgba.png": _encode(rgba, "PNG"),
        "palette.png": _encode(palette, "PNG", transparency=0),
        "animated.gif": _animated_gif(),
        "rotated.jpg": _exif_rotated_jpeg(7),
        "pic.webp": _encode(Image.fromarray(_noise(100, 100, 8)), "WEBP", lossless=True),
        "pic.tiff": _encode(Image.fromarray(_noise(64, 96, 9)), "TIFF"),
        "no_extension_jpeg": _encode(Image.fromarray(_noise(64, 64, 10)), "JPEG"),
    }


def bad_images() -> dict[str, bytes]:
    """Inputs that must become error rows (name -> bytes)."""
    full = _encode(Image.fromarray(_noise(200, 300, 11)), "JPEG")
    return {
        "bad/truncated.jpg": full[: len(full) // 2],
        "bad/empty.jpg": b"",
        "bad/text.jpg": b"this is not an image, just text named .jpg\n" * 10,
        "bad/bomb.png": _png_header_only(100_000, 100_000),
    }


IGNORED = {"notes.txt": b"not an input", "no_extension_text": b"plain text without an extension"}


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def reference_rgb(data: bytes) -> np.ndarray:
    """Independent decode for valid images: PIL with EXIF transpose, then RGB (16-bit: value / 257)."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode.startswith("I"):
        gray = np.rint(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


# ------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("name", sorted(good_images()))
def test_decode_valid_images_match_pil(name):
    data = good_images()[name]
    pixels = decode_image(data)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    np.testing.assert_array_equal(pixels, reference_rgb(data))


def test_decode_special_cases_have_the_documented_meaning():
    rotated = decode_image(_exif_rotated_jpeg(7))
    assert rotated.shape[:2] == (200, 120)  # 200x120 stored, displayed rotated
    gif = decode_image(_animated_gif())
    assert tuple(gif[0, 0]) == (255, 0, 0)  # first frame
    gray16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert decode_image(_encode(gray16, "PNG")).max() == 255  # scaled, not clipped garbage
    half = Image.fromarray(np.full((4, 4), 32896, np.uint16))
    assert int(decode_image(_encode(half, "PNG"))[0, 0, 0]) == 128


@pytest.mark.parametrize(
    "name, message",
    [("bad/truncated.jpg", "cannot decode"), ("bad/empty.jpg", "empty"), ("bad/text.jpg", "not a recognised"),
     ("bad/bomb.png", "too large")],
)
def test_decode_bad_inputs_raise(name, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(bad_images()[name])


def test_bomb_is_rejected_from_the_header_before_decoding():
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="10000000000 pixels"):
        decode_image(_png_header_only(100_000, 100_000))
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(_encode(Image.new("RGB", (50, 50)), "PNG"), max_pixels=2000)


def test_sniff_image():
    assert sniff_image(good_images()["no_extension_jpeg"][:16]) == "jpeg"
    assert sniff_image(good_images()["pic.webp"][:16]) == "webp"
    assert sniff_image(good_images()["pic.tiff"][:16]) == "tiff"
    assert sniff_image(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert sniff_image(b"hello world, text") is None


def test_prediction_and_bulk_see_the_same_pixels(tmp_path):
    """One decoder: `ssd predict`'s reader, bulk's read tasks and its actor-side JPEG path give the same
    uint8 RGB for the awkward cases (16-bit PNG, EXIF-rotated JPEG, palette PNG with transparency, CMYK)."""
    from ssd_core.images import apply_orientation, jpeg_header
    from ssd_core.predict import read_image

    files = {name: good_images()[name] for name in ("gray16.png", "rotated.jpg", "palette.png", "cmyk.jpg")}
    write_tree(tmp_path, files)
    for name, data in files.items():
        reference = reference_rgb(data)
        np.testing.assert_array_equal(decode_image(data), reference)
        np.testing.assert_array_equal(read_image(tmp_path / name), reference)
    # The actor path takes the plain JPEG only; its orientation and size match the decoder's.
    (height, width), orientation = jpeg_header(files["rotated.jpg"], 10**8)
    stored = torch.from_numpy(np.asarray(Image.open(io.BytesIO(files["rotated.jpg"])).convert("RGB")).copy())
    oriented = apply_orientation(stored.permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert oriented.shape[:2] == (height, width)
    np.testing.assert_array_equal(oriented, reference_rgb(files["rotated.jpg"]))
    assert jpeg_header(files["cmyk.jpg"], 10**8) is None


# ------------------------------------------------------------------------------ listing, ledger


def test_list_images_filters_by_extension_and_marks_sniffing(tmp_path):
    write_tree(tmp_path, {**good_images(), **bad_images(), **IGNORED, ".hidden.jpg": b"x"})
    listing = bulk.list_images(str(tmp_path))
    names = [uri.removeprefix(f"{tmp_path}/") for uri in listing["image_uri"].to_pylist()]
    expected = sorted(set(good_images()) | set(bad_images()) | {"no_extension_text"})
    assert names == expected
    sniffed = {n for n, s in zip(names, listing["sniff"].to_pylist()) if s}
    assert sniffed == {"no_extension_jpeg", "no_extension_text"}
    sizes = dict(zip(names, listing["size_bytes"].to_pylist()))
    assert sizes["bad/empty.jpg"] == 0 and sizes["photos/a.jpg"] == len(good_images()["photos/a.jpg"])


def test_pending_objects_key_is_uri_etag_size_and_weights():
    listing = pa.table({"image_uri": ["a", "b", "c", "d"], "size_bytes": [1, 2, 3, 4], "etag": ["x", "y", "z", "w"],
                        "sniff": [False] * 4})
    ledger = pa.table({"image_uri": ["a", "b", "c", "d"], "etag": ["x", "CHANGED", "z", "w"],
                       "size_bytes": [1, 2, 3, 40], "weights_digest": ["W", "W", "W", "OTHER"]})
    pending = bulk.pending_objects(listing, ledger, "W")
    assert pending["image_uri"].to_pylist() == ["b", "d"]
    assert bulk.pending_objects(listing, ledger, "NEW")["image_uri"].to_pylist() == ["a", "b", "c", "d"]


def test_cpu_blocks_are_whole_batches_shared_out_and_capped_by_rows_per_file():
    assert bulk.cpu_block_rows(1536, 16, 1024, num_actors=2) == 192  # 8 blocks: 4 per actor
    assert bulk.cpu_block_rows(1537, 16, 1024, num_actors=2) == 208  # rounded up to whole batches
    assert bulk.cpu_block_rows(10**6, 16, 1024, num_actors=2) == 1024  # big buckets: one file per 1024 images
    assert bulk.cpu_block_rows(5, 16, 1024, num_actors=2) == 16
    assert bulk.cpu_block_rows(1000, 4, 6, num_actors=2) == 6


def test_block_id_is_order_independent_and_weight_specific():
    a = bulk.block_id_of(["u1", "u2"], ["e1", "e2"], "W")
    assert a == bulk.block_id_of(["u2", "u1"], ["e2", "e1"], "W")
    assert a != bulk.block_id_of(["u1", "u2"], ["e1", "e2"], "W2")
    assert a != bulk.block_id_of(["u1", "u2"], ["e1", "CHANGED"], "W")


# --------------------------------------------------------------------------- topology, metadata


def _node(name: str, cpus: float, gpus: float = 0.0):
    from ssd_core.cluster import NodeResources

    return NodeResources(name, cpus, gpus)


def test_actors_are_planned_from_the_cluster_nodes_not_the_driver():
    from ssd_core.bulk.pipeline import plan_actors

    # A CPU head (where the driver runs), two GPU workers (one with two GPUs) and a CPU-only worker.
    mixed = [_node("head", 4), _node("gpu-a", 8, 1), _node("gpu-b", 16, 2), _node("cpu", 32)]
    plan = plan_actors(mixed, 10_000, batch_size=16, rows_per_file=1024)
    assert (plan.use_gpu, plan.num_gpus_per_actor, plan.min_actors, plan.max_actors) == (True, 1.0, 3, 3)
    assert plan.block_rows == 16 and plan.threads_per_actor == 1
    half = plan_actors(mixed, 10_000, batch_size=16, rows_per_file=1024, num_gpus_per_actor=0.5)
    assert (half.num_gpus_per_actor, half.max_actors) == (0.5, 6)  # two actors per GPU
    third = plan_actors(mixed, 10_000, batch_size=16, rows_per_file=1024, num_gpus_per_actor=0.4)
    assert third.max_actors == 2 + 5  # 2 fit in one GPU, 5 in two: an actor never spans GPUs of two nodes
    # Autoscaling: a GPU cluster that has no GPU node up yet still gets GPU actors when asked for.
    empty = plan_actors([_node("head", 2)], 10_000, batch_size=16, rows_per_file=1024, num_gpus_per_actor=1,
                        max_actors=8)
    assert (empty.use_gpu, empty.min_actors, empty.max_actors) == (True, 1, 8)
    grow = plan_actors(mixed, 10_000, batch_size=16, rows_per_file=1024, min_actors=2, max_actors=10)
    assert (grow.min_actors, grow.max_actors) == (2, 10)
    # No GPU anywhere: one single-threaded CPU actor per CPU of the whole cluster.
    cpus = plan_actors([_node("head", 2), _node("w", 6)], 10**6, batch_size=16, rows_per_file=1024)
    assert (cpus.use_gpu, cpus.num_gpus_per_actor, cpus.max_actors, cpus.threads_per_actor) == (False, 0.0, 8, 1)
    assert cpus.block_rows == 1024
    forced = plan_actors(mixed, 10**6, batch_size=16, rows_per_file=1024, num_gpus_per_actor=0)
    assert (forced.use_gpu, forced.max_actors) == (False, 60)
    # A small input: never more actors than blocks; the idle CPUs become threads (up to one node's worth).
    small = plan_actors([_node("head", 2), _node("w", 6)], 20, batch_size=16, rows_per_file=1024)
    assert (small.max_actors, small.threads_per_actor, small.block_rows) == (2, 4, 16)
    assert plan_actors(mixed, 10_000, batch_size=16, rows_per_file=1024, num_actors=5).min_actors == 5
    with pytest.raises(ValueError, match="min"):
        plan_actors(mixed, 10_000, batch_size=16, rows_per_file=1024, min_actors=4, max_actors=2)


def test_model_metadata_without_building_the_model(tmp_path, checkpoint, monkeypatch):
    from ssd_core import build_model, zoo

    torch.manual_seed(0)
    foreign = build_model("ssd300_vgg16", num_classes=5)
    torch.save(foreign.state_dict(), tmp_path / "foreign.pt")
    expected = {
        (str(checkpoint), None): build_model(ARCH, weights=str(checkpoint)),
        (str(tmp_path / "foreign.pt"), "ssd300_vgg16"): build_model("ssd300_vgg16", weights=str(tmp_path / "foreign.pt")),
        (None, ARCH): build_model(ARCH),
    }

    def no_building(*args, **kwargs):
        raise AssertionError("the metadata reader built a model")

    monkeypatch.setattr(zoo, "assemble", no_building)
    for (weights, arch), model in expected.items():
        meta = zoo.read_model_metadata(weights, arch)
        assert meta.arch == model.arch and meta.num_classes == model.num_classes
        assert list(meta.class_names) == model.class_names
        assert meta.size == tuple(model.size)
        assert meta.image_mean == tuple(model.image_mean.tolist()) and meta.image_std == tuple(model.image_std.tolist())
    with pytest.raises(ValueError, match="not ssd300_vgg16"):
        zoo.read_model_metadata(str(checkpoint), "ssd300_vgg16")
    with pytest.raises(ValueError, match="architecture"):
        zoo.read_model_metadata(str(tmp_path / "foreign.pt"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_jpegs_decoded_in_the_actor_match_the_read_tasks(tmp_path, checkpoint, device):
    """GPU actors decode plain JPEGs themselves (nvjpeg on a GPU; torchvision's CPU decoder on the CPU):
    same pixels, sizes and statuses as the read tasks' PIL path, EXIF orientation included."""
    from ssd_core.bulk.stages import DetectConfig, Detector, PreprocessSpec, read_and_preprocess
    from ssd_core.zoo import read_model_metadata

    gray_jpeg = _encode(Image.fromarray(_noise(70, 90, 12, 1)[..., 0], "L"), "JPEG", quality=95)
    files = {name: data for name, data in {**good_images(), **bad_images()}.items()
             if name.endswith((".jpg", ".JPEG")) or name == "no_extension_jpeg"}
    files["gray.jpg"] = gray_jpeg
    write_tree(tmp_path / "in", files)
    listed = bulk.list_images(str(tmp_path / "in"))
    common = dict(output_uri=str(tmp_path / "out"), run_id="r", arch=None, weights=str(checkpoint), model_name=ARCH,
                  weights_digest="d", class_names=[], preprocess_spec=PreprocessSpec.of(read_model_metadata(str(checkpoint))))
    on_cpu = read_and_preprocess(listed, config=DetectConfig(**common))
    deferred_config = DetectConfig(**common, decode_in_actor=True)
    deferred = read_and_preprocess(listed, config=deferred_config)
    names = [uri.rsplit("/", 1)[-1] for uri in deferred["image_uri"]]
    decoded_later = {n for n, data in zip(names, deferred["encoded"]) if len(data)}
    assert decoded_later == {"a.jpg", "b.JPEG", "rotated.jpg", "no_extension_jpeg", "gray.jpg"}  # not CMYK, broken
    # Rows the actor decodes carry no pixels through the object store; the others carry theirs as bytes.
    pixel_bytes = {n: len(p) for n, p, status in zip(names, deferred["pixels"], deferred["status"]) if status == "ok"}
    size = deferred_config.preprocess_spec.size
    assert pixel_bytes == {n: 0 if n in decoded_later else 3 * size[0] * size[1] * 4 for n in pixel_bytes}
    assert set(pixel_bytes) - decoded_later  # a CMYK JPEG: decoded by the read task
    threads = torch.get_num_threads()
    try:
        detector = Detector(deferred_config, device=device)
    finally:
        torch.set_num_threads(threads)
    pixels, status, error, width, height = detector.decode_on_device(deferred)
    assert pixels.device.type == device
    assert status.tolist() == on_cpu["status"].tolist() and error.tolist() == on_cpu["error"].tolist()
    assert width.tolist() == on_cpu["width"].tolist() and height.tolist() == on_cpu["height"].tolist()
    pixels = pixels.cpu().numpy()
    if device == "cpu":  # both libjpeg-turbo: equal up to a level of 255 (x 255 / std 127.5 in the model's units)
        np.testing.assert_allclose(pixels, on_cpu["pixels"], atol=2.5 / 127.5)
    else:  # nvjpeg's IDCT and chroma upsampling are its own: close on average, not to the level
        assert np.abs(pixels - on_cpu["pixels"]).mean() <= 1.5 / 127.5
    results = detector.detect(deferred)
    assert results["status"].to_pylist() == on_cpu["status"].tolist()


# ---------------------------------------------------------------------------------- end to end


def calibrated_checkpoint(path: Path, seed: int = 0) -> Path:
    """Our checkpoint of a seeded random ssdlite320 whose scores spread out (BN statistics calibrated
    on images like the test ones, classifier scaled), so boxes exist above SCORE and depend on the image."""
    from ssd_core import build_model
    from ssd_core.zoo import checkpoint_payload

    torch.manual_seed(seed)
    model = build_model(ARCH)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        calibration = [torch.from_numpy(_noise(320, 320, 100 + i)).permute(2, 0, 1).float() / 255 for i in range(4)]
        batch, _ = model.preprocess(calibration)
        model.forward_head(batch)
        for name, param in model.head.classification_head.named_parameters():
            if name.endswith(".1.weight") and param.dim() == 4:
                param.mul_(4.0)
    torch.save(checkpoint_payload(model.eval()), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return calibrated_checkpoint(tmp_path_factory.mktemp("weights") / "calibrated.pt")


def direct_detections(checkpoint: Path, files: dict[str, bytes],
                      precision: str = "fp32") -> dict[str, dict[str, np.ndarray]]:
    """The model called directly (fp32, or int8 through its inference copy; batch of one) on an
    independent decode of each valid file."""
    from ssd_core import load_model
    from ssd_core.inference import optimize_for_inference

    model = load_model(str(checkpoint), precision=precision).eval()
    if precision == "int8":
        model = optimize_for_inference(model)
    model.postprocess_config.score_thresh = SCORE
    out = {}
    with torch.inference_mode():
        for name, data in files.items():
            image = torch.from_numpy(reference_rgb(data).copy()).permute(2, 0, 1).float() / 255
            result = model([image])[0]
            out[name] = {key: value.numpy() for key, value in result.items()}
    return out


def read_parquet_with_duckdb(output: str, table: str):
    """Independent reader: DuckDB over our files (Hive partitions) -> pyarrow.Table."""
    return duckdb.sql(
        f"SELECT * FROM read_parquet('{output}/{table}/*/*.parquet', hive_partitioning=true)"
    ).to_arrow_table()


def _match(got: np.ndarray, ref: np.ndarray, box_tol: float) -> bool:
    """Rows [score, label, x1, y1, x2, y2]: a one-to-one pairing within tolerance exists (greedy: ties in
    score may come out in either order)."""
    unused = list(range(len(got)))
    for row in ref:
        close = [j for j in unused if abs(got[j, 0] - row[0]) <= 1e-3 and got[j, 1] == row[1]
                 and np.abs(got[j, 2:] - row[2:]).max() <= box_tol]
        if not close:
            return False
        unused.remove(close[0])
    return not unused


def assert_same_detections(output: str, expected: dict, root: str) -> None:
    detections = read_parquet_with_duckdb(output, "detections").to_pylist()
    by_image: dict[str, list] = {}
    for row in detections:
        by_image.setdefault(row["image_uri"].removeprefix(root + "/"), []).append(
            [row["score"], row["label"], row["x1"], row["y1"], row["x2"], row["y2"]]
        )
    total = compared = seen = 0
    for name, ref in expected.items():
        got = np.array(by_image.get(name, []), dtype=np.float64).reshape(-1, 6)
        want = np.concatenate([ref["scores"][:, None], ref["labels"][:, None], ref["boxes"]], axis=1)
        assert abs(len(got) - len(want)) <= 2, name
        seen += len(got)
        if len(want) >= CAP:
            continue  # near-saturated scores (~1.0): which CAP boxes are kept is down to fp32 noise
        compared += 1
        # A box scoring within fp32 noise of the threshold may fall on either side of it.
        got, want = got[got[:, 0] > SCORE + 2e-3], want[want[:, 0] > SCORE + 2e-3]
        # Boxes are in original pixels: 1e-3 relative to the image side (the model's own fp32 noise).
        assert _match(got, want.astype(np.float64), box_tol=1e-3 * 640), name
        total += len(got)
    assert total > 0 and compared >= len(expected) // 3, "too few images compared"
    assert seen == len(detections)  # no rows for images outside `expected`


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, checkpoint, ray_local):  # noqa: F811
    """One full local run over every kind of input; returns (input_dir, output_dir, summary)."""
    root = tmp_path_factory.mktemp("bucket")
    write_tree(root, {**good_images(), **bad_images(), **IGNORED})
    output = tmp_path_factory.mktemp("out")
    summary = detect_bucket(
        str(root), str(output), weights=str(checkpoint), batch_size=4, score_threshold=SCORE,
        precision="fp32", rows_per_file=6, run_id="run-1", progress=False,
    )
    return root, output, summary


def test_local_run_rows_statuses_and_boxes(local_run, checkpoint):
    root, output, summary = local_run
    good, bad = good_images(), bad_images()
    assert summary["images_seen"] == len(good) + len(bad) + 1  # + no_extension_text, sniffed away
    assert summary["ok"] == len(good) and summary["error"] == len(bad)
    assert summary["weights_digest"].startswith("sha256:")
    images = read_parquet_with_duckdb(str(output), "images").to_pylist()
    by_name = {row["image_uri"].removeprefix(f"{root}/"): row for row in images}
    assert sorted(by_name) == sorted(set(good) | set(bad))
    assert {row["run_id"] for row in images} == {"run-1"}
    for name in good:
        row = by_name[name]
        assert row["status"] == "ok" and row["error"] is None, (name, row["error"])
        assert (row["height"], row["width"]) == reference_rgb(good[name]).shape[:2]
    assert by_name["bad/empty.jpg"]["error"].startswith("empty file")
    assert "too large" in by_name["bad/bomb.png"]["error"]
    assert all(by_name[name]["status"] == "error" and by_name[name]["width"] is None for name in bad)
    expected = direct_detections(checkpoint, good)
    assert_same_detections(str(output), expected, str(root))
    assert sum(row["num_detections"] for row in images) == summary["detections"]
    # Hive layout, zstd.
    files = sorted(p.relative_to(output).parts[:2] for p in output.rglob("*.parquet"))
    assert {f[1] for f in files} == {"run_id=run-1"} and {f[0] for f in files} == {"detections", "images"}
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(next(output.rglob("images/*/*.parquet"))).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_int8_checkpoint_runs_compiled_in_the_actors(tmp_path, checkpoint, ray_local):  # noqa: F811
    """An `ssd quantize` checkpoint runs in int8 in the bulk actors, each compiling the network on its
    first batch: the detections of the int8 model called directly, not those of its fp32 weights."""
    from ssd_core import load_model
    from ssd_core.quantize import calibrate
    from ssd_core.zoo import checkpoint_payload

    model = load_model(str(checkpoint), precision="fp32")
    calibration = [torch.from_numpy(_noise(320, 320, 200 + i)).permute(2, 0, 1).float() / 255 for i in range(4)]
    calibrate(model, [model.preprocess(calibration)[0]])
    int8 = tmp_path / "int8.pt"
    torch.save(checkpoint_payload(model), int8)
    good = good_images()
    write_tree(tmp_path / "in", good)
    summary = detect_bucket(str(tmp_path / "in"), str(tmp_path / "out"), weights=str(int8), batch_size=4,
                            num_actors=1, score_threshold=SCORE, progress=False)  # auto: the checkpoint's int8
    assert summary["ok"] == len(good) and summary["error"] == 0
    assert_same_detections(str(tmp_path / "out"), direct_detections(int8, good, precision="int8"), str(tmp_path / "in"))
    with pytest.raises(AssertionError):
        assert_same_detections(str(tmp_path / "out"), direct_detections(int8, good), str(tmp_path / "in"))


def test_incremental_runs_process_only_new_or_changed(local_run, checkpoint, tmp_path):
    root, output, _ = local_run
    again = detect_bucket(str(root), str(output), weights=str(checkpoint), batch_size=4, score_threshold=SCORE,
                          precision="fp32", progress=False)
    # Only the extension-less text object is looked at again (it has no row: it is not an image).
    assert (again["images_new"], again["not_images"], again["ok"], again["error"]) == (1, 1, 0, 0)
    # New object and a changed one (new size and mtime).
    (root / "added.jpg").write_bytes(good_images()["photos/a.jpg"])
    (root / "gray.png").write_bytes(_encode(Image.new("L", (50, 40), 9), "PNG"))
    third = detect_bucket(str(root), str(output), weights=str(checkpoint), batch_size=4, score_threshold=SCORE,
                          precision="fp32", progress=False, run_id="run-3")
    assert third["images_new"] == 3 and third["ok"] == 2
    images = read_parquet_with_duckdb(str(output), "images")
    rows = [r for r in images.to_pylist() if r["run_id"] == "run-3"]
    assert sorted(r["image_uri"].rsplit("/", 1)[-1] for r in rows) == ["added.jpg", "gray.png"]
    # New weights: everything again.
    other = calibrated_checkpoint(tmp_path / "other.pt", seed=1)
    fourth = detect_bucket(str(root), str(output), weights=str(other), batch_size=8, score_threshold=SCORE,
                           precision="fp32", progress=False)
    assert fourth["images_new"] == third["images_seen"] == len(good_images()) + len(bad_images()) + 2
    assert fourth["ok"] + fourth["error"] == fourth["images_new"] - 1


def test_object_deleted_between_listing_and_reading(tmp_path, checkpoint, monkeypatch, ray_local):  # noqa: F811
    write_tree(tmp_path / "in", {"keep.jpg": good_images()["photos/a.jpg"], "gone.jpg": good_images()["cmyk.jpg"]})
    from ssd_core.bulk import pipeline

    real_find = pipeline.find_pending

    def find_then_delete(*args, **kwargs):
        pending = real_find(*args, **kwargs)
        (tmp_path / "in" / "gone.jpg").unlink()
        return pending

    monkeypatch.setattr(pipeline, "find_pending", find_then_delete)
    summary = detect_bucket(str(tmp_path / "in"), str(tmp_path / "out"), weights=str(checkpoint),
                            score_threshold=SCORE, precision="fp32", progress=False)
    assert (summary["ok"], summary["error"]) == (1, 1)
    rows = {r["image_uri"].rsplit("/", 1)[-1]: r for r in read_parquet_with_duckdb(str(tmp_path / "out"), "images").to_pylist()}
    assert rows["gone.jpg"]["status"] == "error" and "not found" in rows["gone.jpg"]["error"]


def test_s3_end_to_end_with_env_endpoint(moto_s3, s3_bucket, checkpoint, ray_local, tmp_path):  # noqa: F811
    client = boto3.client("s3", endpoint_url=moto_s3)
    files = {k: v for k, v in good_images().items() if k in ("photos/a.jpg", "cmyk.jpg", "no_extension_jpeg")}
    files.update({"bad/text.jpg": bad_images()["bad/text.jpg"], "notes.txt": b"x"})
    for name, data in files.items():
        client.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=data)
    output = f"s3://{s3_bucket}/out"
    summary = detect_bucket(f"s3://{s3_bucket}/in", output, weights=str(checkpoint), batch_size=2,
                            score_threshold=SCORE, precision="fp32", progress=False)
    assert (summary["ok"], summary["error"]) == (3, 1)
    assert FAKE_SECRET not in json.dumps(summary)
    # Independent check: download what we wrote with boto3 and read it with DuckDB locally.
    local = tmp_path / "mirror"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")["Contents"]]
    for key in keys:
        target = local / key.removeprefix("out/")
        target.parent.mkdir(parents=True, exist_ok=True)
        body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert FAKE_SECRET.encode() not in body
        target.write_bytes(body)
    images = read_parquet_with_duckdb(str(local), "images").to_pylist()
    assert sorted(r["image_uri"] for r in images) == sorted(f"s3://{s3_bucket}/in/{n}" for n in files if n != "notes.txt")
    etags = {r["image_uri"]: r["etag"] for r in images}
    head = client.head_object(Bucket=s3_bucket, Key="in/cmyk.jpg")
    assert etags[f"s3://{s3_bucket}/in/cmyk.jpg"] == head["ETag"].strip('"')
    expected = direct_detections(checkpoint, {k: v for k, v in files.items() if k in good_images()})
    assert_same_detections(str(local), expected, f"s3://{s3_bucket}/in")
    again = detect_bucket(f"s3://{s3_bucket}/in", output, weights=str(checkpoint), batch_size=2,
                          score_threshold=SCORE, precision="fp32", progress=False)
    assert again["images_new"] == 0


@pytest.mark.slow
def test_killed_run_then_rerun_gives_exactly_once(tmp_path, checkpoint):
    """SIGKILL a real `ssd detect` after some blocks are committed, rerun, compare with a clean run."""
    source = _noise(480, 640, 0)
    files = {f"img{i:03d}.jpg": _encode(Image.fromarray(np.roll(source, 37 * i, axis=1)), "JPEG") for i in range(36)}
    write_tree(tmp_path / "in", files)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "ssd_core.cli", "detect", "--input", str(tmp_path / "in"), "--output",
               str(output), "--weights", str(checkpoint), "--batch-size", "2", "--rows-per-file", "2",
               "--score-threshold", str(SCORE), "--precision", "fp32", "--no-progress"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command + ["--run-id", "killed"], cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(list(output.glob("images/*/*.parquet"))) < 2:
            assert process.poll() is None, "detect exited before it could be killed"
            assert time.monotonic() < deadline, "no blocks committed in time"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        process.wait()
    committed = len(list(output.glob("images/*/*.parquet")))
    assert committed < len(files) / 2, "the run finished before it was killed; nothing was tested"
    # Simulate the other kill point too: detections written, ledger not (must be ignored/removed).
    orphan = output / "detections" / "run_id=killed" / "block-orphan.parquet"
    orphan.write_bytes(next(output.glob("detections/*/*.parquet")).read_bytes())

    rerun = subprocess.run(command + ["--run-id", "rerun"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # The summary is the last JSON line; Ray may forward a worker's own output to stdout after it.
    summary = json.loads([line for line in rerun.stdout.splitlines() if line.startswith('{"run_id"')][-1])
    assert summary["images_skipped"] >= committed * 2 - 2 and summary["images_new"] + summary["images_skipped"] == 36
    assert not orphan.exists()

    images = read_parquet_with_duckdb(str(output), "images")
    uris = images["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)) == len(files)
    assert set(images["status"].to_pylist()) == {"ok"}
    detections = read_parquet_with_duckdb(str(output), "detections")
    per_image = duckdb.sql("SELECT image_uri, count(*) AS n FROM detections GROUP BY 1").to_arrow_table()
    counts = dict(zip(per_image["image_uri"].to_pylist(), per_image["n"].to_pylist()))
    ledger = dict(zip(uris, images["num_detections"].to_pylist()))
    assert all(counts.get(uri, 0) == n for uri, n in ledger.items())
    assert detections.num_rows == sum(ledger.values()) > 0
    keys = duckdb.sql("SELECT count(*) FROM (SELECT DISTINCT image_uri, label, score, x1, y1, x2, y2 FROM detections)").fetchall()[0][0]
    assert keys == detections.num_rows  # no duplicated boxes
    # Any engine reading the table paths recursively sees the same rows: nothing staged, nothing orphaned.
    import pandas as pd

    assert len(pd.read_parquet(output / "detections")) == detections.num_rows
    assert sorted(pd.read_parquet(output / "images")["image_uri"]) == sorted(uris)
    assert not list((output / "_staging").rglob("*.parquet"))
