"""Pretext-task inputs built from a batch of views, as batched tensor ops.

The four tasks of "Revisiting self-supervised visual representation learning" (Kolesnikov,
Zhai and Beyer, 2019, §3): Rotation (Gidaris et al., 2018), Jigsaw (Noroozi & Favaro, 2016),
Relative patch location (Doersch et al., 2015) and Exemplar (Dosovitskiy et al., 2014; its
copies are plain `make_views` crops, nothing here).

Inputs are views as `make_views` gives them: float [B, C, S, S], normalised. Random draws
(tile jitter, neighbour choice) come from `generator`, a CPU torch.Generator, or from torch's
global CPU RNG when it is None: a method passes None, and the trainer checkpoints that RNG,
so a resumed run draws the same tiles. Draws are made on the CPU and moved to the images'
device, so a seed gives the same tiles on every device.

Tiles are numbered in raster order: tile k of a `grid` x `grid` layout sits in row
k // grid and column k % grid.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
from torch import Tensor

NUM_ROTATIONS = 4
# Relative patch location: the 8 neighbours of the centre tile of a 3 x 3 grid, raster order.
# Label u in 0..7 means the neighbour is tile RPL_NEIGHBOURS[u]: 0 = top-left, 1 = above,
# 2 = top-right, 3 = left, 4 = right, 5 = bottom-left, 6 = below, 7 = bottom-right.
RPL_CENTRE = 4
RPL_NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
MAX_PERMUTED_TILES = 9  # permutation_set enumerates all n! permutations: 9! = 362,880
MIN_HAMMING_100 = 6  # minimum pairwise Hamming distance of permutation_set(100, 9, seed)


def rotations(x: Tensor) -> tuple[Tensor, Tensor]:
    """All four rotations of every image, each a sample (Gidaris et al., 2018, as Revisiting
    trains it: every image of the batch in all four rotations, labels 0..3).

    x [B, C, H, W] with H == W -> (rotated [4B, C, H, W], labels [4B] int64). Block k (rows
    kB..(k+1)B - 1) is x rotated by k x 90 degrees counter-clockwise (`torch.rot90` with
    k), labelled k: `torch.rot90(rotated[kB:(k+1)B], -k, (-2, -1))` gives x back.
    """
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations need square images [B, C, S, S], got {tuple(x.shape)}")
    batch = x.shape[0]
    rotated = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=x.device).repeat_interleave(batch)  # [4B]
    return rotated, labels


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels-last when x is (the trainer's channels-last views), else contiguous: tiles and
    rotations cut from a view are laid out as the view was before they meet the backbone."""
    if (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    ):
        return torch.channels_last
    return torch.contiguous_format


def standardize(x: Tensor, dims: int = 3) -> Tensor:
    """Each item standardised on its own over its last `dims` dimensions: (x - mean) / s with
    s = max(std, 1 / sqrt(n)), n the item's element count -- TensorFlow's
    `per_image_standardization`, the "standardization" step of Revisiting's patch tasks, so a
    constant tile becomes 0 rather than noise. Noroozi & Favaro (2016) normalise each tile's
    mean and standard deviation on its own so that low-level statistics (brightness,
    contrast, colour cast) shared by neighbouring tiles don't tell where a tile belongs.
    """
    reduce = tuple(range(x.dim() - dims, x.dim()))
    n = math.prod(x.shape[-dims:])
    mean = x.mean(dim=reduce, keepdim=True)
    std = x.std(dim=reduce, keepdim=True, unbiased=False).clamp_min(1.0 / math.sqrt(n))
    return (x - mean) / std


def tile_layout(side: int, grid: int, gap: int) -> tuple[int, int, int]:
    """(cell, tile, margin) in pixels for a `grid` x `grid` layout on a side-pixel crop: cells of
    side // grid pixels, centred (margin pixels left over before the first cell), and tiles of
    cell - gap pixels. Raises ValueError when no pixel is left for the tiles."""
    if grid < 1 or gap < 0:
        raise ValueError(f"tile grid must be >= 1 and gap >= 0, got grid {grid}, gap {gap}")
    cell = side // grid
    if cell - gap < 1:
        raise ValueError(
            f"a {side} px crop cut {grid} x {grid} has {cell} px cells: no room for a gap of "
            f"{gap} px; use larger crops (views size) or a smaller gap"
        )
    return cell, cell - gap, (side - grid * cell) // 2


