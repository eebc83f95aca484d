"""Video encoding with ffmpeg: the only module that runs ffmpeg (the binary bundled by imageio-ffmpeg).

It owns the codec choices (``VideoCodec``, within the job spec's rules), the
streaming encoder the decode stage feeds frame chunks into while the MP4 bytes
flow out to a sink (the S3 multipart upload), and the JPEG poster frame.
Reading videos back is for tests only (``tests/video_probe.py``).

``FfmpegStreamEncoder`` lifecycle:

1. start: ffmpeg reads raw rgb24 frames on stdin and writes *fragmented* MP4
   on stdout (``empty_moov``: the header comes first and needs no seek back,
   so the output can go to a pipe); a reader thread hands stdout to ``sink``
   in ``chunk_size`` pieces as ffmpeg produces them;
2. ``write_frames(frames)`` any number of times, uint8 ``[n, H, W, 3]``;
3. ``close()``: end of input, wait for ffmpeg, re-raise a sink failure, raise
   ``VideoEncodeError`` with ffmpeg's stderr tail on a non-zero exit; or
   ``abort()``: kill ffmpeg and drop the output.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from types import TracebackType
from typing import IO, Literal, cast

import numpy as np

# The job spec owns the codec rules, so what a spec accepts is exactly what this module encodes.
from scheduler.core.spec import CODEC_NAMES, DEFAULT_CRF, DEFAULT_PRESET, MAX_CRF, X264_PRESETS, CodecName

MiB = 1024 * 1024

# Fragmented MP4: a moov with no samples first, then one moof+mdat per keyframe,
# so bytes leave ffmpeg (and reach S3) while frames are still being produced.
FRAGMENTED_MP4_FLAGS = "frag_keyframe+empty_moov+default_base_moof"
_STDERR_TAIL_CHARS = 2000


class VideoEncodeError(RuntimeError):
    """ffmpeg could not encode (or, in tests, read back); the message carries ffmpeg's own words."""


@dataclass(frozen=True)
class VideoCodec:
    """How frames become H.264.

    - ``"h264"``: libx264, yuv420p (plays everywhere), constant quality ``crf``,
      BT.709 matrix, tagged, so players convert the colours back the same way.
    - ``"lossless"``: libx264rgb at ``-qp 0`` on rgb24 -- no chroma subsampling
      and no colour conversion, so decoding gives back the exact input bytes
      (``crf`` does not apply). For verification runs; far larger files.

    ``preset`` trades encode time for size (x264's names). ``codec_from_options``
    validates user input; direct construction checks only name and crf, so a
    bad preset surfaces as ffmpeg's own error.
    """

    name: CodecName = "h264"
    crf: int = DEFAULT_CRF
    preset: str = DEFAULT_PRESET

    def __post_init__(self) -> None:
        known_codec(self.name)
        if not 0 <= self.crf <= MAX_CRF:
            raise ValueError(f"crf must be between 0 and {MAX_CRF} (x264's scale), got {self.crf}")

    @property
    def pix_fmt(self) -> str:
        return "rgb24" if self.name == "lossless" else "yuv420p"

    @property
    def needs_even_size(self) -> bool:
        # 4:2:0 chroma is stored at half resolution in both directions.
        return self.pix_fmt == "yuv420p"

    def ffmpeg_args(self) -> list[str]:
        """The output-side ffmpeg arguments selecting this codec."""
        if self.name == "lossless":
            return ["-c:v", "libx264rgb", "-qp", "0", "-preset", self.preset, "-pix_fmt", "rgb24"]
        return [
            # Explicit RGB->YUV matrix and range, and the same written into the stream,
            # instead of swscale's untagged BT.601 that players would read back as BT.709.
            "-vf",
            "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p",
            "-c:v",
            "libx264",
            "-crf",
            str(self.crf),
            "-preset",
            self.preset,
            "-pix_fmt",
            "yuv420p",
            "-colorspace",
            "bt709",
            "-color_primaries",
            "bt709",
            "-color_trc",
            "bt709",
            "-color_range",
            "tv",
        ]


def known_codec(name: str) -> CodecName:
    """``name`` if the job spec allows it, else a one-line error naming the codecs it does."""
    if name not in CODEC_NAMES:
        raise ValueError(f"unknown video codec {name!r}; use one of {', '.join(CODEC_NAMES)}")
    return cast(CodecName, name)


