"""Detection on an image, a folder of images or a video: annotated pictures / video plus a JSON file.

JSON layout (boxes xyxy in original pixels, labels are the model's contiguous class indices):

    {"input": ..., "model": {"arch", "weights", "score_threshold"},
     "images": [{"file": path relative to the input, "width", "height", "output": annotated file,
                 "boxes": [[x1, y1, x2, y2], ...], "labels": [...], "label_names": [...], "scores": [...]}
                | {"file", "error": why it could not be read}]}                     (image or folder)
    {"input": ..., "model": {...}, "video": {"fps", "width", "height", "num_frames", "output", "codec"},
     "frames": [{"frame": index, "time": seconds, "boxes", "labels", "label_names", "scores"}]}  (video)

Output paths: an image input with an image-suffixed ``output`` writes that file and ``output`` with a
``.json`` suffix; a video input with a video-suffixed ``output`` likewise; anything else makes
``output`` a directory holding the annotated file(s) (folder inputs keep their relative layout) and
``detections.json``. Video frames of odd width or height are padded by one black pixel on the
right / bottom (the yuv420p encoders need even sizes); boxes are unaffected.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from ssd_core.model import SSD

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"})
# Encoders to try per output container, best first (what a given PyAV wheel ships varies).
_VIDEO_CODECS = {".webm": ("libvpx-vp9", "libvpx"), ".avi": ("mpeg4", "libx264")}
_DEFAULT_VIDEO_CODECS = ("libx264", "h264", "libopenh264", "mpeg4")
# Annotated images keep their format when PIL writes it well, else become PNG.
_KEEP_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


@dataclass
class PredictResult:
    """What a prediction run wrote."""

    kind: str  # "image" | "folder" | "video"
    json_path: Path
    outputs: list[Path] = field(default_factory=list)  # annotated images or the video
    num_images: int = 0  # images or frames with detections run on them
    num_errors: int = 0  # folder images that could not be read
    num_detections: int = 0


# -- model ----------------------------------------------------------------------------------------


def load_detector(
    weights: str | None,
    *,
    arch: str | None = None,
    precision: str | None = None,
    score_threshold: float | None = None,
    device: str = "auto",
) -> SSD:
    """The model of ``weights`` optimised for inference (`optimize_for_inference`) on ``device``
    ("auto": CUDA if available, else CPU).

    ``weights``: one of our checkpoints (architecture and class names come from it), or with ``arch``
    a torchvision / NVIDIA state_dict that does not name its architecture. ``score_threshold``
    replaces the model's post-processing threshold (detections at or below it are dropped).
    Errors name the file: missing, not a detector, another architecture, classes that do not fit.
    """

    from ssd_core import build_model, load_model
    from ssd_core.inference import optimize_for_inference
    from ssd_core.precision import resolve_device

    if not weights:
        raise ValueError(
            "no weights given: pass --weights with a checkpoint from `ssd train` (RUN_DIR/last.pt), or a "
            "torchvision/NVIDIA SSD state_dict together with --arch"
        )
    from ssd_core.weights import get_weights

    named = arch is not None and get_weights(weights, arch) is not None  # a registry name (ssd weights list)
    if "://" not in str(weights) and not named and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    try:
        if arch:
            model = build_model(arch, num_classes=None, weights=str(weights), precision=precision)
        else:
            model = load_model(str(weights), precision=precision)
    except RuntimeError as exc:  # load_state_dict's shape errors: say which tensor does not fit
        raise ValueError(f"weights {weights} do not fit {arch or 'the architecture and class count they declare'}: "
                         f"{_first_size_mismatch(str(exc))}") from None
    except KeyError as exc:  # a state_dict without the head the architecture needs
        raise ValueError(f"weights {weights} do not fit {arch or 'the architecture and class count they declare'}: "
                         f"no tensor {exc}") from None
    except ValueError as exc:
        if not arch and "not an ssd_core checkpoint" in str(exc):
            from ssd_core.zoo import list_models

            raise ValueError(f"weights {weights} do not name their architecture (a torchvision/NVIDIA state_dict): "
                             f"pass --arch, one of {', '.join(list_models())}") from None
        if str(weights) in str(exc):
            raise
        raise ValueError(f"weights {weights}: {exc}") from None
    if score_threshold is not None:
        if not 0.0 <= score_threshold < 1.0:
            raise ValueError(f"score threshold must be in [0, 1), got {score_threshold}")
        model.postprocess_config = replace(model.postprocess_config, score_thresh=float(score_threshold))
    return optimize_for_inference(model, device=resolve_device(device))


def _first_size_mismatch(message: str) -> str:
    for line in message.splitlines():
        if "size mismatch" in line:
            return line.strip().rstrip(".")
    return message.splitlines()[0] if message else "cannot load the state_dict"


def detect_batch(model: SSD, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detections for images FloatTensor[3, H, W] in 0..1 (any sizes): per image boxes [N, 4] xyxy
    original pixels, labels int64 [N], scores [N], on the CPU."""
    import torch

    device = model.image_mean.device  # a buffer every copy has (the int8 one has no float parameters)
    with torch.inference_mode():
        batch, original_sizes = model.preprocess([image.to(device) for image in images])
        outputs = model.detect(batch, original_sizes)
    return [{key: value.cpu() for key, value in out.items()} for out in outputs]


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8[H, W, 3] -> FloatTensor[3, H, W] in 0..1."""
    import torch

    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)


def detection_record(detections: dict[str, torch.Tensor], class_names: Sequence[str]) -> dict[str, Any]:
    """JSON-ready columns of one image's detections (boxes rounded to 0.01 px, scores to 1e-5)."""
    labels = detections["labels"].tolist()
    return {
        "boxes": [[round(v, 2) for v in box] for box in detections["boxes"].tolist()],
        "labels": labels,
        "label_names": [class_names[i] if 0 <= i < len(class_names) else f"class_{i}" for i in labels],
        "scores": [round(v, 5) for v in detections["scores"].tolist()],
    }


