"""Sharded streaming decode: the Wan VAE's causal decoder (Wan2.1's, or Wan2.2's) spread over a grid of ranks.

For the Wan2.2 VAE everything below holds at its decoder's own 8x (its 2x2 output patches are
unpatchified after assembly, in ``StreamingVaeDecoder.to_frames``), with whole residual up blocks as the
crop points (`workers.stages.shard_geometry.crop_points`); its halo is 15 latent pixels too.

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

from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock
from torch import nn

from workers.stages.decode import StreamingVaeDecoder
from workers.stages.shard_collectives import Collectives, GlooCollectives, PendingGather
from workers.stages.shard_geometry import (
    AxisPlan,
    ShardGrid,
    ShardRegion,
    axis_plan,
    crop_points,
    decoder_halo,
    shard_regions,
)

# Re-exported: the decode group and the benchmark import the geometry and the collectives from here.
__all__ = [
    "AxisPlan",
    "Collectives",
    "GatheredAttention",
    "GlooCollectives",
    "PendingGather",
    "ShardGrid",
    "ShardRegion",
    "ShardedVaeDecoder",
    "assemble",
    "axis_plan",
    "crop_points",
    "decoder_halo",
    "shard_regions",
]

_STOP, _DECODE = 0, 1  # the header's first field
_CROP_HOOKS = "_reelfarm_shard_crop_hooks"  # the decoder attribute holding this rank's crop hook handles


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
        # The decoder's own factor (8): a Wan2.2 VAE's 2x2 patches are unpatchified after assembly (`to_frames`).
        self.spatial_factor = base.decoder_spatial_factor
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
