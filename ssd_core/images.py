"""The one image decoder: encoded bytes -> ``uint8[H, W, 3]`` RGB, used by training data, prediction,
evaluation reports and bulk detection.

No Ray: the decode runs in any process (a CLI, a Ray task, a DataLoader worker). Plain JPEGs (8-bit RGB or
grayscale, the bulk of any photo collection) are decoded by ``torchvision.io.decode_jpeg`` and then oriented:
the same pixels as PIL (both are libjpeg-turbo) for less CPU. Everything else, and any JPEG that decoder
rejects, goes through PIL.

What is decoded: grayscale (L, LA, 1) -> replicated to RGB; CMYK and YCbCr -> converted to RGB by PIL;
16-bit grayscale PNG/TIFF -> scaled to 8 bit (value / 257, rounded); 16-bit RGB PNG -> PIL's 8-bit RGB;
RGBA, LA and palette images with transparency -> alpha dropped (colour as stored); animated GIF/WebP ->
first frame; EXIF orientation applied before anything else; WebP, TIFF, BMP read by PIL.

What raises ``ImageDecodeError`` (its message is meant for users, e.g. the ``error`` column of bulk
detection): zero-byte input; bytes that are not an image; truncated or corrupt files; headers announcing
more than ``max_pixels`` pixels (decompression bombs; checked before decoding).
"""

from __future__ import annotations

import io
import warnings

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "decode_image",
    "sniff_image",
    "to_rgb_array",
    "jpeg_header",
    "apply_orientation",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp"})
# PIL's own default limit (Image.MAX_IMAGE_PIXELS): about 89.5 megapixels.
DEFAULT_MAX_PIXELS = 89_478_485

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
    image = _decode_plain_jpeg(data, max_pixels)
    if image is not None:
        return image.permute(1, 2, 0).contiguous().numpy()
    return _decode_with_pil(data, max_pixels)


def _decode_with_pil(data: bytes, max_pixels: int) -> np.ndarray:
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
            return to_rgb_array(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        # PIL reports truncated/corrupt data with these types.
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None


def jpeg_header(data: bytes, max_pixels: int) -> tuple[tuple[int, int], int] | None:
    """((height, width) as displayed, EXIF orientation) of a JPEG that libjpeg-turbo (torchvision, nvjpeg)
    decodes to the same pixels as PIL (baseline or progressive, RGB or grayscale, within ``max_pixels``);
    None for anything else, which then takes the PIL path (CMYK, MPO, other formats, broken headers)."""
    from PIL import Image

    if sniff_image(data[:16]) != "jpeg" or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None  # not a JPEG, or truncated (no end-of-image marker): PIL reports it as decode_image does
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only; nothing decoded
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            width, height = image.size
            orientation = int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - whatever PIL raises on a broken header, decode_image reports it
        return None
    if width * height > max_pixels or orientation not in range(1, 9):
        return None
    return ((width, height) if orientation >= 5 else (height, width)), orientation


def apply_orientation(image, orientation: int):
    """``uint8[C, H, W]`` tensor as stored -> as displayed, for EXIF orientation 1..8 (PIL's ``exif_transpose``)."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def _decode_plain_jpeg(data: bytes, max_pixels: int):
    """A ``jpeg_header`` JPEG -> ``uint8`` tensor ``[3, H, W]`` as displayed (a view of [H, W, 3] memory); None
    for anything else, or where torchvision cannot decode it (PIL then decodes it or says why not)."""
    header = jpeg_header(data, max_pixels)
    if header is None:
        return None
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision without its image codecs
        return None
    try:
        with warnings.catch_warnings():  # torchvision marks its codecs as moving to TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    return apply_orientation(image, header[1])


def to_rgb_array(image) -> np.ndarray:
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