def _annotate(model: SSD, pixels: np.ndarray, detections: dict[str, torch.Tensor]):
    from PIL import Image

    from ssd_core.visualize import draw_detections

    return draw_detections(
        Image.fromarray(pixels), detections["boxes"], detections["labels"], detections["scores"],
        model.class_names, score_threshold=model.postprocess_config.score_thresh,
    )


# -- inputs ---------------------------------------------------------------------------------------


def is_url(value: str | Path) -> bool:
    """True for inputs read through fsspec (s3://, https://, gs://...) rather than the local disk."""
    text = str(value)
    return "://" in text and not text.startswith("file://")


def input_kind(path: str | Path) -> str:
    """"folder", "video" or "image" by what ``path`` is (FileNotFoundError / ValueError otherwise).
    A URL is a folder (an S3 prefix, a web folder listing) unless it names an image or a video."""
    from ssd_core.images import IMAGE_EXTENSIONS

    if is_url(path):
        from ssd_core.storage import filesystem_for

        fs, inner = filesystem_for(str(path))
        suffix = PurePosixPath(str(path).split("?", 1)[0]).suffix.lower()
        if suffix in VIDEO_EXTENSIONS or suffix in IMAGE_EXTENSIONS:
            if not fs.exists(inner):
                raise FileNotFoundError(f"input not found: {path}")
            return "video" if suffix in VIDEO_EXTENSIONS else "image"
        return "folder"
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    raise ValueError(
        f"cannot tell what {path} is from its suffix {suffix or '(none)'}: expected an image "
        f"({', '.join(sorted(IMAGE_EXTENSIONS))}), a video ({', '.join(sorted(VIDEO_EXTENSIONS))}) or a folder"
    )


def read_image(path: str | Path) -> np.ndarray:
    """uint8[H, W, 3] RGB of an image file or URL (s3://, https://), EXIF orientation applied
    (ValueError naming the file)."""
    from ssd_core.images import decode_image
    from ssd_core.storage import read_bytes

    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise ValueError(f"cannot read image {path}: not found") from None
    try:
        return decode_image(data)
    except ValueError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


def _relative(path: str | Path, root: str | Path) -> PurePosixPath | Path:
    """``path`` relative to the input ``root`` (a folder, prefix or the image's own parent)."""
    if is_url(path):
        return PurePosixPath(str(path)[len(str(root).rstrip("/")):].lstrip("/"))
    return Path(path).relative_to(root) if Path(path) != Path(root) else Path(Path(path).name)


