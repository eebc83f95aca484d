"""Conditioning images for image-to-video jobs: where one may come from, and the checks at the door.

Torch-free, like all of ``scheduler/``: submitting an i2v job checks its image
here, before any worker sees it, so a bad image costs one line of error and
leaves nothing behind.

- `parse_image_source` says where an image lives: a local path (or a
  ``file:`` URI), ``s3://bucket/key`` on the farm's object store, or an
  ``http(s)://`` URL; any other scheme is refused.
- `load_and_check_image` turns the bytes into an 8-bit RGB `PIL.Image.Image`,
  refusing, in this order, too many bytes, data that is not an image, too many
  pixels -- read from the header *before* any pixel is decoded, so a
  decompression bomb costs nothing -- pixel modes that do not convert
  faithfully to 8-bit RGB, and truncated or corrupt data. Camera orientation
  (EXIF) is applied and alpha is dropped, as diffusers' ``load_image`` does.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Literal
from urllib.parse import unquote, urlsplit

import PIL.Image
import PIL.ImageOps

ImageSourceKind = Literal["path", "s3", "http"]

# Modes that convert to 8-bit RGB without losing meaning. 16-bit and float
# modes ("I;16", "I", "F") would be clipped or rescaled arbitrarily.
CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})

# S3's bucket naming rules (AWS, MinIO and SeaweedFS agree on these).
_BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SOURCE_HINT = "use a local path, s3://bucket/key or an http(s):// URL"


class ImageInputError(ValueError):
    """An image the farm refuses; the message is one line saying what was wrong and what to do."""


def parse_image_source(source: str) -> tuple[ImageSourceKind, str]:
    """Where an image lives: ``("path", path)``, ``("s3", "bucket/key")`` or ``("http", url)``.

    ``file:///abs/path`` URIs become paths; ``http`` and ``https`` URLs are
    both kind "http" and come back unchanged. Everything else is refused with
    `ImageInputError`.
    """
    if not source or not source.strip():
        raise ImageInputError(f"the image source is empty; {_SOURCE_HINT}")
    if any(ord(char) < 32 or ord(char) == 127 for char in source):
        raise ImageInputError(f"the image source {source!r} contains control characters; {_SOURCE_HINT}")
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    # A one-letter "scheme" is a Windows drive letter (C:/images/cat.png), not a URI.
    if not scheme or len(scheme) == 1:
        return "path", source
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ImageInputError(f"file URI {source!r} names host {parts.netloc!r}; only local files: file:///path")
        if not parts.path:
            raise ImageInputError(f"file URI {source!r} has no path; write it as file:///path/to/image.png")
        return "path", unquote(parts.path)
    if scheme == "s3":
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if not _BUCKET_PATTERN.match(bucket):
            raise ImageInputError(f"{source!r} does not name a valid S3 bucket; write it as s3://bucket/key")
        if not key or parts.query or parts.fragment:
            raise ImageInputError(f"{source!r} does not name an object; write it as s3://bucket/key")
        return "s3", f"{bucket}/{key}"
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ImageInputError(f"URL {source!r} has no host; write it as https://host/path")
        if parts.username is not None or parts.password is not None:
            # Job specs are stored and shown: a password in the URL would leak through them.
            raise ImageInputError(f"URL {source!r} carries credentials; use a URL without user:password@")
        return "http", source
    raise ImageInputError(f"image source scheme {parts.scheme + '://'!r} is not supported; {_SOURCE_HINT}")


def load_and_check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> PIL.Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image, or raise `ImageInputError` saying why not."""
    if len(data) > max_bytes:
        raise ImageInputError(
            f"the image is {len(data):,} bytes, over the farm's limit of {max_bytes:,}; send a smaller file"
        )
    with warnings.catch_warnings():
        # Pillow's own bomb guard warns (or raises) at its fixed limit; ours is max_pixels, checked below.
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        image = _open_header(data, max_pixels)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageInputError(
                f"the image is {width}x{height} = {width * height:,} pixels, over the farm's limit of "
                f"{max_pixels:,}; downscale it"
            )
        if image.mode not in CONVERTIBLE_MODES:
            raise ImageInputError(
                f"image mode {image.mode!r} (16-bit or float pixels) is not supported; "
                "save it as 8-bit RGB (PNG or JPEG)"
            )
        _decode_pixels(image)
    return _upright_rgb(image)


def _open_header(data: bytes, max_pixels: int) -> PIL.Image.Image:
    # Image.open reads only the header: size, mode and format, no pixels yet.
    try:
        return PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError:
        # Pillow refuses sizes past twice its own limit before we can read them.
        raise ImageInputError(
            f"the image has over {2 * (PIL.Image.MAX_IMAGE_PIXELS or 0):,} pixels, over the farm's limit of "
            f"{max_pixels:,}; downscale it"
        ) from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageInputError("the data is not an image Pillow can read; send a PNG, JPEG or WebP file") from None


def _decode_pixels(image: PIL.Image.Image) -> None:
    # Pillow's format plugins report short or broken data as OSError ("image file is truncated"),
    # SyntaxError (bad chunks) or ValueError; all of them mean the file is cut off or damaged.
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(
            f"the image data is truncated or corrupt ({_one_line(exc)}); send the whole file"
        ) from None


def _upright_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    # Phones store rotation as an EXIF tag rather than in the pixels.
    try:
        upright = PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as exc:
        raise ImageInputError(f"the image's EXIF metadata is corrupt ({_one_line(exc)}); re-save the image") from None
    return upright if upright.mode == "RGB" else upright.convert("RGB")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