def codec_from_options(name: str = "h264", crf: int | None = None, preset: str | None = None) -> VideoCodec:
    """Build a ``VideoCodec`` from user-facing options (the spec's rules), with one-line errors saying what is allowed."""
    codec_name = known_codec(name)
    if preset is not None and preset not in X264_PRESETS:
        raise ValueError(f"unknown x264 preset {preset!r}; use one of {', '.join(X264_PRESETS)}")
    # crf is checked by VideoCodec itself.
    return VideoCodec(
        name=codec_name,
        crf=DEFAULT_CRF if crf is None else crf,
        preset=DEFAULT_PRESET if preset is None else preset,
    )


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary (imageio-ffmpeg's bundled one, or ``IMAGEIO_FFMPEG_EXE``)."""
    try:
        import imageio_ffmpeg  # type: ignore[import-untyped]
    except ImportError:
        raise VideoEncodeError(
            "imageio-ffmpeg is not installed; install it with `pip install imageio-ffmpeg`"
        ) from None
    try:
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except RuntimeError as exc:
        raise VideoEncodeError(
            f"no ffmpeg binary found ({exc}); reinstall imageio-ffmpeg or set IMAGEIO_FFMPEG_EXE"
        ) from None


def _fps_arg(fps: float | Fraction) -> str:
    if isinstance(fps, Fraction):
        return f"{fps.numerator}/{fps.denominator}"
    return repr(float(fps)) if not float(fps).is_integer() else str(int(fps))


def _tail_text(data: bytes, limit: int = _STDERR_TAIL_CHARS) -> str:
    text = data.decode(errors="replace").strip()
    text = text[-limit:]
    # One line: the caller's error message stays one line.
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or "(no output on stderr)"


class FfmpegStreamEncoder:
    """Encode frames to fragmented MP4 while handing the bytes to ``sink`` as ffmpeg produces them.

    ``sink`` is called from the reader thread, one ``chunk_size`` piece at a
    time (the last may be shorter); if it raises, ffmpeg is stopped and the
    error comes back from the next ``write_frames`` or from ``close``.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float | Fraction,
        codec: VideoCodec,
        sink: Callable[[bytes], None],
        chunk_size: int = MiB,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"frame size must be positive, got {width}x{height}")
        if codec.needs_even_size and (width % 2 or height % 2):
            raise ValueError(f"{codec.name} (yuv420p) needs an even width and height, got {width}x{height}")
        if float(fps) <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.width = width
        self.height = height
        self.fps = fps
        self.codec = codec
        self.chunk_size = chunk_size
        self.frames_written = 0
        self.bytes_out = 0
        self._sink = sink
        self._sink_error: BaseException | None = None
        self._state: Literal["open", "closed", "aborted"] = "open"
        # A file, not a pipe: nobody has to drain stderr while frames are written.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        gop = max(1, round(float(fps)))  # a keyframe -- so a fragment -- about every second
        args = [
            ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            _fps_arg(fps),
            "-i",
            "pipe:0",
            "-an",
            *codec.ffmpeg_args(),
            "-g",
            str(gop),
            "-movflags",
            FRAGMENTED_MP4_FLAGS,
            "-f",
            "mp4",
            "pipe:1",
        ]
        try:
            self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        except OSError as exc:
            self._stderr.close()
            raise VideoEncodeError(f"cannot run ffmpeg at {args[0]}: {exc.strerror or exc}") from None
        self._reader = threading.Thread(target=self._pump, name="ffmpeg-stdout", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        while True:
            chunk = stdout.read(self.chunk_size)  # blocks until a full chunk or EOF
            if not chunk:
                return
            if self._sink_error is not None:
                continue  # keep draining so ffmpeg never blocks on a full pipe
            try:
                self._sink(chunk)
                self.bytes_out += len(chunk)
            except BaseException as exc:  # noqa: BLE001 -- handed to the producer's thread, re-raised there
                self._sink_error = exc
                self._proc.kill()

    def write_frames(self, frames: np.ndarray) -> None:
        """Queue uint8 RGB frames ``[n, H, W, 3]`` (or one ``[H, W, 3]``); blocks while ffmpeg catches up."""
        if self._state != "open":
            raise VideoEncodeError(f"the encoder is {self._state}; start a new one")
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"frames must be uint8 [n, {self.height}, {self.width}, 3], got {frames.dtype} {list(frames.shape)}"
            )
        self._raise_sink_error()
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(np.ascontiguousarray(frames).data.cast("B"))
        except (BrokenPipeError, ValueError):
            ffmpeg_gone = True
        else:
            ffmpeg_gone = False
        if ffmpeg_gone:
            # A sink failure killed ffmpeg, or ffmpeg failed on its own.
            self._raise_sink_error()
            self._fail_closed()
        self.frames_written += frames.shape[0]

    def close(self) -> None:
        """End the input and wait for ffmpeg to write the rest; raise if anything failed."""
        if self._state == "closed":
            return
        if self._state == "aborted":
            raise VideoEncodeError("the encoder was aborted; start a new one")
        self._state = "closed"
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass  # ffmpeg exited already; its return code below says why
        code = self._proc.wait()
        self._reader.join()
        try:
            self._raise_sink_error()
            if code != 0:
                raise VideoEncodeError(f"ffmpeg exited with status {code}: {self._stderr_tail()}")
        finally:
            self._stderr.close()

    def abort(self) -> None:
        """Kill ffmpeg and drop whatever it produced. Idempotent; never raises."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._proc.kill()
        if self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        self._proc.wait()
        self._reader.join()
        self._stderr.close()

    def _raise_sink_error(self) -> None:
        if self._sink_error is not None:
            error = self._sink_error
            self._sink_error = None
            self.abort()  # a no-op once close() has begun; close() cleans up itself
            raise error

    def _fail_closed(self) -> None:
        self._state = "closed"
        code = self._proc.wait()
        self._reader.join()
        try:
            raise VideoEncodeError(f"ffmpeg stopped reading frames (status {code}): {self._stderr_tail()}")
        finally:
            self._stderr.close()

    def _stderr_tail(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - 16 * 1024))
        return _tail_text(self._stderr.read())

    def __enter__(self) -> FfmpegStreamEncoder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------- poster


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """One uint8 RGB frame ``[H, W, 3]`` as JPEG bytes (the poster beside the video)."""
    from PIL import Image

    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"a poster frame must be uint8 [H, W, 3], got {frame.dtype} {list(frame.shape)}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(out, format="JPEG", quality=quality)
    return out.getvalue()