def _batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _annotated_name(relative: Path) -> Path:
    return relative if relative.suffix.lower() in _KEEP_SUFFIXES else relative.with_suffix(".png")


def _save_image(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg", ".webp") else {}
    image.save(path, **options)


def _write_json(document: dict[str, Any], records_key: str, path: Path) -> None:
    """``document`` with one line per record of ``document[records_key]`` (greppable, diffable),
    written atomically."""
    from ssd_core.storage import atomic_write_bytes

    header = json.dumps({k: v for k, v in document.items() if k != records_key}, indent=1)
    lines = ",\n".join("  " + json.dumps(record) for record in document[records_key])
    text = f'{header[:-2]},\n "{records_key}": [\n{lines}\n ]\n}}\n'
    atomic_write_bytes(path, text.encode())


def _model_info(model: SSD, weights: str | None) -> dict[str, Any]:
    return {"arch": model.arch, "weights": str(weights) if weights else None,
            "score_threshold": model.postprocess_config.score_thresh}


# -- images and folders ---------------------------------------------------------------------------


def predict_images(
    model: SSD,
    files: Sequence[str | Path],
    root: str | Path,
    output_for: Any,
    *,
    batch_size: int = 8,
    progress: bool = True,
    strict: bool = False,
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Detect in ``files`` (paths or URLs under ``root``), saving each annotated image at ``output_for(relative)``.

    Decoding runs in threads one batch ahead of inference. Unreadable files become ``{"file", "error"}``
    records (``strict``: a ValueError instead). Returns the JSON records and the annotated paths.
    """
    from tqdm import tqdm

    def load(path: str | Path) -> tuple[str | Path, np.ndarray | None, str | None]:
        try:
            return path, read_image(path), None
        except (ValueError, OSError) as exc:
            if strict:
                raise
            return path, None, str(exc)

    records: list[dict[str, Any]] = []
    written: list[Path] = []
    chunks = list(_batched(list(files), max(1, batch_size)))
    with ThreadPoolExecutor(max_workers=2) as pool, tqdm(
        total=len(files), unit="img", desc="predict", disable=not progress
    ) as bar:
        pending = pool.map(load, chunks[0]) if chunks else iter(())
        for index in range(len(chunks)):
            loaded = list(pending)
            if index + 1 < len(chunks):
                pending = pool.map(load, chunks[index + 1])  # decode the next batch during inference
            readable = [(path, pixels) for path, pixels, _ in loaded if pixels is not None]
            outputs = detect_batch(model, [_to_tensor(p) for _, p in readable]) if readable else []
            detections_of = {path: out for (path, _), out in zip(readable, outputs)}
            for path, pixels, error in loaded:
                relative = _relative(path, root)
                if error is not None:
                    log.warning("skipping %s", error)
                    records.append({"file": str(relative), "error": error})
                    continue
                detections = detections_of[path]
                target = output_for(relative)
                _save_image(_annotate(model, pixels, detections), target)
                written.append(target)
                records.append({"file": str(relative), "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
                                "output": str(target), **detection_record(detections, model.class_names)})
            bar.update(len(loaded))
    return records, written


def list_image_files(folder: str | Path) -> list[Path] | list[str]:
    """Image files under ``folder`` (recursive, sorted), by extension; URLs for a URL folder (an S3
    prefix, or a web page listing files and sub-folders as links, like a web server's index)."""
    from ssd_core.images import IMAGE_EXTENSIONS

    if is_url(folder):
        from ssd_core.storage import filesystem_for

        fs, inner = filesystem_for(str(folder))
        try:
            found = fs.find(inner.rstrip("/") + "/" if inner.startswith("http") else inner)
        except FileNotFoundError:
            raise FileNotFoundError(f"input not found: {folder}") from None
        return sorted(fs.unstrip_protocol(p) if not is_url(p) else p for p in found
                      if PurePosixPath(p.split("?", 1)[0]).suffix.lower() in IMAGE_EXTENSIONS)
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


# -- video ----------------------------------------------------------------------------------------


def _open_encoder(path: Path, fps: Fraction, width: int, height: int):
    """An output container and a video stream at ``fps`` with the first encoder this PyAV ships."""
    import av

    container = av.open(str(path), mode="w")
    for name in _VIDEO_CODECS.get(path.suffix.lower(), _DEFAULT_VIDEO_CODECS):
        try:
            stream = container.add_stream(name, rate=fps)
        except (ValueError, av.FFmpegError):  # UnknownCodecError is a ValueError
            continue
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if name in ("libx264", "h264"):
            stream.options = {"crf": "20", "preset": "veryfast"}
        return container, stream
    container.close()
    raise ValueError(f"no video encoder for {path.suffix} in this PyAV build; try an .mp4 or .avi output")


def _even_canvas(image, width: int, height: int):
    """``image`` padded (black, right/bottom) to even ``width`` x ``height``: yuv420p needs even sizes."""
    if image.size == (width, height):
        return image
    from PIL import Image

    canvas = Image.new("RGB", (width, height))
    canvas.paste(image, (0, 0))
    return canvas


def predict_video(
    model: SSD, video: Path, output: Path, *, batch_size: int = 8, progress: bool = True
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Annotate every frame of ``video`` into ``output`` at the source frame rate.

    Frames are decoded, detected ``batch_size`` at a time and encoded in order. Returns the
    video description and one JSON record per frame.
    """
    import av
    from tqdm import tqdm

    try:
        source = av.open(str(video))
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot read video {video}: {exc}") from None
    with source:
        if not source.streams.video:
            raise ValueError(f"cannot read video {video}: it has no video stream")
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"
        fps = stream.average_rate or stream.guessed_rate or Fraction(25)
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise ValueError(f"cannot read video {video}: no frame size in its header")
        even_w, even_h = width + width % 2, height + height % 2
        output.parent.mkdir(parents=True, exist_ok=True)
        sink, out_stream = _open_encoder(output, Fraction(fps), even_w, even_h)
        records: list[dict[str, Any]] = []
        pending: list[tuple[int, float | None, np.ndarray]] = []

        def flush() -> None:
            outputs = detect_batch(model, [_to_tensor(pixels) for _, _, pixels in pending])
            for (index, time, pixels), detections in zip(pending, outputs):
                annotated = _even_canvas(_annotate(model, pixels, detections), even_w, even_h)
                frame = av.VideoFrame.from_image(annotated)
                sink.mux(out_stream.encode(frame))
                seconds = time if time is not None else index / float(fps)
                records.append({"frame": index, "time": round(seconds, 6),
                                **detection_record(detections, model.class_names)})
            pending.clear()

        with sink, tqdm(total=stream.frames or None, unit="frame", desc="predict", disable=not progress) as bar:
            try:
                for index, frame in enumerate(source.decode(stream)):
                    pending.append((index, frame.time, frame.to_ndarray(format="rgb24")))
                    if len(pending) >= batch_size:
                        flush()
                        bar.update(batch_size)
            except av.FFmpegError as exc:
                raise ValueError(f"cannot read video {video} after frame {len(records) + len(pending)}: {exc}") from None
            done = len(pending)
            if pending:
                flush()
            bar.update(done)
            sink.mux(out_stream.encode())  # drain the encoder
        if not records:
            raise ValueError(f"cannot read video {video}: no frames decoded")
    info = {"fps": float(fps), "width": width, "height": height, "num_frames": len(records),
            "output": str(output), "codec": out_stream.codec_context.name}
    return info, records


# -- entry point ----------------------------------------------------------------------------------


def predict(
    model: SSD,
    input_path: str | Path,
    output: str | Path,
    *,
    batch_size: int = 8,
    progress: bool = True,
    weights: str | None = None,
) -> PredictResult:
    """Detect in an image, every image under a folder, or every frame of a video (see module doc).

    ``model`` comes from ``load_detector`` (its score threshold applies to JSON and pictures alike);
    ``weights`` is only recorded in the JSON.
    """
    from ssd_core.images import IMAGE_EXTENSIONS

    source, output = str(input_path), Path(output)
    kind = input_kind(source)
    header = {"input": source, "model": _model_info(model, weights)}
    if is_url(source):
        return _predict_url(model, source, kind, output, header, batch_size=batch_size, progress=progress)
    input_path = Path(source)

    if kind == "video":
        if output.suffix.lower() in VIDEO_EXTENSIONS:
            video_out, json_path = output, output.with_suffix(".json")
        else:
            video_out, json_path = output / f"{input_path.stem}.mp4", output / "detections.json"
        if video_out.resolve() == input_path.resolve():
            raise ValueError(f"output {video_out} would overwrite the input video")
        info, frames = predict_video(model, input_path, video_out, batch_size=batch_size, progress=progress)
        _write_json({**header, "video": info, "frames": frames}, "frames", json_path)
        return PredictResult(kind, json_path, [video_out], len(frames), 0,
                             sum(len(f["scores"]) for f in frames))

    if kind == "image":
        files, root = [input_path], input_path.parent
        if output.suffix.lower() in IMAGE_EXTENSIONS:
            if output.resolve() == input_path.resolve():
                raise ValueError(f"output {output} would overwrite the input image")
            json_path = output.with_suffix(".json")

            def output_for(relative: Path) -> Path:
                return output
        else:
            json_path = output / "detections.json"

            def output_for(relative: Path) -> Path:
                return output / _annotated_name(relative)
    else:
        files, root = _folder_files(input_path, output), input_path
        if output.resolve() == input_path.resolve():
            raise ValueError(f"output {output} is the input folder; annotated images would overwrite the inputs")
        json_path = output / "detections.json"

        def output_for(relative: Path) -> Path:
            return output / _annotated_name(relative)

    return _predict_files(model, kind, files, root, output_for, json_path, header, batch_size=batch_size,
                          progress=progress)


def _predict_url(model: SSD, source: str, kind: str, output: Path, header: dict[str, Any], *, batch_size: int,
                 progress: bool) -> PredictResult:
    """`predict` for an s3:// / https:// image, folder (prefix) or video; outputs are local as for a local
    input. A video is copied to a temporary file first (the decoder reads local files)."""
    import tempfile

    from ssd_core.images import IMAGE_EXTENSIONS

    name = PurePosixPath(source.split("?", 1)[0]).name
    if kind == "video":
        from ssd_core.storage import open_uri

        with tempfile.TemporaryDirectory(prefix="ssd-predict-") as scratch:
            local = Path(scratch) / name
            with open_uri(source) as remote, open(local, "wb") as handle:
                while chunk := remote.read(1 << 22):
                    handle.write(chunk)
            result = predict(model, local, output, batch_size=batch_size, progress=progress,
                             weights=header["model"]["weights"])
        document = json.loads(result.json_path.read_text())
        _write_json({**document, "input": source}, "frames", result.json_path)
        return result
    if kind == "image":
        files, root = [source], source[: source.rindex("/")]
        single = output.suffix.lower() in IMAGE_EXTENSIONS
        json_path = output.with_suffix(".json") if single else output / "detections.json"
    else:
        files, root = _folder_files(source, output), source
        single, json_path = False, output / "detections.json"

    def output_for(relative: PurePosixPath) -> Path:
        return output if single else output / _annotated_name(Path(relative))

    return _predict_files(model, kind, files, root, output_for, json_path, header, batch_size=batch_size,
                          progress=progress)


def _folder_files(folder: str | Path, output: Path) -> list[Path] | list[str]:
    """The images under an input folder (ValueError when there are none, or when ``output`` is a file)."""
    from ssd_core.images import IMAGE_EXTENSIONS

    files = list_image_files(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file; a folder input needs an output folder")
    return files


def _predict_files(model: SSD, kind: str, files: Sequence[str | Path], root: str | Path, output_for: Any,
                   json_path: Path, header: dict[str, Any], *, batch_size: int, progress: bool) -> PredictResult:
    """`predict_images` over an image or folder input, then its JSON file."""
    records, written = predict_images(model, files, root, output_for, batch_size=batch_size,
                                      progress=progress and kind == "folder", strict=kind == "image")
    _write_json({**header, "images": records}, "images", json_path)
    errors = sum("error" in r for r in records)
    return PredictResult(kind, json_path, written, len(records) - errors, errors,
                         sum(len(r.get("scores", ())) for r in records))
