"""ffmpeg encoding with the bundled binary: exact lossless round trips, h264, real streaming, clear failures."""

from __future__ import annotations

import io
import threading
import time
from typing import get_args

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from scheduler.core.spec import CodecOptions, X264Preset
from tests.video_probe import decode_video_frames, probe_frame_count
from workers.video_encoder import (
    FfmpegStreamEncoder,
    VideoCodec,
    VideoEncodeError,
    codec_from_options,
    encode_jpeg,
)


def random_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def smooth_frames(n: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([(x * 255 // width + t) % 256, y * 255 // height, (x + y + 3 * t) % 256], axis=-1) for t in range(n)
    ]
    return np.stack(frames).astype(np.uint8)


def encode(frames: np.ndarray, codec: VideoCodec, fps: int = 16, chunk_size: int = 1 << 20) -> bytes:
    out: list[bytes] = []
    _, height, width, _ = frames.shape
    with FfmpegStreamEncoder(width, height, fps, codec, out.append, chunk_size=chunk_size) as encoder:
        # Like the streaming VAE decode: one frame, then groups of four.
        encoder.write_frames(frames[:1])
        for start in range(1, len(frames), 4):
            encoder.write_frames(frames[start : start + 4])
    assert encoder.frames_written == len(frames)
    return b"".join(out)


def box_types(mp4: bytes) -> list[str]:
    """Top-level MP4 box types, in order."""
    types, offset = [], 0
    while offset + 8 <= len(mp4):
        size = int.from_bytes(mp4[offset : offset + 4], "big")
        types.append(mp4[offset + 4 : offset + 8].decode("latin-1"))
        if size < 8:
            break
        offset += size
    return types


def test_lossless_round_trip_is_exact() -> None:
    frames = random_frames(17, 64, 64)
    video = encode(frames, VideoCodec("lossless"))
    decoded = decode_video_frames(video)
    assert decoded.shape == frames.shape
    assert int(np.abs(decoded.astype(np.int16) - frames).max()) == 0


def test_lossless_round_trip_of_an_odd_size_is_exact() -> None:
    frames = random_frames(5, 47, 63, seed=1)  # rgb24 has no chroma subsampling, so odd sizes work
    assert np.array_equal(decode_video_frames(encode(frames, VideoCodec("lossless"))), frames)


def test_h264_decodes_to_the_right_frames(tmp_path: object) -> None:
    frames = smooth_frames(33, 96, 128)
    video = encode(frames, VideoCodec("h264"))
    assert probe_frame_count(video) == 33
    decoded = decode_video_frames(video)
    assert decoded.shape == (33, 96, 128, 3)
    # Lossy, but close: crf 18 with a BT.709 round trip that matches on both sides.
    assert float(np.abs(decoded.astype(np.int16) - frames).mean()) < 4.0


def test_h264_keeps_flat_colours(tmp_path: object) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 120, 40), (128, 128, 128)]
    frames = np.stack([np.full((32, 32, 3), c, np.uint8) for c in colours])
    decoded = decode_video_frames(encode(frames, VideoCodec("h264")))
    centre = decoded[:, 16, 16].astype(np.int16)
    # A BT.601/BT.709 mix-up would move saturated colours by 10-40 levels.
    assert int(np.abs(centre - np.array(colours)).max()) <= 3


def test_output_is_fragmented_mp4() -> None:
    video = encode(smooth_frames(48, 64, 64), VideoCodec("h264"))
    boxes = box_types(video)
    assert boxes[:2] == ["ftyp", "moov"]
    # A keyframe every second (16 frames at 16 fps): at least three fragments.
    assert boxes.count("moof") >= 3 and boxes.count("mdat") == boxes.count("moof")


def test_bytes_reach_the_sink_before_close() -> None:
    received: list[int] = []
    arrived = threading.Event()

    def sink(chunk: bytes) -> None:
        received.append(len(chunk))
        arrived.set()

    encoder = FfmpegStreamEncoder(128, 128, 16, VideoCodec("h264", preset="ultrafast"), sink, chunk_size=32 * 1024)
    frames = random_frames(16, 128, 128)
    for _ in range(12):  # 192 frames of noise: about 12 fragments of poorly compressible video
        encoder.write_frames(frames)
    assert arrived.wait(20), "no bytes reached the sink while frames were still being written"
    before_close = sum(received)
    assert before_close > 0
    encoder.close()
    assert sum(received) > before_close
    assert all(size == 32 * 1024 for size in received[:-1])  # full chunks, except the last


def test_streamed_chunks_reassemble_to_the_same_video() -> None:
    frames = random_frames(9, 32, 48, seed=2)
    small = encode(frames, VideoCodec("lossless"), chunk_size=1000)
    assert np.array_equal(decode_video_frames(small), frames)


def test_bad_codec_option_raises_with_ffmpegs_words() -> None:
    with pytest.raises(VideoEncodeError, match="invalid preset") as info:
        encode(random_frames(4, 32, 32), VideoCodec("h264", preset="not-a-preset"))
    message = str(info.value)
    assert message.startswith("ffmpeg ")
    assert "\n" not in message


def test_ffmpeg_dying_mid_stream_raises_on_write() -> None:
    encoder = FfmpegStreamEncoder(32, 32, 16, VideoCodec("h264", preset="not-a-preset"), lambda chunk: None)
    deadline = time.monotonic() + 10
    with pytest.raises(VideoEncodeError, match="invalid preset"):
        while time.monotonic() < deadline:  # ffmpeg exits on its own; a later write finds the pipe broken
            encoder.write_frames(random_frames(8, 32, 32))
    encoder.abort()


def test_a_failing_sink_stops_ffmpeg_and_its_error_comes_back() -> None:
    def sink(chunk: bytes) -> None:
        raise OSError("S3 is down")

    encoder = FfmpegStreamEncoder(64, 64, 16, VideoCodec("lossless"), sink, chunk_size=4096)
    with pytest.raises(OSError, match="S3 is down"):
        for _ in range(200):
            encoder.write_frames(random_frames(4, 64, 64))
        encoder.close()
    assert encoder._proc.poll() is not None  # ffmpeg is gone, not left running


def test_abort_kills_ffmpeg() -> None:
    encoder = FfmpegStreamEncoder(64, 64, 16, VideoCodec("h264"), lambda chunk: None)
    encoder.write_frames(random_frames(3, 64, 64))
    encoder.abort()
    encoder.abort()
    assert encoder._proc.poll() is not None
    with pytest.raises(VideoEncodeError, match="aborted"):
        encoder.write_frames(random_frames(1, 64, 64))


def test_frames_of_the_wrong_shape_or_type_are_refused() -> None:
    with FfmpegStreamEncoder(64, 64, 16, VideoCodec("lossless"), lambda chunk: None) as encoder:
        with pytest.raises(ValueError, match=r"uint8 \[n, 64, 64, 3\]"):
            encoder.write_frames(np.zeros((2, 32, 64, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            encoder.write_frames(np.zeros((2, 64, 64, 3), np.float32))
        encoder.write_frames(np.zeros((64, 64, 3), np.uint8))  # one frame without the batch axis is fine


def test_h264_needs_an_even_size() -> None:
    with pytest.raises(ValueError, match="even width and height"):
        FfmpegStreamEncoder(63, 64, 16, VideoCodec("h264"), lambda chunk: None)


def test_codec_from_options_validates() -> None:
    assert codec_from_options("h264", None, None) == VideoCodec("h264", 18, "medium")
    assert codec_from_options("lossless", 0, "veryfast") == VideoCodec("lossless", 0, "veryfast")
    assert VideoCodec("lossless").pix_fmt == "rgb24" and VideoCodec().pix_fmt == "yuv420p"
    with pytest.raises(ValueError, match="unknown video codec 'vp9'; use one of h264, lossless"):
        codec_from_options("vp9")
    with pytest.raises(ValueError, match="unknown x264 preset"):
        codec_from_options("h264", preset="turbo")
    with pytest.raises(ValueError, match="crf must be between 0 and 51"):
        codec_from_options("h264", crf=60)


def test_codec_options_accept_exactly_what_the_spec_accepts() -> None:
    for preset in get_args(X264Preset):
        assert CodecOptions(preset=preset).preset == codec_from_options("h264", preset=preset).preset
    with pytest.raises(ValidationError):
        CodecOptions(preset="veryslow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown x264 preset 'veryslow'"):
        codec_from_options("h264", preset="veryslow")


def test_decoding_garbage_is_a_video_encode_error() -> None:
    with pytest.raises(VideoEncodeError, match="ffmpeg could not read"):
        decode_video_frames(b"this is not an mp4")


def test_poster_jpeg() -> None:
    frame = smooth_frames(1, 48, 64)[0]
    jpeg = encode_jpeg(frame)
    assert jpeg[:2] == b"\xff\xd8"
    image = Image.open(io.BytesIO(jpeg))
    assert (image.format, image.size, image.mode) == ("JPEG", (64, 48), "RGB")
    assert float(np.abs(np.asarray(image).astype(np.int16) - frame).mean()) < 6.0
