"""Sharded streaming decode: the Wan2.1 VAE's causal decoder spread over a grid of ranks.

Each latent frame is split over a rows x cols grid of ranks. A rank decodes
its shard (its *core*) plus a halo of latent pixels on every side that is not
a true frame border, with its own per-convolution causal cache, trims the halo
from its output and sends the core to rank 0, which assembles the frame chunk
(1 frame, then 4 per latent frame) exactly as ``StreamingVaeDecoder`` yields it.

Why this equals the one-process decode (up to float reassociation):

- Every layer of the decoder but one is spatially local: 3x3 convolutions
  (zero-padded, so a shard that touches a true border pads it exactly as the
  whole frame does), 1x1 convolutions, RMS norms over *channels* (per pixel),
  SiLU and nearest upsampling. An output pixel depends on the input within its
  receptive radius, so the halo is that radius (`decoder_halo`, counted from
  the decoder's own conv stack): 15 latent pixels (114 output pixels) for the
  Wan2.1 VAE (2 res blocks per stage), 11 for the tiny test VAE (1 res block).
  Errors made at a shard's cut edge travel inwards by at most that radius
  whatever the frame count: a causal conv reads its own layer's cached input
  of the previous latent frame, which is wrong to the same depth as its
  current input, so the causal cache needs no halo in time.
- The mid block's attention is global over one frame's H x W. It runs at
  latent resolution (cheap), so each rank computes the mid block's first
  residual block on its extended shard (exact in its core: that part of the
  stack reaches 3 latent pixels, less than the halo), the cores are all-gathered
  into the whole frame's attention input, and each rank attends its own
  extended shard's queries to every key of the frame (`GatheredAttention`).
  From there on the shard's input is exact again and the halo covers the rest.
- The halo is spent mostly at latent and 2x resolution. Every block after the
  attention (residual blocks and upsamplers, which take their causal cache from
  their own input) crops its input to what the core still needs: the core plus
  the reach of the convolutions to come (`axis_plan`, walked back from the core
  through the decoder). So the 8x blocks, where the cache and activations are,
  run on the core plus 7 output pixels a side instead of plus 114, and a rank's
  peak follows its core's share of the frame rather than core plus halo.

Lifecycle: rank 0 (the decode worker) calls ``iter_frames(latents)``: it
announces the job's shape (through the store: an idle follower may wait
for its next job indefinitely, the collectives keep a short timeout), broadcasts the latents, all ranks decode, and the trimmed
cores of each chunk are gathered to rank 0 once per chunk -- the gather of
chunk k overlaps the decode of chunk k+1. Ranks 1..N-1 call ``follow()`` in a
loop; ``stop()`` on rank 0 ends their loops.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanDecoder3d,
    WanUpBlock,
    WanUpsample,
)
from torch import nn
from torch.distributed import BroadcastOptions, GatherOptions, ProcessGroupGloo, Store

from workers.stages.decode import StreamingVaeDecoder

_STOP, _DECODE = 0, 1  # the header's first field
_IDLE_POLL_SECONDS = 5.0  # how often an idle follower checks that its parent (rank 0) still lives
_CROP_HOOKS = "_reelfarm_shard_crop_hooks"  # the decoder attribute holding this rank's crop hook handles


@dataclass(frozen=True)
class ShardGrid:
    rows: int
    cols: int

    @classmethod
    def parse(cls, text: str) -> ShardGrid:
        """``"2x2"`` -> ShardGrid(2, 2); a bare ``"2"`` is 2 rows x 1 column."""
        parts = text.lower().split("x")
        try:
            rows, cols = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(parts[0]), 1)
        except ValueError:
            rows = cols = 0
        if len(parts) > 2 or rows < 1 or cols < 1:
            raise ValueError(f"decode grid {text!r}: write ROWSxCOLS with positive numbers, e.g. 2x1 or 2x2")
        return cls(rows, cols)

    @classmethod
    def for_ranks(cls, ranks: int) -> ShardGrid:
        """The squarest grid of ``ranks`` ranks, rows >= cols (4 -> 2x2, 2 -> 2x1, 6 -> 3x2)."""
        if ranks < 1:
            raise ValueError(f"decode ranks {ranks}: give a positive number of decode processes")
        cols = max(c for c in range(1, math.isqrt(ranks) + 1) if ranks % c == 0)
        return cls(ranks // cols, cols)

    @property
    def size(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"


@dataclass(frozen=True)
class ShardRegion:
    """One rank's part of a latent frame, in latent pixels: [start, stop) rows and columns."""

    core_rows: tuple[int, int]
    core_cols: tuple[int, int]
    ext_rows: tuple[int, int]  # core plus the halo, clipped to the frame
    ext_cols: tuple[int, int]

    def core_in_ext(self, scale: int = 1) -> tuple[slice, slice]:
        """The core's place inside the extended shard, at ``scale`` pixels per latent pixel."""
        top, left = self.core_rows[0] - self.ext_rows[0], self.core_cols[0] - self.ext_cols[0]
        height, width = self.core_rows[1] - self.core_rows[0], self.core_cols[1] - self.core_cols[0]
        return slice(scale * top, scale * (top + height)), slice(scale * left, scale * (left + width))


