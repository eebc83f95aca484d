"""Reading back what the farm encoded, for tests: every frame, or the frame count, of an MP4.

Test utilities, not the farm's: nothing in workers/ reads video back. Both go
through imageio-ffmpeg (``read_frames``, ``count_frames_and_secs``), which runs
the same bundled ffmpeg the encoder does; failures are `VideoEncodeError`s
carrying ffmpeg's first line, like the encoder's own.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import imageio_ffmpeg  # type: ignore[import-untyped]
import numpy as np

from workers.video_encoder import VideoEncodeError


@contextmanager
def _video_file(source: str | Path | bytes) -> Iterator[str]:
    # Bytes go through a temp file: ffmpeg needs a seekable input for plain MP4.
    if isinstance(source, bytes | bytearray | memoryview):
        with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
            tmp.write(source)
            tmp.flush()
            yield tmp.name
        return
    path = Path(source)
    if not path.is_file():
        raise VideoEncodeError(f"no video at {path}")
    yield str(path)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def decode_video_frames(source: str | Path | bytes) -> np.ndarray:
    """Decode every frame of the video to uint8 RGB ``[n, H, W, 3]``."""
    with _video_file(source) as path:
        try:
            reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
            width, height = next(reader)["size"]
            frames = [np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader]
        except (OSError, RuntimeError) as exc:
            raise VideoEncodeError(f"ffmpeg could not read {Path(path).name}: {_first_line(exc)}") from None
    if not frames:
        raise VideoEncodeError("the video has no frames")
    return np.stack(frames)


def probe_frame_count(source: str | Path | bytes) -> int:
    """Number of frames in the first video stream."""
    with _video_file(source) as path:
        try:
            frames, _seconds = imageio_ffmpeg.count_frames_and_secs(path)
        except RuntimeError as exc:
            raise VideoEncodeError(f"ffmpeg could not read {Path(path).name}: {_first_line(exc)}") from None
    return int(frames)
