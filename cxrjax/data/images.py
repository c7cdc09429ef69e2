"""Decode NIH PNGs into 8-bit grayscale, whatever mode and depth they were stored in.

The release is mostly 8-bit grayscale, but a share is RGBA (R=G=B, alpha 255) and some
mirrors hold 16-bit files. All of them must become the same 8-bit picture, and anything
that is not a whole, readable image must fail with the file named.
"""

from __future__ import annotations

import cv2
import numpy as np

from cxrjax.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"
# A header can claim any size in a few hundred bytes (a decompression bomb: a 875 KB
# 30000x30000 PNG takes 1.9 GB to decode), so the size is read from IHDR and checked
# before decoding. NIH's images are 1024x1024; this leaves room for 5792x5792.
MAX_PIXELS = 1 << 25


class ImageError(InputError):
    """An image file that cannot become a correct training example."""


def decode_to_gray8(data: bytes, source: str) -> np.ndarray:
    """PNG bytes → uint8 [H, W]. RGB(A) with equal channels keeps its values; unequal
    channels use ITU-R 601 luma; a non-opaque alpha is composited over black; 16-bit
    values map linearly onto 0..255 (v / 257, rounded)."""
    return decode_noting_color(data, source)[0]


def decode_noting_color(data: bytes, source: str) -> tuple[np.ndarray, bool]:
    """`decode_to_gray8`, and whether the image had colour (unequal RGB channels), which
    no ChestX-ray14 file has: `prepare` counts such images instead of hiding them."""
    if not data.startswith(PNG_SIGNATURE):
        raise ImageError(f"{source}: not a PNG file (bad signature)")
    # libpng may hand back a partial picture from a cut-off file; the IEND chunk is the
    # only proof the file is whole.
    if not data.rstrip(b"\0").endswith(PNG_END):
        raise ImageError(f"{source}: truncated PNG (no IEND chunk)")
    width, height = png_size(data, source)
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{source}: PNG header says {width}x{height} pixels, above the {MAX_PIXELS:,}-pixel limit "
            "(not decoded: a chest X-ray is far smaller, a file this size is damaged or a decompression bomb)"
        )
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # OpenCV's own refusals (e.g. its pixel limit)
        raise ImageError(f"{source}: unreadable PNG ({str(e).strip().splitlines()[-1]})") from e
    if image is None:
        raise ImageError(f"{source}: unreadable PNG (corrupt data)")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"{source}: unsupported PNG sample type {image.dtype}")
    if image.ndim == 2:
        return image, False
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageError(f"{source}: unsupported PNG layout with shape {image.shape}")
    color = image[..., :3]
    is_color = not ((color[..., 0] == color[..., 1]).all() and (color[..., 1] == color[..., 2]).all())
    if is_color:
        gray = cv2.cvtColor(color, cv2.COLOR_BGR2GRAY)
    else:
        gray = np.ascontiguousarray(color[..., 0])
    if image.shape[2] == 4:
        alpha = image[..., 3]
        if (alpha != 255).any():
            gray = ((gray.astype(np.uint32) * alpha + 127) // 255).astype(np.uint8)
    return gray, is_color


def png_size(data: bytes, source: str) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which must come first, without decoding."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageError(f"{source}: not a valid PNG (no IHDR chunk first)")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if width == 0 or height == 0:
        raise ImageError(f"{source}: PNG header says {width}x{height} pixels")
    return width, height


def refuse_upsampling(width: int, height: int, size: int, source: str, wanted: str = "the requested") -> None:
    """An image smaller than size×size would have to be enlarged: made-up detail a model
    never trained on. `prepare`, `predict` and `evaluate --checkpoint` refuse it alike."""
    if size > min(width, height):
        raise ImageError(
            f"{source}: image is {width}x{height}, smaller than {wanted} {size}x{size}; cxrjax does not upsample"
        )


def resize_square(image: np.ndarray, size: int, source: str) -> np.ndarray:
    """Area-interpolated downscale to size×size; never upsamples silently."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    refuse_upsampling(w, h, size, source)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def to_model_size(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] → [size, size] for the model: area interpolation when shrinking (as
    `prepare` does from the source PNG), linear when enlarging. Training and inference
    both resize here, so a model sees the same pixels in both."""
    if image.shape == (size, size):
        return image
    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ImageError("PNG encoding failed")
    return buf.tobytes()


def decode_record_png(data: bytes) -> np.ndarray:
    """Fast path for the records cxrjax wrote itself: always 8-bit grayscale PNG."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ImageError("record holds an unreadable PNG")
    return image
