"""Sharded streaming decode equals the one-process streaming decode (workers/stages/sharded_decode.py).

Tolerance: the decoder's float output (in [-1, 1]) within 1e-4, the uint8 frames within one level. Shards
run every convolution on differently shaped tensors, so the CPU kernels sum in a different order: float32
reassociation, measured at most ~6e-6 over 9 frames of the tiny VAE. 1e-4 leaves a 15x margin and is still
~40x under one uint8 level (2/255 in [-1, 1]) and 1000x under what a too-small halo gives (0.18+, checked
below); a value sitting on a rounding boundary can flip by one level, hence the uint8 tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

FLOAT_TOLERANCE = 1e-4
# [1, 16, 3, 32, 40]: 9 frames of 256x320, so the causal cache runs past its first chunk and a 2x2 grid
# leaves every shard (16x20 latent pixels) with halo cut on two sides (the tiny VAE's halo is 11).
LATENT_SHAPE = (1, 16, 3, 32, 40)


def _latents() -> torch.Tensor:
    return torch.randn(*LATENT_SHAPE, generator=torch.Generator().manual_seed(0))


def test_grid_parse_and_errors() -> None:
    from workers.stages.sharded_decode import ShardGrid

    assert ShardGrid.parse("2x2") == ShardGrid(2, 2) and ShardGrid.parse("2").size == 2
    assert str(ShardGrid.parse("1X4")) == "1x4"
    for bad in ("0x2", "ax2", "2x2x2", ""):
        with pytest.raises(ValueError, match="ROWSxCOLS"):
            ShardGrid.parse(bad)


def test_regions_tile_the_frame_with_clipped_halo() -> None:
    from workers.stages.sharded_decode import ShardGrid, shard_regions

    regions = shard_regions(ShardGrid(2, 3), 9, 10, halo=2)
    covered = torch.zeros(9, 10, dtype=torch.int64)
    for region in regions:
        covered[slice(*region.core_rows), slice(*region.core_cols)] += 1
        assert region.ext_rows[0] == max(0, region.core_rows[0] - 2) and region.ext_rows[1] == min(
            9, region.core_rows[1] + 2
        )
    assert bool((covered == 1).all())
    with pytest.raises(ValueError, match="latent frame of at least"):
        shard_regions(ShardGrid(4, 1), 3, 8, halo=1)


@pytest.mark.parametrize(("arch", "halo"), [("wan2.1-t2v-1.3b", 15), ("tiny", 11)])
def test_halo_from_the_decoders_receptive_field(arch: str, halo: int) -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from workers.models.presets import arch_named
    from workers.stages.sharded_decode import decoder_halo

    with torch.device("meta"):  # the architecture only: no weights allocated
        vae = AutoencoderKLWan(**arch_named(arch).vae)
    assert decoder_halo(vae.decoder) == halo


def test_blocks_after_the_attention_keep_only_what_the_core_needs() -> None:
    """At 8x the 1.3b decoder's blocks need the core plus 7 output pixels (6 convs at 8x and conv_out), not the
    114 the latent halo covers; at a true frame border nothing is added."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan

    from workers.models.presets import arch_named
    from workers.stages.sharded_decode import axis_plan

    with torch.device("meta"):
        vae = AutoencoderKLWan(**arch_named("wan2.1-t2v-1.3b").vae)
    middle = axis_plan(vae.decoder, (30, 60), (15, 75), 90, 8)
    assert middle.crops[0] == (15, 75) and middle.scales[0] == 1  # latent: core +- the 15-pixel halo
    assert middle.crops[middle.scales.index(8)] == (240 - 7, 480 + 7)
    assert middle.output[0] <= 240 and middle.output[1] >= 480  # the output covers the core
    border = axis_plan(vae.decoder, (0, 30), (0, 45), 60, 8)
    assert border.crops[border.scales.index(8)] == (0, 240 + 7)
    # A too-small halo: the blocks keep what the shard has, so the cut shows (test_too_small_halo_is_visible).
    assert axis_plan(vae.decoder, (30, 60), (27, 63), 90, 8).crops[0] == (27, 63)


class _WholeFrameGather:
    """Collectives stand-in for one rank: all_gather returns every rank's core cut from the known whole frame."""

    def __init__(self, whole: torch.Tensor, regions: list[Any], rank: int) -> None:
        self.whole, self.regions, self.rank, self.size = whole, regions, rank, len(regions)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        from workers.stages.sharded_decode import _padded

        cores = [self.whole[..., slice(*r.core_rows), slice(*r.core_cols)] for r in self.regions]
        return [_padded(core, tensor.shape[-2], tensor.shape[-1]) for core in cores]


