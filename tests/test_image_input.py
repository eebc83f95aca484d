"""The door checks for image-to-video conditioning images (torch-free, like the scheduler)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from scheduler.core.image_checks import ImageInputError, load_and_check_image, parse_image_source

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 4_000_000}


def encoded(image: PIL.Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def noise(width: int = 64, height: int = 48, seed: int = 0) -> PIL.Image.Image:
    """Incompressible pixels, so cutting a file anywhere past its header cuts pixel data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def with_png_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR claiming another size (CRC fixed up): a header that lies about its pixels."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    return png[:8] + png[8:12] + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


def refused(data: bytes, match: str, **limits: int) -> ImageInputError:
    with pytest.raises(ImageInputError, match=match) as raised:
        load_and_check_image(data, **{**LIMITS, **limits})
    assert "\n" not in str(raised.value)
    return raised.value


# --- load_and_check_image -------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "WEBP"])
def test_lossless_images_come_back_pixel_for_pixel(image_format: str) -> None:
    image = noise()
    options = {"lossless": True} if image_format == "WEBP" else {}
    loaded = load_and_check_image(encoded(image, image_format, **options), **LIMITS)

    assert (loaded.mode, loaded.size) == ("RGB", (64, 48))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


def test_a_png_file_on_disk_loads(tmp_path: Path) -> None:
    path = tmp_path / "frame.png"
    noise().save(path)

    assert load_and_check_image(path.read_bytes(), **LIMITS).size == (64, 48)


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "1", "CMYK"])
def test_other_8_bit_modes_are_converted_to_rgb(mode: str) -> None:
    image = noise().convert(mode)
    image_format = "JPEG" if mode == "CMYK" else "PNG"
    loaded = load_and_check_image(encoded(image, image_format), **LIMITS)

    assert (loaded.mode, loaded.size) == ("RGB", (64, 48))


def test_alpha_is_dropped_not_blended() -> None:
    rgba = PIL.Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    loaded = load_and_check_image(encoded(rgba, "PNG"), **LIMITS)

    assert loaded.getpixel((0, 0)) == (10, 200, 30)


def test_exif_orientation_is_applied() -> None:
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    loaded = load_and_check_image(encoded(noise(64, 48), "JPEG", exif=exif), **LIMITS)

    assert loaded.size == (48, 64)


@pytest.mark.parametrize(
    ("mode", "image_format"), [("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF")], ids=["16-bit", "32-bit", "float"]
)
def test_high_bit_depth_modes_are_refused(mode: str, image_format: str) -> None:
    image = PIL.Image.new(mode, (8, 8))
    refused(encoded(image, image_format), r"image mode '(I;16|I|F)' \(16-bit or float pixels\) is not supported")


@pytest.mark.parametrize("data", [b"", b"hello, world", b"\x89PNG\r\n\x1a\n", b"%PDF-1.7\n"])
def test_data_that_is_not_an_image_is_refused(data: bytes) -> None:
    refused(data, "the data is not an image Pillow can read; send a PNG, JPEG or WebP file")


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_images_are_refused(image_format: str) -> None:
    whole = encoded(noise(256, 256), image_format)
    load_and_check_image(whole, **LIMITS)  # the uncut file is fine

    refused(whole[: len(whole) // 2], "the image data is truncated or corrupt .*; send the whole file")


def test_too_many_bytes_are_refused_before_decoding() -> None:
    data = encoded(noise(), "PNG")
    refused(
        data, f"the image is {len(data):,} bytes, over the farm's limit of 1,000; send a smaller file", max_bytes=1000
    )
    assert load_and_check_image(data, **{**LIMITS, "max_bytes": len(data)}).size == (64, 48)


def test_too_many_pixels_are_refused() -> None:
    data = encoded(noise(100, 100), "PNG")
    refused(
        data, "the image is 100x100 = 10,000 pixels, over the farm's limit of 9,999; downscale it", max_pixels=9_999
    )
    assert load_and_check_image(data, **{**LIMITS, "max_pixels": 10_000}).size == (100, 100)


def test_pixels_are_counted_from_the_header_before_any_decoding() -> None:
    # A 64x48 file whose header claims 12000x10000: decoding would fail (or, were the
    # data there, allocate 360 MB); the check must fire on the header alone.
    bomb = with_png_size(encoded(noise(), "PNG"), 12_000, 10_000)
    refused(bomb, "the image is 12000x10000 = 120,000,000 pixels, over the farm's limit of 4,000,000")


def test_headers_past_pillows_own_bomb_limit_get_the_same_refusal() -> None:
    bomb = with_png_size(encoded(noise(), "PNG"), 1_000_000, 1_000_000)
    refused(bomb, r"the image has over [\d,]+ pixels, over the farm's limit of 4,000,000; downscale it")


# --- parse_image_source ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/data/frames/first.png", ("path", "/data/frames/first.png")),
        ("frames/first frame.png", ("path", "frames/first frame.png")),
        ("C:/frames/first.png", ("path", "C:/frames/first.png")),
        ("file:///data/first%20frame.png", ("path", "/data/first frame.png")),
        ("file://localhost/data/first.png", ("path", "/data/first.png")),
        ("s3://renders/inputs/job-7/first.png", ("s3", "renders/inputs/job-7/first.png")),
        ("S3://my.bucket-1/a", ("s3", "my.bucket-1/a")),
        ("https://example.com/cat.jpg?size=large", ("http", "https://example.com/cat.jpg?size=large")),
        ("http://10.0.0.5:8080/cat.png", ("http", "http://10.0.0.5:8080/cat.png")),
    ],
)
def test_sources_that_are_accepted(source: str, expected: tuple[str, str]) -> None:
    assert parse_image_source(source) == expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("ftp://example.com/cat.png", r"image source scheme 'ftp://' is not supported; use a local path, s3://"),
        ("gs://bucket/cat.png", r"scheme 'gs://' is not supported"),
        ("data:image/png;base64,iVBORw0KGgo=", r"scheme 'data://' is not supported"),
        ("javascript:alert(1)", r"scheme 'javascript://' is not supported"),
        ("", "the image source is empty"),
        ("   ", "the image source is empty"),
        ("/data/first.png\nsecond", "contains control characters"),
        ("file://fileserver/share/cat.png", "names host 'fileserver'; only local files"),
        ("s3://Bad_Bucket/cat.png", "does not name a valid S3 bucket"),
        ("s3:///cat.png", "does not name a valid S3 bucket"),
        ("s3://renders", "does not name an object; write it as s3://bucket/key"),
        ("s3://renders/", "does not name an object"),
        ("https:///cat.png", "has no host"),
        ("https://user:secret@example.com/cat.png", "carries credentials"),
    ],
)
def test_sources_that_are_refused(source: str, message: str) -> None:
    with pytest.raises(ImageInputError, match=message) as raised:
        parse_image_source(source)
    assert "\n" not in str(raised.value)


def test_image_input_errors_are_value_errors() -> None:
    assert issubclass(ImageInputError, ValueError)