def tile_gap_jitter(
    side: int, grid: int, gap_fraction: float, jitter_fraction: float
) -> tuple[int, int]:
    """(gap, jitter) in pixels from fractions of the cell side (side // grid): gap rounded,
    jitter rounded and capped at gap // 2. Revisiting's 85 px cells with gap 0.25 and jitter
    0.125 give 21 and 10, its 64 px tiles; a 48 px crop of a 28 px image gives 16 px cells,
    gap 4, jitter 2, 12 px tiles. Raises ValueError when no pixel is left for a tile."""
    cell = side // grid
    gap = round(gap_fraction * cell)
    jitter = min(round(jitter_fraction * cell), gap // 2)
    tile_layout(side, grid, gap)
    return gap, jitter


def grid_tiles(
    x: Tensor,
    grid: int = 3,
    gap: int = 0,
    jitter: int = 0,
    generator: torch.Generator | None = None,
    standardize_tiles: bool = True,
) -> Tensor:
    """Cut every image into grid x grid tiles with gaps and jitter, in raster order.

    x [B, C, S, S] -> tiles [B, grid^2, C, t, t], t = S // grid - gap. Tile k is cut from
    cell (k // grid, k % grid); inside its cell it sits `gap // 2` pixels from the cell's
    top-left corner, shifted by an integer in [-jitter, jitter] drawn per tile and axis. So
    neighbouring tiles are at least gap - 2 jitter pixels apart, and neither edge continuity
    nor exact alignment tells how tiles fit (Doersch et al., 2015, leave gaps between patches
    and jitter their positions for this reason). Revisiting cuts 64 px tiles from 85 px cells
    at random: gap 21, jitter 10 here. Needs 0 <= 2 jitter <= gap.
    """
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"tiles need square images [B, C, S, S], got {tuple(x.shape)}")
    if jitter < 0 or 2 * jitter > gap:
        raise ValueError(f"tile jitter must satisfy 0 <= 2 * jitter <= gap, got {jitter}, {gap}")
    batch, side = x.shape[0], x.shape[-1]
    cell, tile, margin = tile_layout(side, grid, gap)
    count = grid * grid
    shift = torch.randint(-jitter, jitter + 1, (batch, count, 2), generator=generator)
    k = torch.arange(count)
    top = margin + (k // grid) * cell + gap // 2 + shift[..., 0]  # [B, count] CPU
    left = margin + (k % grid) * cell + gap // 2 + shift[..., 1]  # [B, count]
    steps = torch.arange(tile)
    rows = (top[..., None] + steps).to(x.device)  # [B, count, t]
    cols = (left[..., None] + steps).to(x.device)  # [B, count, t]
    b = torch.arange(batch, device=x.device)[:, None, None, None]
    # advanced indices around the channel slice broadcast to [B, count, t, t] and come first
    tiles = x[b, :, rows[:, :, :, None], cols[:, :, None, :]]  # [B, count, t, t, C]
    tiles = tiles.permute(0, 1, 4, 2, 3)  # [B, count, C, t, t]
    return standardize(tiles) if standardize_tiles else tiles.contiguous()


def jigsaw_tiles(
    x: Tensor,
    permutations: Tensor,
    grid: int = 3,
    gap: int = 0,
    jitter: int = 0,
    generator: torch.Generator | None = None,
    standardize_tiles: bool = True,
) -> tuple[Tensor, Tensor]:
    """A shuffled jigsaw puzzle per image (Noroozi & Favaro, 2016).

    x [B, C, S, S], permutations [P, grid^2] int64 (e.g. `permutation_set`) -> (tiles
    [B, grid^2, C, t, t], labels [B] int64 in [0, P)). Position j of image b holds its
    original tile permutations[labels[b], j], so `out[b, argsort(perm)]` restores raster
    order. Tiles are cut as `grid_tiles` cuts them and standardised one by one.
    """
    tiles = grid_tiles(x, grid, gap, jitter, generator, standardize_tiles)  # [B, T, C, t, t]
    if permutations.dim() != 2 or permutations.shape[1] != tiles.shape[1]:
        raise ValueError(
            f"permutations must be [P, {tiles.shape[1]}] for a {grid} x {grid} grid, "
            f"got {tuple(permutations.shape)}"
        )
    labels = torch.randint(0, permutations.shape[0], (x.shape[0], 1), generator=generator)
    shuffled = shuffle_tiles(tiles, permutations.to(x.device), labels.to(x.device))
    return shuffled[:, 0], labels[:, 0].to(x.device)


def shuffle_tiles(tiles: Tensor, permutations: Tensor, labels: Tensor) -> Tensor:
    """K puzzles per image from one set of tiles (or of tile embeddings).

    tiles [N, T, ...] in raster order, permutations [P, T], labels [N, K] in [0, P) ->
    [N, K, T, ...] where out[n, k, j] = tiles[n, permutations[labels[n, k], j]]: position j
    of puzzle k holds tile permutations[labels[n, k], j].
    """
    order = permutations[labels]  # [N, K, T]
    n, k, count = order.shape
    rest = tiles.shape[2:]
    expanded = tiles[:, None].expand(n, k, count, *rest)  # [N, K, T, ...]
    index = order.view(n, k, count, *([1] * len(rest))).expand_as(expanded)
    return expanded.gather(2, index)


def relative_patches(
    x: Tensor,
    gap: int = 0,
    jitter: int = 0,
    generator: torch.Generator | None = None,
    standardize_tiles: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Relative patch location (Doersch et al., 2015): the centre tile of a 3 x 3 grid and one
    of its 8 neighbours, drawn per image; predict which.

    x [B, C, S, S] -> (centre [B, C, t, t], neighbour [B, C, t, t], labels [B] int64 in 0..7);
    the neighbour is tile RPL_NEIGHBOURS[label] (see the module constants for the layout).
    """
    tiles = grid_tiles(x, 3, gap, jitter, generator, standardize_tiles)  # [B, 9, C, t, t]
    labels = torch.randint(0, len(RPL_NEIGHBOURS), (x.shape[0],), generator=generator)
    index = torch.tensor(RPL_NEIGHBOURS)[labels].to(x.device)  # [B] tile numbers
    batch = torch.arange(x.shape[0], device=x.device)
    return tiles[:, RPL_CENTRE], tiles[batch, index], labels.to(x.device)


@functools.lru_cache(maxsize=8)
def _permutation_set(n: int, num_tiles: int, seed: int) -> Tensor:
    total = math.factorial(num_tiles)
    flat = itertools.chain.from_iterable(itertools.permutations(range(num_tiles)))
    every = torch.from_numpy(np.fromiter(flat, dtype=np.uint8, count=total * num_tiles))
    every = every.view(total, num_tiles)  # [num_tiles!, num_tiles], lexicographic order
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(0, total, (1,), generator=generator))]
    min_dist = torch.full((total,), num_tiles + 1, dtype=torch.int16)  # to the chosen set
    sum_dist = torch.zeros(total, dtype=torch.int32)
    for _ in range(n - 1):
        dist = (every != every[chosen[-1]]).sum(dim=1, dtype=torch.int16)  # [total] Hamming
        min_dist = torch.minimum(min_dist, dist)
        sum_dist += dist
        # max-min first; among ties the largest summed distance (Noroozi's criterion); then
        # the first in lexicographic order. Chosen ones have min distance 0 and never return.
        score = min_dist.int() * (num_tiles * n + 1) + sum_dist
        chosen.append(int(score.argmax()))
    return every[chosen].long()


def permutation_set(n: int = 100, num_tiles: int = 9, seed: int = 0) -> Tensor:
    """n permutations of num_tiles tiles, far apart in Hamming distance: [n, num_tiles] int64.

    Greedy selection (Noroozi & Favaro, 2016, Algorithm 1): start from one permutation drawn
    from `seed`, then repeatedly add the permutation farthest from the set. Noroozi's
    "maximal" set maximises the summed distance to the set; here the minimum distance to the
    set comes first (farthest-point selection) and the sum breaks ties, so the set's minimum
    pairwise Hamming distance -- how alike the two most confusable puzzles are -- is as large
    as this greedy walk makes it: MIN_HAMMING_100 = 6 for n = 100 of 9 tiles (mean distance
    8.08). Minimum 8 is out of reach: at most 9 x 8 = 72 permutations of 9 symbols differ
    pairwise in 8 or more places. Deterministic in (n, num_tiles, seed); cached per process.
    """
    if not 2 <= num_tiles <= MAX_PERMUTED_TILES:
        raise ValueError(f"permutation_set needs 2..9 tiles, got {num_tiles}")
    if not 1 <= n <= math.factorial(num_tiles):
        raise ValueError(
            f"permutation_set: n must be in [1, {math.factorial(num_tiles)}] for {num_tiles} "
            f"tiles, got {n}"
        )
    return _permutation_set(n, num_tiles, seed).clone()