def test_gathered_attention_equals_whole_frame_attention() -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock

    from workers.stages.sharded_decode import GatheredAttention, ShardGrid, shard_regions

    torch.manual_seed(0)
    attention = WanAttentionBlock(16).eval()
    whole = torch.randn(1, 16, 1, 12, 14)
    regions = shard_regions(ShardGrid(2, 2), 12, 14, halo=3)
    with torch.no_grad():
        expected = attention(whole)
        for rank, region in enumerate(regions):
            ext = (slice(*region.ext_rows), slice(*region.ext_cols))
            gathered = GatheredAttention(attention, _WholeFrameGather(whole, regions, rank))  # type: ignore[arg-type]
            gathered.regions = regions
            shard = whole[..., ext[0], ext[1]]
            assert torch.allclose(gathered(shard), expected[..., ext[0], ext[1]], atol=1e-5)
            # The attention is frame-global: attending within the shard alone is visibly different.
            assert float((attention(shard) - expected[..., ext[0], ext[1]]).abs().max()) > 1e-2


def _one_process_chunks(model_dir: Path, latents: torch.Tensor) -> list[torch.Tensor]:
    from workers.stages.decode import StreamingVaeDecoder

    decoder = StreamingVaeDecoder(model_dir)
    return list(decoder.decoder_steps(decoder.vae.post_quant_conv(decoder.denormalize(latents))))


def _sharded(model_dir: Path, grid: str, latents: torch.Tensor, halo: int | None = None) -> tuple[list[Any], list[Any]]:
    from workers.decode_group import DecodeRankGroup
    from workers.stages.decode import StreamingVaeDecoder
    from workers.stages.sharded_decode import ShardGrid

    group = DecodeRankGroup(model_dir, ShardGrid.parse(grid), timeout_seconds=120, halo=halo)
    decoder = group.start(StreamingVaeDecoder(model_dir))
    try:
        floats = list(decoder.decode_chunks(latents))
        frames = list(decoder.iter_frames(latents))  # a second job on the same group
    finally:
        group.close()
    assert not group.children
    return floats, frames


@pytest.mark.integration
@pytest.mark.parametrize("grid", ["2x1", "2x2"])
def test_sharded_decode_equals_one_process(tiny_model_dir: Path, grid: str) -> None:
    from workers.stages.decode import StreamingVaeDecoder

    latents = _latents()
    expected = _one_process_chunks(tiny_model_dir, latents)
    floats, frames = _sharded(tiny_model_dir, grid, latents)
    assert [c.shape for c in floats] == [c.shape for c in expected] == [(1, 3, n, 256, 320) for n in (1, 4, 4)]
    for got, want in zip(floats, expected, strict=True):
        assert float((got - want).abs().max()) < FLOAT_TOLERANCE
    single = StreamingVaeDecoder(tiny_model_dir)
    for got_frames, want in zip(frames, expected, strict=True):
        diff = got_frames.astype(int) - single.to_frames(want).astype(int)
        assert got_frames.shape == (want.shape[2], 256, 320, 3) and int(abs(diff).max()) <= 1


@pytest.mark.integration
def test_too_small_halo_is_visible(tiny_model_dir: Path) -> None:
    """The negative control of the equivalence test: with a 3-pixel halo the cut shows."""
    latents = _latents()[:, :, :2]
    expected = _one_process_chunks(tiny_model_dir, latents)
    floats, _ = _sharded(tiny_model_dir, "2x1", latents, halo=3)
    assert max(float((got - want).abs().max()) for got, want in zip(floats, expected, strict=True)) > 0.05


