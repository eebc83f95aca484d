"""Video encoding with ffmpeg: the only module that runs ffmpeg (the binary bundled by imageio-ffmpeg).

It owns the codec choices (``VideoCodec``), the streaming encoder the decode
stage feeds frame chunks into while the MP4 bytes flow out to a sink (the S3
multipart upload), frame decoding for tests and verification, and the JPEG
poster frame.

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
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, cast

import numpy as np

# The job spec owns the codec rules, so what a spec accepts is exactly what this module encodes.
from scheduler.spec import CODEC_NAMES, DEFAULT_CRF, DEFAULT_PRESET, MAX_CRF, X264_PRESETS, CodecName

MiB = 1024 * 1024

# Fragmented MP4: a moov with no samples first, then one moof+mdat per keyframe,
# so bytes leave ffmpeg (and reach S3) while frames are still being produced.
FRAGMENTED_MP4_FLAGS = "frag_keyframe+empty_moov+default_base_moof"
_STDERR_TAIL_CHARS = 2000


class VideoEncodeError(RuntimeError):
    """ffmpeg could not encode or decode; the message carries ffmpeg's own words."""


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


# --------------------------------------------------------------------------- decoding (tests, verification)


def _run_ffmpeg(args: list[str], source: str | Path | bytes) -> bytes:
    """Run ffmpeg on a file path or on bytes (via a temp file: plain MP4 needs a seekable input)."""
    if isinstance(source, bytes | bytearray | memoryview):
        with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
            tmp.write(source)
            tmp.flush()
            return _run_ffmpeg(args, tmp.name)
    path = Path(source)
    if not path.is_file():
        raise VideoEncodeError(f"no video at {path}")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path), *args]
    done = subprocess.run(cmd, capture_output=True, check=False)
    if done.returncode != 0:
        raise VideoEncodeError(f"ffmpeg could not read {path.name}: {_tail_text(done.stderr)}")
    return done.stdout


def decode_video_frames(source: str | Path | bytes) -> np.ndarray:
    """Decode every frame of the first video stream to uint8 RGB ``[n, H, W, 3]``."""
    # PPM frames carry their own size in a text header, so nothing has to parse
    # ffmpeg's human-readable stream description.
    raw = _run_ffmpeg(["-map", "0:v:0", "-f", "image2pipe", "-c:v", "ppm", "-pix_fmt", "rgb24", "pipe:1"], source)
    frames: list[np.ndarray] = []
    stream = io.BytesIO(raw)
    while True:
        header = _read_ppm_header(stream)
        if header is None:
            break
        width, height = header
        data = stream.read(width * height * 3)
        if len(data) != width * height * 3:
            raise VideoEncodeError("ffmpeg's decoded frame stream ended in the middle of a frame")
        frames.append(np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3))
    if not frames:
        raise VideoEncodeError("the video has no frames")
    return np.stack(frames)


def _read_ppm_header(stream: io.BytesIO) -> tuple[int, int] | None:
    tokens: list[bytes] = []
    while len(tokens) < 4:
        token = bytearray()
        while True:
            ch = stream.read(1)
            if not ch:
                if not tokens and not token:
                    return None
                raise VideoEncodeError("ffmpeg's decoded frame stream has a truncated PPM header")
            if ch.isspace():
                if token:
                    break
                continue
            token += ch
        tokens.append(bytes(token))
    # After the maxval exactly one whitespace byte was consumed above: the pixel data starts here.
    if tokens[0] != b"P6" or tokens[3] != b"255":
        raise VideoEncodeError(f"unexpected PPM header from ffmpeg: {b' '.join(tokens)!r}")
    return int(tokens[1]), int(tokens[2])


def probe_frame_count(source: str | Path | bytes) -> int:
    """Number of frames in the first video stream (counted by demuxing, without decoding)."""
    out = _run_ffmpeg(["-map", "0:v:0", "-c", "copy", "-f", "null", "-progress", "pipe:1", "-nostats", "-"], source)
    count = None
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("frame="):
            count = int(line.split("=", 1)[1])
    if count is None:
        raise VideoEncodeError("ffmpeg reported no frame count")
    return count


# --------------------------------------------------------------------------- poster


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """One uint8 RGB frame ``[H, W, 3]`` as JPEG bytes (the poster beside the video)."""
    from PIL import Image

    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"a poster frame must be uint8 [H, W, 3], got {frame.dtype} {list(frame.shape)}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame)).save(out, format="JPEG", quality=quality)
    return out.getvalue()