def _bounds(length: int, parts: int, index: int) -> tuple[int, int]:
    return index * length // parts, (index + 1) * length // parts


def shard_regions(grid: ShardGrid, height: int, width: int, halo: int) -> list[ShardRegion]:
    """Rank r's region (row-major over the grid) of a ``height`` x ``width`` latent frame."""
    if grid.rows > height or grid.cols > width:
        raise ValueError(f"a {grid} decode grid needs a latent frame of at least {grid.rows}x{grid.cols}")
    regions = []
    for rank in range(grid.size):
        rows = _bounds(height, grid.rows, rank // grid.cols)
        cols = _bounds(width, grid.cols, rank % grid.cols)
        regions.append(
            ShardRegion(
                rows,
                cols,
                (max(0, rows[0] - halo), min(height, rows[1] + halo)),
                (max(0, cols[0] - halo), min(width, cols[1] + halo)),
            )
        )
    return regions


def _spatial_ops(module: nn.Module) -> list[tuple[str, int]]:
    """``module``'s spatial operations in run order: ("conv", radius at its resolution) or ("up", factor).

    In the Wan2.1 decoder the layers are registered in the order they run and the only parallel branches
    (1x1 shortcuts, (3,1,1) time convolutions) have radius 0, so registration order is run order here.
    """
    ops: list[tuple[str, int]] = []
    for layer in module.modules():
        if isinstance(layer, WanUpsample):
            factor = layer.scale_factor
            ops.append(("up", int(factor[0] if isinstance(factor, tuple) else factor or 1)))
        elif isinstance(layer, (nn.Conv2d, nn.Conv3d)):
            if layer.stride[-1] != 1 or layer.dilation[-1] != 1:
                raise ValueError("the sharded decoder only handles stride-1, undilated decoder convolutions")
            if layer.kernel_size[-1] > 1:
                ops.append(("conv", (int(layer.kernel_size[-1]) - 1) // 2))
    return ops


def _needed(ops: Sequence[tuple[str, int]], lo: int, hi: int, size: int) -> tuple[int, int, int]:
    """The input pixels [lo', hi') that ``ops`` need to compute their output pixels [lo, hi) exactly.

    ``size`` is the axis length at the ops' output resolution; returns (lo', hi', size at the input). A
    convolution of radius r reads r more pixels each side; nearest upsampling by f reads pixel p // f.
    Clipping to the frame is exact: a shard touching a true border zero-pads it as the whole frame does.
    """
    for kind, amount in reversed(ops):
        if kind == "conv":
            lo, hi = max(0, lo - amount), min(size, hi + amount)
        else:
            lo, hi, size = lo // amount, (hi - 1) // amount + 1, size // amount
    return lo, hi, size


def _check_wan21(decoder: WanDecoder3d) -> None:
    attentions = decoder.mid_block.attentions
    if len(attentions) != 1 or not all(isinstance(block, WanUpBlock) for block in decoder.up_blocks):
        raise ValueError(
            "the sharded decoder handles the Wan2.1 VAE decoder (one mid-block attention, plain up blocks)"
        )


def crop_points(decoder: WanDecoder3d) -> list[nn.Module]:
    """The blocks after the mid-block attention, in run order, at whose input a shard is cropped.

    Residual blocks and upsamplers: each takes its causal cache from its own input, so cropping that
    input keeps input and cache the same region (a crop inside a block would not).
    """
    _check_wan21(decoder)
    points: list[nn.Module] = [*decoder.mid_block.resnets[1:]]
    for block in decoder.up_blocks:
        points += [*cast(nn.ModuleList, block.resnets)]
        if block.upsamplers is not None:
            points += [*cast(nn.ModuleList, block.upsamplers)]
    return points


@dataclass(frozen=True)
class AxisPlan:
    """Along one axis: the pixel range each crop point keeps (at its own resolution), and the output's."""

    crops: tuple[tuple[int, int], ...]  # [start, stop) at each crop point's input resolution
    scales: tuple[int, ...]  # each crop point's input resolution, in output pixels per latent pixel
    output: tuple[int, int]  # what the decoder's output covers, in output pixels


def axis_plan(
    decoder: WanDecoder3d, core: tuple[int, int], ext: tuple[int, int], latent_size: int, spatial_factor: int
) -> AxisPlan:
    """Where a shard's tensors are cropped along one axis so every block computes only what the core needs.

    The latent halo must cover the receptive radius of everything after the attention, but that radius is
    mostly spent at latent and 2x resolution: the 8x blocks, which hold most of the memory, need only the
    core plus the reach of the convolutions still to come (7 output pixels for the Wan2.1 VAE). Walking the
    decoder backwards from the core gives each block's needed input range; cropping every block's input to
    it leaves the core's values unchanged (what is dropped only fed pixels outside the core).
    """
    points = crop_points(decoder)
    tail = _spatial_ops(decoder.conv_out)
    lo, hi, size = _needed(tail, spatial_factor * core[0], spatial_factor * core[1], spatial_factor * latent_size)
    needs: list[tuple[int, int]] = []  # each point's needed input, last point first
    for point in reversed(points):
        lo, hi, size = _needed(_spatial_ops(point), lo, hi, size)
        needs.append((lo, hi))
    if size != latent_size:
        raise ValueError(f"decoder upsamples {spatial_factor * latent_size // size}x, expected {spatial_factor}x")
    crops, scales, scale = [], [], 1
    start, stop = ext  # what the tensor entering the first crop point covers: the extended shard
    for point, (need_lo, need_hi) in zip(points, reversed(needs), strict=True):
        start, stop = max(start, need_lo), min(stop, need_hi)  # a too-small halo keeps what it has
        crops.append((start, stop))
        scales.append(scale)
        factor = math.prod(amount for kind, amount in _spatial_ops(point) if kind == "up")
        start, stop, scale = start * factor, stop * factor, scale * factor
    return AxisPlan(tuple(crops), tuple(scales), (start, stop))


def decoder_halo(decoder: WanDecoder3d, spatial_factor: int = 8) -> int:
    """Latent pixels of halo a shard needs: the receptive radius of everything after the mid-block attention.

    15 for the Wan2.1 VAE: 2 convs in the mid block's second residual block (16 output pixels), 6 + the
    upsampler's conv per up block at 1x, 2x, 4x (48 + 4, 24 + 2, 12 + 1), 6 at 8x, conv_out 1 = 114
    output pixels; walked back exactly through the nearest upsamplings (`axis_plan`), a core [c0, c1)
    needs latent pixels [c0 - 15, c1 + 15).
    """
    # A core in the middle of a frame wide enough that no side is clipped.
    wide, core = 1024, (512, 513)
    plan = axis_plan(decoder, core, (0, wide), wide, spatial_factor)
    reach = max(core[0] - plan.crops[0][0], plan.crops[0][1] - core[1])
    before = sum(
        amount for point in (decoder.conv_in, decoder.mid_block.resnets[0]) for _, amount in _spatial_ops(point)
    )
    # The cores gathered for the attention must be exact: their stack must fit in the halo too.
    return max(reach, before)


class Collectives(Protocol):
    """The three collectives the sharded decoder needs (rank 0 is the root)."""

    rank: int
    size: int

    def announce(self, header: list[int]) -> None:
        """Rank 0: publish the next job's header."""
        ...

    def next_job(self) -> list[int] | None:
        """Ranks 1..N-1: wait, however long, for rank 0's next header; None once rank 0 is gone."""
        ...

    def broadcast(self, tensor: torch.Tensor) -> None: ...
    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...
    def gather_start(self, tensor: torch.Tensor) -> PendingGather: ...


class PendingGather(Protocol):
    def wait(self) -> list[torch.Tensor]:
        """Every rank's tensor on rank 0; an empty list elsewhere."""
        ...


class _GlooGather:
    def __init__(self, work: Any, outputs: list[torch.Tensor], keep: torch.Tensor) -> None:
        self._work, self._outputs, self._keep = work, outputs, keep  # keep: the input must outlive the send

    def wait(self) -> list[torch.Tensor]:
        self._work.wait()
        return self._outputs


class GlooCollectives:
    """A gloo process group of its own (not torch.distributed's global one), so a group can be torn down and
    built again inside a long-lived worker process after a rank died."""

    def __init__(self, store: Store, rank: int, size: int, timeout_seconds: float) -> None:
        # The options and the collective methods of a bare process group are bound in C++ without stubs.
        options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]  # loopback: ranks share a host
        options._timeout = timedelta(seconds=timeout_seconds)
        self.group: Any = ProcessGroupGloo(store, rank, size, options)
        self.store, self.rank, self.size = store, rank, size
        self._jobs = 0

    # Jobs are announced through the store, not a collective: a follower waits between jobs for as
    # long as the worker stays idle, while every collective keeps the group's (short) timeout.
    def announce(self, header: list[int]) -> None:
        self.store.set(f"job/{self._jobs}", ",".join(str(v) for v in header))
        self._jobs += 1

    def next_job(self) -> list[int] | None:
        key, parent = f"job/{self._jobs}", os.getppid()
        while True:
            try:
                self.store.wait([key], timedelta(seconds=_IDLE_POLL_SECONDS))
                break
            except RuntimeError:  # the poll timed out, or the store (rank 0's process) is gone
                if os.getppid() != parent:
                    return None
        self._jobs += 1
        return [int(v) for v in self.store.get(key).decode().split(",")]

    def broadcast(self, tensor: torch.Tensor) -> None:
        options = BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        outputs = [torch.empty_like(tensor) for _ in range(self.size)]
        self.group.allgather([outputs], [tensor]).wait()
        return outputs

    def gather_start(self, tensor: torch.Tensor) -> PendingGather:
        options = GatherOptions()
        options.rootRank = 0
        outputs = [torch.empty_like(tensor) for _ in range(self.size)] if self.rank == 0 else []
        work = self.group.gather([outputs] if self.rank == 0 else [], [tensor], options)
        return _GlooGather(work, outputs, tensor)


def _padded(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad the last two dims to ``height`` x ``width`` (collectives need equal shapes on every rank)."""
    return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2])).contiguous()


def assemble(pieces: Sequence[torch.Tensor], regions: Sequence[ShardRegion], scale: int) -> torch.Tensor:
    """Place every rank's (padded) core at its place in the whole frame, ``scale`` pixels per latent pixel."""
    height, width = regions[-1].core_rows[1], regions[-1].core_cols[1]
    whole = pieces[0].new_empty((*pieces[0].shape[:-2], scale * height, scale * width))
    for piece, region in zip(pieces, regions, strict=True):
        (r0, r1), (c0, c1) = region.core_rows, region.core_cols
        whole[..., scale * r0 : scale * r1, scale * c0 : scale * c1] = piece[
            ..., : scale * (r1 - r0), : scale * (c1 - c0)
        ]
    return whole


class GatheredAttention(nn.Module):
    """The mid block's frame-global attention, run on one rank's extended shard with the whole frame's keys.

    Takes the rank's extended shard [b, c, t, h, w] (exact in its core), gathers every core into the whole
    frame, and returns the extended shard of ``x + attention(x)`` computed as ``WanAttentionBlock`` computes
    it on the whole frame: queries from this shard, keys and values from every pixel of the frame.
    """

    def __init__(self, attention: WanAttentionBlock, comm: Collectives) -> None:
        super().__init__()
        self.attention = attention
        self.comm = comm
        self.regions: list[ShardRegion] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mine = self.regions[self.comm.rank]
        rows, cols = mine.core_in_ext()
        max_h = max(r.core_rows[1] - r.core_rows[0] for r in self.regions)
        max_w = max(r.core_cols[1] - r.core_cols[0] for r in self.regions)
        whole = assemble(self.comm.all_gather(_padded(x[..., rows, cols], max_h, max_w)), self.regions, 1)
        batch, channels, time, height, width = whole.shape
        ext = (slice(*mine.ext_rows), slice(*mine.ext_cols))
        identity = whole[..., ext[0], ext[1]]
        frames = whole.permute(0, 2, 1, 3, 4).reshape(batch * time, channels, height, width)
        qkv = self.attention.to_qkv(self.attention.norm(frames))
        # WanAttentionBlock's layout: one head, channels [q | k | v], tokens are pixels.
        q = qkv[:, :channels, ext[0], ext[1]]
        ext_h, ext_w = q.shape[-2:]
        q = q.reshape(batch * time, 1, channels, -1).permute(0, 1, 3, 2)
        k = qkv[:, channels : 2 * channels].reshape(batch * time, 1, channels, -1).permute(0, 1, 3, 2)
        v = qkv[:, 2 * channels :].reshape(batch * time, 1, channels, -1).permute(0, 1, 3, 2)
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        out = out.squeeze(1).permute(0, 2, 1).reshape(batch * time, channels, ext_h, ext_w)
        out = self.attention.proj(out).view(batch, time, channels, ext_h, ext_w).permute(0, 2, 1, 3, 4)
        return out + identity


class ShardedVaeDecoder:
    """One rank of a sharded streaming decode; rank 0 yields the frame chunks."""

    def __init__(self, base: StreamingVaeDecoder, grid: ShardGrid, comm: Collectives, halo: int | None = None) -> None:
        if grid.size != comm.size:
            raise ValueError(f"a {grid} grid needs {grid.size} ranks, the group has {comm.size}")
        self.base, self.grid, self.comm = base, grid, comm
        decoder = base.vae.decoder
        self.spatial_factor = int(base.vae.config["scale_factor_spatial"])
        self.halo = decoder_halo(decoder, self.spatial_factor) if halo is None else halo
        # This rank owns its VAE copy, so swapping the attention in leaves diffusers' forward as it is.
        current = decoder.mid_block.attentions[0]
        # A restarted group wraps the same VAE again: wrap the original attention, not the last wrapper.
        original = current.attention if isinstance(current, GatheredAttention) else current
        self.attention = GatheredAttention(cast(WanAttentionBlock, original), comm)
        decoder.mid_block.attentions[0] = self.attention
        # Each block after the attention crops its input to what this rank's core needs (`axis_plan`); the
        # crops are set per job (they depend on the frame size). A restarted group drops the last hooks.
        for handle in getattr(decoder, _CROP_HOOKS, []):
            handle.remove()
        self._crops: list[tuple[slice, slice]] = []
        handles = [
            point.register_forward_pre_hook(self._crop_hook(index)) for index, point in enumerate(crop_points(decoder))
        ]
        setattr(decoder, _CROP_HOOKS, handles)

    def _crop_hook(self, index: int) -> Any:
        def crop(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not self._crops:
                return None
            rows, cols = self._crops[index]
            return (args[0][..., rows, cols], *args[1:])

        return crop

    def _plan_crops(self, mine: ShardRegion, height: int, width: int) -> tuple[slice, slice]:
        """Set this job's crops; returns where the core lies in the decoder's (cropped) output."""
        decoder, scale = self.base.vae.decoder, self.spatial_factor
        rows = axis_plan(decoder, mine.core_rows, mine.ext_rows, height, scale)
        cols = axis_plan(decoder, mine.core_cols, mine.ext_cols, width, scale)
        crops, row_start, col_start = [], mine.ext_rows[0], mine.ext_cols[0]  # what enters the first point
        next_scales = [*rows.scales[1:], scale]
        for (r0, r1), (c0, c1), now, then in zip(rows.crops, cols.crops, rows.scales, next_scales, strict=True):
            crops.append((slice(r0 - row_start, r1 - row_start), slice(c0 - col_start, c1 - col_start)))
            row_start, col_start = r0 * then // now, c0 * then // now
        self._crops = crops
        top, left = scale * mine.core_rows[0] - rows.output[0], scale * mine.core_cols[0] - cols.output[0]
        return (
            slice(top, top + scale * (mine.core_rows[1] - mine.core_rows[0])),
            slice(left, left + scale * (mine.core_cols[1] - mine.core_cols[0])),
        )

    def iter_frames(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """Rank 0: decode ``latents`` [1, C, T, H, W] on every rank; yield uint8 chunks as ``StreamingVaeDecoder``."""
        for chunk in self.decode_chunks(latents):
            yield self.base.to_frames(chunk)

    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Rank 0: the decoder's float output per latent frame [1, 3, n, 8H, 8W], assembled from every rank."""
        self.base.check_latents(latents)
        latents = latents.to(self.base.device, dtype=torch.float32).contiguous()
        self.comm.announce([_DECODE, *(int(v) for v in latents.shape[2:])])
        self.comm.broadcast(latents)
        yield from self._decode(latents)

    def follow(self) -> bool:
        """Ranks 1..N-1: take part in rank 0's next decode; False once rank 0 called ``stop``."""
        header = self.comm.next_job()
        if header is None or header[0] != _DECODE:
            return False
        _, frames, height, width = header
        latents = torch.empty((1, self.base.z_dim, frames, height, width), dtype=torch.float32)
        self.comm.broadcast(latents)
        for _ in self._decode(latents):
            pass
        return True

    def stop(self) -> None:
        """Rank 0: end the other ranks' ``follow`` loops."""
        self.comm.announce([_STOP, 0, 0, 0])

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        height, width = int(latents.shape[3]), int(latents.shape[4])
        regions = shard_regions(self.grid, height, width, self.halo)
        self.attention.regions = regions
        mine, scale = regions[self.comm.rank], self.spatial_factor
        rows, cols = self._plan_crops(mine, height, width)
        max_h = scale * max(r.core_rows[1] - r.core_rows[0] for r in regions)
        max_w = scale * max(r.core_cols[1] - r.core_cols[0] for r in regions)
        # post_quant_conv and the denormalisation are per pixel: run them on the whole (small) latent frame.
        decoder_input = self.base.vae.post_quant_conv(self.base.denormalize(latents))
        shard = decoder_input[..., slice(*mine.ext_rows), slice(*mine.ext_cols)].contiguous()
        pending: PendingGather | None = None
        for out in self.base.decoder_steps(shard):
            # Gather chunk k in the background while this rank decodes chunk k+1.
            if pending is not None:
                yield from self._frames(pending, regions, scale)
            pending = self.comm.gather_start(_padded(out[..., rows, cols], max_h, max_w))
        if pending is not None:
            yield from self._frames(pending, regions, scale)

    def _frames(self, pending: PendingGather, regions: list[ShardRegion], scale: int) -> Iterator[torch.Tensor]:
        pieces = pending.wait()
        if self.comm.rank == 0:
            yield assemble(pieces, regions, scale)