@pytest.mark.slow
@pytest.mark.integration
def test_sharded_decode_bench_smoke(tmp_path: Path) -> None:
    """bench/sharded_decode.py runs end to end with its one command (tiny VAE, 2 latent frames, N = 1, 2)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "bench.sharded_decode", "--arch", "tiny", "--size", "128x160", "--frames", "5",
         "--ranks", "1,2", "--threads", "1", "--json", str(tmp_path / "s.json")],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    ).stdout  # fmt: skip
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [(r["ranks"], len(r["peak_mib_per_rank"])) for r in rows] == [(1, 1), (2, 2)]
    assert rows[1]["max_abs_diff_vs_one_process"] < FLOAT_TOLERANCE and rows[1]["halo"] == 11
    assert all(r["seconds"] > 0 and min(r["peak_mib_per_rank"]) >= 0 for r in rows)
    assert "| 2 | 2x1 |" in out


@pytest.mark.integration
def test_a_dead_rank_fails_the_decode_and_the_group_restarts(tiny_model_dir: Path) -> None:
    from workers.decode_group import DecodeRankGroup
    from workers.stages.decode import StreamingVaeDecoder
    from workers.stages.sharded_decode import ShardGrid

    latents = _latents()[:, :, :2]
    expected = _one_process_chunks(tiny_model_dir, latents)
    group = DecodeRankGroup(tiny_model_dir, ShardGrid(2, 1), timeout_seconds=30)
    decoder = group.start(StreamingVaeDecoder(tiny_model_dir))
    try:
        assert group.healthy() and group.describe()["decode_grid"] == "2x1"
        group.children[0].kill()
        group.children[0].wait()
        assert not group.healthy()
        with pytest.raises(RuntimeError):
            list(decoder.decode_chunks(latents))
        decoder = group.restart()
        assert group.healthy() and group.restarts == 1
        for got, want in zip(decoder.decode_chunks(latents), expected, strict=True):
            assert float((got - want).abs().max()) < FLOAT_TOLERANCE
    finally:
        group.close()


def test_decode_grid_setting_and_rank_counts() -> None:
    from pydantic import ValidationError

    from scheduler.core.settings import WorkerSettings
    from workers.stages.sharded_decode import ShardGrid

    assert WorkerSettings().decode_grid == "1x1"
    assert WorkerSettings(decode_grid="2x2").decode_grid == "2x2"
    with pytest.raises(ValidationError):
        WorkerSettings(decode_grid="2by2")
    assert [str(ShardGrid.for_ranks(n)) for n in (1, 2, 4, 6)] == ["1x1", "2x1", "2x2", "3x2"]
    with pytest.raises(ValueError, match="positive number"):
        ShardGrid.for_ranks(0)


@pytest.mark.slow
@pytest.mark.integration
def test_killing_a_rank_mid_job_retries_the_decode_and_the_group_comes_back(farm: Any, s3_config: Any) -> None:
    """A decode worker with a 2x1 group; one follower rank SIGKILLed mid-upload: the attempt fails, the farm
    retries it, the group restarts (new pid, restarts=1) and the job lands one video."""
    import os
    import signal

    from scheduler.core import jobs
    from scheduler.core.keys import Stage
    from scheduler.core.object_store import make_s3_client
    from scheduler.core.worker_registry import live_workers
    from scheduler.intake.submit import submit
    from tests.farm_harness import wait_finished, wait_until, worker_logs
    from tests.video_probe import probe_frame_count

    worker = farm.settings.worker.model_copy(update={"decode_grid": "2x1", "decode_group_timeout_seconds": 30.0})
    farm.settings = farm.settings.model_copy(update={"worker": worker})
    # The decode worker pauses after pulling its input, before decoding: the rank dies with the job in hand,
    # and the group's first collective of the job finds it gone. (A kill during the upload could land after
    # the last collective on a fast machine, and the job would rightly not notice.)
    spec = {"prompt": "a red fox in snow", "width": 512, "height": 256, "frames": 33, "steps": 2}
    # Own farm: a decode group's rank is killed, under a decode pause.
    fleet = farm.fleet({"REELFARM_FAULT_SLOW": "decode:8"})
    fleet.start(*Stage)
    job_id = submit(farm.conn, farm.settings, {**spec, "codec": {"name": "lossless"}})
    client = make_s3_client(s3_config)

    def decode_record() -> dict[str, Any]:
        return next(w for w in live_workers(farm.conn) if w.get("stage") == "decode")

    wait_until(lambda: jobs.read_status(farm.conn, job_id)["stages"].get("decode", {}).get("state") == "running", 240,
               "the decode stage to start")  # fmt: skip
    first = decode_record()
    assert (first["decode_ranks"], first["decode_grid"], first["decode_group"]) == ("2", "2x1", "up")
    os.kill(int(first["decode_rank_pids"]), signal.SIGKILL)
    record = wait_finished(farm.conn, job_id, timeout=300)
    assert record["state"] == "succeeded", worker_logs(farm.settings)
    # Either the job's first collective met the dead rank (the attempt failed and was retried) or the worker
    # saw the group down first and restarted it before decoding: both end with one video and a fresh group.
    assert all(failure["stage"] == "decode" for failure in record["failures"]), record["failures"]
    after = decode_record()
    assert after["decode_group"] == "up" and int(after["decode_group_restarts"]) >= 1
    assert after["decode_rank_pids"] != first["decode_rank_pids"]
    body = client.get_object(Bucket=s3_config.bucket, Key=record["result"]["video_key"])["Body"].read()
    assert probe_frame_count(body) == 33
