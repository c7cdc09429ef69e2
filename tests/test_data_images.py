"""PNG decoding into 8-bit gray, checked against hand-computed pixel values on files
written by an independent encoder (Pillow), and the area downscale against block means."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from cxrjax.data.images import ImageError, decode_to_gray8, encode_png, resize_square


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_8bit_gray_is_kept_exactly():
    gray = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    assert np.array_equal(decode_to_gray8(_png(gray), "g.png"), gray)


def test_16bit_gray_maps_to_nearest_of_v_over_257():
    values = np.array([[0, 128, 129, 257], [385, 32767, 32768, 65535]], np.uint16)
    data = _png(values)
    assert data[24] == 16  # really a 16-bit PNG
    # By hand: 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1, 385/257 = 1.498 -> 1,
    # 32767/257 = 127.498 -> 127, 32768/257 = 127.502 -> 128.
    expected = np.array([[0, 0, 1, 1], [1, 127, 128, 255]], np.uint8)
    assert np.array_equal(decode_to_gray8(data, "w.png"), expected)


def test_rgba_with_equal_channels_and_opaque_alpha_keeps_the_gray_values():
    gray = np.random.default_rng(1).integers(0, 256, (6, 6), dtype=np.uint8)
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    data = _png(rgba)
    assert data[25] == 6  # colour type RGBA
    assert np.array_equal(decode_to_gray8(data, "r.png"), gray)


def test_alpha_is_composited_over_black():
    # Gray+alpha (colour type 4): 200 at alpha 128 -> 200 * 128 / 255 = 100.4 -> 100.
    gray = np.array([[200, 200], [10, 255]], np.uint8)
    alpha = np.array([[255, 128], [0, 255]], np.uint8)
    data = _png(np.dstack([gray, alpha]))
    assert data[25] == 4
    assert decode_to_gray8(data, "la.png").tolist() == [[200, 100], [0, 255]]
    # 16-bit RGBA: 51400/257 = 200 at alpha 32896/257 = 128 -> 100 as well.
    rgba16 = np.zeros((1, 1, 4), np.uint16)
    rgba16[...] = (51400, 51400, 51400, 32896)
    ok, buf = cv2.imencode(".png", rgba16)
    assert ok and buf.tobytes()[24] == 16
    assert decode_to_gray8(buf.tobytes(), "rgba16.png").tolist() == [[100]]


def test_colour_pixels_use_itu_601_luma():
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 0, 0] = rgb[0, 1, 1] = rgb[0, 2, 2] = 255  # pure red, green, blue
    # 0.299 * 255 = 76.2, 0.587 * 255 = 149.7, 0.114 * 255 = 29.1
    assert decode_to_gray8(_png(rgb), "c.png").tolist() == [[76, 150, 29]]


def test_palette_png_becomes_its_gray_values():
    gray = (np.arange(16, dtype=np.uint8) * 10).reshape(4, 4)
    buf = io.BytesIO()
    Image.fromarray(gray).convert("P").save(buf, format="PNG")
    data = buf.getvalue()
    assert data[25] == 3
    assert np.array_equal(decode_to_gray8(data, "p.png"), gray)


def test_broken_files_fail_with_the_file_named():
    gray = np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)
    data = encode_png(gray)
    with pytest.raises(ImageError, match=r"^cut\.png: truncated PNG \(no IEND chunk\)"):
        decode_to_gray8(data[: len(data) // 2], "cut.png")
    with pytest.raises(ImageError, match=r"^x\.jpg: not a PNG file"):
        decode_to_gray8(b"\xff\xd8\xff\xe0" + data[4:], "x.jpg")
    corrupt = bytearray(data)
    corrupt[100] ^= 0xFF  # inside the compressed pixel data, IEND still present
    with pytest.raises(ImageError, match=r"^bad\.png: unreadable PNG"):
        decode_to_gray8(bytes(corrupt), "bad.png")


@pytest.mark.parametrize("source, size", [(64, 32), (128, 32), (1024, 256)])
def test_integer_downscale_is_the_block_mean(source, size):
    image = np.random.default_rng(source).integers(0, 256, (source, source), dtype=np.uint8)
    got = resize_square(image, size, "s.png").astype(np.float64)
    k = source // size
    mean = image.reshape(size, k, size, k).mean((1, 3))
    assert np.abs(got - mean).max() <= 0.5
    exact = (mean * 2) % 2 != 1  # ties may round either way (OpenCV's choice)
    assert np.array_equal(got[exact], np.round(mean[exact]))


def test_non_integer_downscale_is_opencv_area_not_bilinear():
    image = np.random.default_rng(3).integers(0, 256, (1024, 1024), dtype=np.uint8)
    got = resize_square(image, 224, "s.png")
    area = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    linear = cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(got, area)
    assert np.abs(got.astype(int) - linear).mean() > 10  # the two really differ here


def test_no_silent_upsampling_and_same_size_is_untouched():
    image = np.zeros((32, 32), np.uint8)
    assert resize_square(image, 32, "s.png") is image
    with pytest.raises(ImageError, match=r"s\.png: image is 32x32, smaller than the requested 64x64"):
        resize_square(image, 64, "s.png")


def _bomb(width, height) -> bytes:
    """A small PNG whose header claims width x height 8-bit gray pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096, 9)  # far too little data for the claimed size
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [50000, 6000])
def test_a_huge_png_header_is_refused_before_decoding_with_the_file_named(tmp_path, side):
    """Issue 25.6: 50000x50000 used to end in cv2.error (not an input error), and a real
    6000x6000 file was decoded whole; the IHDR size is checked first."""
    from cxrjax.data.prepare import write_shard
    from cxrjax.eval.image_files import read_gray

    data = _bomb(side, side) if side == 50000 else encode_png(np.zeros((side, side), np.uint8))
    with pytest.raises(ImageError, match=rf"^big\.png: PNG header says {side}x{side} pixels, above the"):
        decode_to_gray8(data, "big.png")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=rf"^{path}: PNG header says"):  # predict, gradcam
        read_gray(path)
    task = {"path": str(tmp_path / "s.tfrecord"), "image_size": 32, "source_size": 0, "skip_bad": True}
    row = {"file": str(path), "image_id": "big.png", "labels": [0] * 14, "patient_id": 1, "follow_up": 0}
    index = write_shard({**task, "rows": [{**row, "view": "PA", "age": 50, "sex": "M"}]})
    assert [s["image_id"] for s in index["skipped"]] == ["big.png"]  # prepare --skip-bad skips it


def test_a_png_without_ihdr_first_is_an_input_error():
    data = encode_png(np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageError, match=r"^x\.png: not a valid PNG \(no IHDR chunk first\)"):
        decode_to_gray8(data[:12] + b"JUNK" + data[16:], "x.png")
