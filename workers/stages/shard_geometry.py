"""Where each rank of a sharded decode works: the grid, each rank's shard and halo, and how far every
block of the Wan VAE decoder reaches (the halo and the per-block crops of ``workers.stages.sharded_decode``).

Pure geometry over the decoder's own layer stack: nothing here decodes or talks to another rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from diffusers.models.autoencoders.autoencoder_kl_wan import WanDecoder3d, WanResidualUpBlock, WanUpBlock, WanUpsample
from torch import nn


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
    (1x1 shortcuts, (3,1,1) time convolutions) have radius 0, so registration order is run order here. The
    Wan2.2 decoder's residual up blocks add one more parallel branch, their DupUp3D shortcut: no convolution,
    a 2x channel-to-space upsampling of the block's input, whose reach lies inside the main branch's.
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


def _check_wan_decoder(decoder: WanDecoder3d) -> None:
    attentions = decoder.mid_block.attentions
    plain = all(isinstance(block, WanUpBlock) for block in decoder.up_blocks)
    residual = all(isinstance(block, WanResidualUpBlock) for block in decoder.up_blocks)
    if len(attentions) != 1 or not (plain or residual):
        raise ValueError(
            "the sharded decoder handles the Wan2.1 and Wan2.2 VAE decoders (one mid-block attention, "
            "plain or residual up blocks)"
        )


def crop_points(decoder: WanDecoder3d) -> list[nn.Module]:
    """The blocks after the mid-block attention, in run order, at whose input a shard is cropped.

    Wan2.1: residual blocks and upsamplers. Each takes its causal cache from its own input, so cropping
    that input keeps input and cache the same region (a crop inside a block would not). Wan2.2: whole
    residual up blocks, because each adds its own input (through the DupUp3D shortcut) to its output: a
    crop at one of its residual blocks would leave that shortcut's input uncropped.
    """
    _check_wan_decoder(decoder)
    points: list[nn.Module] = [*decoder.mid_block.resnets[1:]]
    for block in decoder.up_blocks:
        if isinstance(block, WanResidualUpBlock):
            points.append(block)
            continue
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

    Walked from the decoder's own layers, so it follows the VAE's config (``spatial_factor`` is the
    decoder's own upsampling, 8 for both Wan VAEs: Wan2.2's 16x is 8x then 2x2 patches). 15 for the Wan2.1 VAE: 2 convs in the mid block's second residual block (16 output pixels), 6 + the
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
