"""`ssd predict` on an image, a folder and a video: annotated outputs, JSON that matches the model
called directly, progress bars, and the errors users hit."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from s3_server import moto_s3, s3_bucket  # noqa: F401

from ssd_core import build_model, load_model
from ssd_core.cli import main as cli_main
from ssd_core.zoo import checkpoint_payload

CLASS_NAMES = ["__background__", "circle", "square", "triangle"]
THRESHOLD = 0.5


def _spread_scores(model) -> None:
    """Random SSDLite gives every class the same score; He init plus per-level scaling of the last
    head convolutions gives spread-out scores (no ties) and boxes near their anchors."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in")
        features = model.backbone(model.preprocess([torch.rand(3, 320, 320)])[0])
        for head, target_std in ((model.head.classification_head, 1.7), (model.head.regression_head, 0.5)):
            for predictor, feature in zip(head.module_list, features):
                conv = [m for m in predictor.modules() if isinstance(m, torch.nn.Conv2d)][-1]
                gain = target_std / float(predictor(feature).std())
                conv.weight.mul_(gain)
                conv.bias.mul_(gain)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("ssdlite320_mobilenet_v3_large", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES)
    _spread_scores(model.eval())
    path = tmp_path_factory.mktemp("weights") / "last.pt"
    torch.save(checkpoint_payload(model), path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint's model called the torchvision way, as the reference for the JSON."""
    model = load_model(str(checkpoint)).eval()
    model.postprocess_config.score_thresh = THRESHOLD

    def detect(pixels: np.ndarray) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return model([torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255])[0]

    return detect


def _image(path: Path, size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random picture (JPEG-friendly) of size (W, H), saved at ``path``; returns its pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def _assert_record_matches(record: dict, expected: dict[str, torch.Tensor]) -> None:
    assert 0 < len(record["scores"]) == len(expected["scores"]), "the test needs some detections"
    np.testing.assert_allclose(record["boxes"], expected["boxes"].numpy(), atol=0.011)
    np.testing.assert_allclose(record["scores"], expected["scores"].numpy(), atol=2e-5)
    assert record["labels"] == expected["labels"].tolist()
    assert record["label_names"] == [CLASS_NAMES[i] for i in record["labels"]]
    assert min(record["scores"]) > THRESHOLD


def _predict(*args: str) -> int:
    return cli_main(["predict", "--score-threshold", str(THRESHOLD), "--no-progress", *args])


def test_image(tmp_path, checkpoint, reference, capsys):
    pixels = _image(tmp_path / "in" / "photo.png", (410, 260), seed=1)
    out = tmp_path / "annotated.png"
    assert _predict("--weights", str(checkpoint), "--input", str(tmp_path / "in" / "photo.png"),
                    "--output", str(out)) == 0
    assert "detections: " in capsys.readouterr().out
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["model"]["arch"] == "ssdlite320_mobilenet_v3_large"
    (record,) = document["images"]
    assert (record["file"], record["width"], record["height"]) == ("photo.png", 410, 260)
    _assert_record_matches(record, reference(pixels))
    annotated = np.asarray(Image.open(out).convert("RGB"))
    assert annotated.shape == pixels.shape
    assert (annotated != pixels).any(axis=2).mean() > 0.01, "boxes and labels are drawn"


def test_folder_with_progress_and_a_broken_file(tmp_path, checkpoint, reference, capsys):
    pixels = {
        "a.jpg": _image(tmp_path / "in" / "a.jpg", (320, 240), seed=2),
        "sub/b.png": _image(tmp_path / "in" / "sub" / "b.png", (200, 300), seed=3),
        "sub/c.jpg": _image(tmp_path / "in" / "sub" / "c.jpg", (320, 240), seed=4),
    }
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    code = cli_main(["predict", "--weights", str(checkpoint), "--input", str(tmp_path / "in"), "--output", str(out),
                     "--score-threshold", str(THRESHOLD), "--batch-size", "2"])
    assert code == 0
    captured = capsys.readouterr()
    assert "4/4" in captured.err, "a tqdm progress bar over the folder"
    assert "1 unreadable" in captured.out
    document = json.loads((out / "detections.json").read_text())
    records = {r["file"]: r for r in document["images"]}
    assert set(records) == {"a.jpg", "broken.jpg", "sub/b.png", "sub/c.jpg"}
    assert "not a recognised image format" in records["broken.jpg"]["error"]
    for name, image in pixels.items():
        _assert_record_matches(records[name], reference(image))
        assert Image.open(out / name).size == (image.shape[1], image.shape[0])


def _write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_video(tmp_path, checkpoint, reference):
    import av

    frames = [_image(tmp_path / "f" / f"{i}.png", (160, 120), seed=10 + i) for i in range(5)]
    _write_video(tmp_path / "clip.avi", frames, fps=12)
    out = tmp_path / "annotated.mp4"
    assert _predict("--weights", str(checkpoint), "--input", str(tmp_path / "clip.avi"), "--output", str(out),
                    "--batch-size", "2") == 0

    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(12)
        assert (stream.width, stream.height) == (160, 120)
        assert sum(1 for _ in container.decode(stream)) == 5
    with av.open(str(tmp_path / "clip.avi")) as container:  # what the model saw: the decoded frames
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    document = json.loads(out.with_suffix(".json").read_text())
    assert document["video"]["fps"] == 12.0 and document["video"]["num_frames"] == 5
    assert [f["frame"] for f in document["frames"]] == list(range(5))
    np.testing.assert_allclose([f["time"] for f in document["frames"]], np.arange(5) / 12, atol=1e-6)
    for record, pixels in zip(document["frames"], decoded):
        _assert_record_matches(record, reference(pixels))


def _error(capsys, *args: str) -> str:
    assert _predict(*args) == 1
    return capsys.readouterr().err


def test_clear_errors(tmp_path, checkpoint, capsys):
    image = tmp_path / "x.png"
    _image(image, (64, 48), seed=5)
    out = str(tmp_path / "out")
    w = str(checkpoint)

    assert "input not found: " in _error(capsys, "--weights", w, "--input", str(tmp_path / "nope.jpg"), "--output", out)
    assert "no weights given" in _error(capsys, "--input", str(image), "--output", out)
    assert "weights file not found" in _error(capsys, "--weights", str(tmp_path / "w.pt"), "--input", str(image),
                                              "--output", out)
    (tmp_path / "data.csv").write_text("a,b\n")
    assert "cannot tell what" in _error(capsys, "--weights", w, "--input", str(tmp_path / "data.csv"), "--output", out)

    bad_video = tmp_path / "broken.mp4"
    bad_video.write_bytes(b"\x00\x01 definitely not a video" * 50)
    assert f"cannot read video {bad_video}" in _error(capsys, "--weights", w, "--input", str(bad_video),
                                                      "--output", out)

    # Our checkpoint names its architecture: asking for another one is refused.
    err = _error(capsys, "--weights", w, "--arch", "ssd300_vgg16", "--input", str(image), "--output", out)
    assert "ssdlite320_mobilenet_v3_large model, not ssd300_vgg16" in err

    # A bare state_dict needs --arch, and must fit it.
    bare = tmp_path / "bare.pt"
    torch.save(load_model(w).state_dict(), bare)
    assert "pass --arch" in _error(capsys, "--weights", str(bare), "--input", str(image), "--output", out)
    err = _error(capsys, "--weights", str(bare), "--arch", "ssd300_vgg16", "--input", str(image), "--output", out)
    assert f"weights {bare} do not fit ssd300_vgg16" in err

    # A checkpoint whose head has another number of classes than it claims.
    payload = torch.load(w, weights_only=True)
    payload.update(num_classes=6, class_names=CLASS_NAMES + ["star", "ring"])
    mismatched = tmp_path / "mismatched.pt"
    torch.save(payload, mismatched)
    err = _error(capsys, "--weights", str(mismatched), "--input", str(image), "--output", out)
    assert f"weights {mismatched}" in err and "size mismatch for head.classification_head" in err
    payload.update(num_classes=4, class_names=CLASS_NAMES[:3])  # 3 names for 4 classes
    torch.save(payload, mismatched)
    err = _error(capsys, "--weights", str(mismatched), "--input", str(image), "--output", out)
    assert f"weights {mismatched}" in err and "3 class names for 4 classes" in err
    assert not Path(out).exists(), "nothing is written when the model cannot load"


# -- remote inputs: s3:// (moto's server) and http(s):// (a loopback web server), read through fsspec ----------


@pytest.fixture
def web_server(tmp_path):
    """A web server on 127.0.0.1 serving tmp_path/site with directory listings (python's http.server)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    site = tmp_path / "site"
    site.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _photos(folder: Path) -> dict[str, np.ndarray]:
    pixels = {"a.jpg": _image(folder / "a.jpg", (320, 240), seed=2),
              "sub/b.png": _image(folder / "sub" / "b.png", (200, 300), seed=3)}
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return pixels


def _check_folder(out: Path, pixels: dict[str, np.ndarray], reference, source: str) -> None:
    document = json.loads((out / "detections.json").read_text())
    assert document["input"] == source
    records = {r["file"]: r for r in document["images"]}
    assert set(records) == {"a.jpg", "broken.jpg", "sub/b.png"}
    assert "not a recognised image format" in records["broken.jpg"]["error"]
    for name, image in pixels.items():
        _assert_record_matches(records[name], reference(image))
        assert Image.open(out / name).size == (image.shape[1], image.shape[0])


def test_s3_prefix_and_object(tmp_path, checkpoint, reference, s3_bucket, capsys):  # noqa: F811
    import boto3

    local = tmp_path / "photos"
    pixels = _photos(local)
    s3 = boto3.client("s3")
    for path in local.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"photos/{path.relative_to(local).as_posix()}")
    s3.put_object(Bucket=s3_bucket, Key="photos/notes.txt", Body=b"ignored")

    source = f"s3://{s3_bucket}/photos"
    assert _predict("--weights", str(checkpoint), "--input", source, "--output", str(tmp_path / "out")) == 0
    assert "2 images" in capsys.readouterr().out
    _check_folder(tmp_path / "out", pixels, reference, source)

    single = tmp_path / "single.png"
    assert _predict("--weights", str(checkpoint), "--input", f"{source}/sub/b.png", "--output", str(single)) == 0
    (record,) = json.loads(single.with_suffix(".json").read_text())["images"]
    assert record["file"] == "b.png"
    _assert_record_matches(record, reference(pixels["sub/b.png"]))

    assert _predict("--weights", str(checkpoint), "--input", f"{source}/missing.jpg", "--output", str(single)) == 1
    assert f"input not found: {source}/missing.jpg" in capsys.readouterr().err


def test_web_folder_and_image(tmp_path, checkpoint, reference, web_server, capsys):
    site, base = web_server
    pixels = _photos(site / "photos")
    source = f"{base}/photos/"
    assert _predict("--weights", str(checkpoint), "--input", source, "--output", str(tmp_path / "out")) == 0
    _check_folder(tmp_path / "out", pixels, reference, source)

    single = tmp_path / "single.jpg"
    assert _predict("--weights", str(checkpoint), "--input", f"{base}/photos/a.jpg", "--output", str(single)) == 0
    (record,) = json.loads(single.with_suffix(".json").read_text())["images"]
    assert record["file"] == "a.jpg"
    _assert_record_matches(record, reference(pixels["a.jpg"]))
    assert _predict("--weights", str(checkpoint), "--input", f"{base}/photos/gone.jpg", "--output", str(single)) == 1
    assert "input not found" in capsys.readouterr().err
