"""The one image decoder: encoded bytes -> ``uint8[H, W, 3]`` RGB, used by prediction and bulk detection.

No Ray, no torch: the decode runs in any process (a CLI, a Ray task, a DataLoader worker).

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

__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_MAX_PIXELS", "ImageDecodeError", "decode_image", "sniff_image", "to_rgb_array"]

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
