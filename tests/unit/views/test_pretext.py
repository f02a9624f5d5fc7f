"""Pretext-task inputs: labels checked against independent geometry (explicit index formulas,
coordinate-encoding images, brute-force Hamming distances)."""

import itertools

import numpy as np
import pytest
import torch

from wildsight.views.pretext import (
    MIN_HAMMING_100,
    grid_tiles,
    jigsaw_tiles,
    permutation_set,
    relative_patches,
    rotations,
    standardize,
    tile_gap_jitter,
    tile_layout,
)


def _coordinate_images(batch: int, side: int) -> torch.Tensor:
    """[B, 3, S, S]: channel 0 holds the row, channel 1 the column, channel 2 the image index."""
    rows = torch.arange(side, dtype=torch.float32).view(side, 1).expand(side, side)
    cols = torch.arange(side, dtype=torch.float32).view(1, side).expand(side, side)
    out = torch.empty(batch, 3, side, side)
    out[:, 0], out[:, 1] = rows, cols
    out[:, 2] = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1)
    return out


# --- rotation -------------------------------------------------------------------------------


def test_rotated_back_equals_the_original():
    x = torch.randn(3, 2, 5, 5)
    rotated, labels = rotations(x)
    assert rotated.shape == (12, 2, 5, 5)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        block = rotated[3 * k : 3 * (k + 1)]
        assert torch.equal(torch.rot90(block, -k, dims=(-2, -1)), x)
        # label k is k quarter turns counter-clockwise, by the index formula of one turn:
        # out[i, j] = in[j, S - 1 - i], applied k times
        want = x.clone()
        for _ in range(k):
            want = torch.stack(
                [torch.stack([want[..., j, 4 - i] for j in range(5)], -1) for i in range(5)], -2
            )
        assert torch.equal(block, want)


def test_rotations_need_square_images():
    with pytest.raises(ValueError, match="square"):
        rotations(torch.zeros(1, 3, 4, 5))


# --- jigsaw ---------------------------------------------------------------------------------


def test_jigsaw_tiles_unpermuted_reassemble_the_crop():
    x = torch.randn(4, 3, 12, 12)
    perms = permutation_set(100, 9, seed=0)
    tiles, labels = jigsaw_tiles(
        x, perms, grid=3, gap=0, jitter=0, generator=torch.Generator().manual_seed(1),
        standardize_tiles=False,
    )  # fmt: skip
    assert tiles.shape == (4, 9, 3, 4, 4) and labels.shape == (4,)
    for b in range(4):
        perm = perms[labels[b]].tolist()
        original = [None] * 9
        for position, tile in enumerate(perm):  # position j holds tile perm[j]
            original[tile] = tiles[b, position]
        image = torch.cat(
            [torch.cat(original[3 * r : 3 * r + 3], dim=-1) for r in range(3)], dim=-2
        )
        assert torch.equal(image, x[b])


def test_tiles_sit_in_their_cells_within_the_jitter():
    side, grid, gap, jitter = 30, 3, 4, 2  # 10 px cells, 6 px tiles, offsets 2 +- 2
    x = _coordinate_images(16, side)
    tiles = grid_tiles(
        x, grid, gap, jitter, torch.Generator().manual_seed(0), standardize_tiles=False
    )
    assert tiles.shape == (16, 9, 3, 6, 6)
    offsets = set()
    for b in range(16):
        for k in range(9):
            tile = tiles[b, k]
            top, left = int(tile[0, 0, 0]), int(tile[1, 0, 0])
            # the tile is the contiguous window at (top, left) of image b
            assert torch.equal(tile, x[b, :, top : top + 6, left : left + 6])
            dy, dx = top - (k // 3) * 10, left - (k % 3) * 10
            assert 0 <= dy <= 4 and 0 <= dx <= 4  # inside cell k, gap // 2 +- jitter
            offsets.add((dy, dx))
    assert len(offsets) > 10  # jitter varies per tile


def test_tiles_are_standardised_one_by_one():
    x = torch.rand(2, 3, 9, 9) * 5 + 3
    x[1, :, :3, :3] = 0.7  # a constant tile becomes zeros, not noise
    tiles = grid_tiles(x, 3, 0, 0, standardize_tiles=True)
    flat = tiles.flatten(2)  # [2, 9, 27]
    assert torch.allclose(flat[0].mean(-1), torch.zeros(9), atol=1e-5)
    assert torch.allclose(flat[0].std(-1, unbiased=False), torch.ones(9), atol=1e-4)
    assert flat[1, 0].abs().max() < 1e-5
    # standardize is TF's per_image_standardization: (x - mean) / max(std, 1 / sqrt(n))
    v = torch.randn(5, 2, 3, 3)
    n = 18
    want = (v - v.mean((1, 2, 3), keepdim=True)) / torch.clamp(
        v.flatten(1).std(1, unbiased=False).view(5, 1, 1, 1), min=1 / n**0.5
    )
    assert torch.allclose(standardize(v), want, atol=1e-6)


def test_jigsaw_draws_are_seeded():
    x = torch.randn(8, 3, 24, 24)
    perms = permutation_set(100)
    a = jigsaw_tiles(x, perms, 3, 4, 2, torch.Generator().manual_seed(5))
    b = jigsaw_tiles(x, perms, 3, 4, 2, torch.Generator().manual_seed(5))
    c = jigsaw_tiles(x, perms, 3, 4, 2, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_revisiting_tile_geometry_and_bad_sizes():
    # Revisiting: 255 px crops, 3 x 3 cells of 85 px, 64 px tiles (patch jitter 21)
    gap, jitter = tile_gap_jitter(255, 3, 0.25, 0.125)
    assert (gap, jitter) == (21, 10)
    assert tile_layout(255, 3, gap) == (85, 64, 0)
    assert tile_gap_jitter(48, 3, 0.25, 0.125) == (4, 2)  # the tiny preset: 12 px tiles
    with pytest.raises(ValueError, match="no room"):
        tile_layout(8, 3, 2)
    with pytest.raises(ValueError, match="jitter"):
        grid_tiles(torch.zeros(1, 3, 30, 30), 3, gap=2, jitter=2)


# --- permutation set ------------------------------------------------------------------------


def _hamming(p, q):
    return sum(a != b for a, b in zip(p, q, strict=True))


def test_permutation_set_minimum_hamming_distance_by_brute_force():
    perms = permutation_set(100, 9, seed=0).tolist()
    assert len(perms) == 100 and all(sorted(p) == list(range(9)) for p in perms)
    assert len({tuple(p) for p in perms}) == 100
    pairwise = [_hamming(p, q) for p, q in itertools.combinations(perms, 2)]
    assert min(pairwise) == MIN_HAMMING_100
    assert np.mean(pairwise) > 8.0  # Noroozi & Favaro's "maximal" sets average about 8
    for seed in (1,):
        others = permutation_set(100, 9, seed=seed).tolist()
        assert min(_hamming(p, q) for p, q in itertools.combinations(others, 2)) == MIN_HAMMING_100


def test_permutation_set_is_greedy_farthest_point():
    """Each new permutation is as far (minimum Hamming distance to those before it) as any of
    the 9! permutations could be: checked against every permutation, enumerated separately."""
    perms = permutation_set(100, 9, seed=0).numpy()
    every = np.array(list(itertools.permutations(range(9))), dtype=np.int8)  # [362880, 9]
    to_set = np.full(len(every), 10)  # [9!] minimum distance to perms[:k]
    for k in range(1, 100):
        np.minimum(to_set, (every != perms[k - 1]).sum(1), out=to_set)
        chosen = min(_hamming(perms[k], p) for p in perms[:k].tolist())
        assert chosen == to_set.max(), k


def test_permutation_set_is_deterministic():
    a, b = permutation_set(100, 9, seed=0), permutation_set(100, 9, seed=0)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert not torch.equal(a, permutation_set(100, 9, seed=1))
    a[0, 0] = 99  # a copy: the cache stays intact
    assert permutation_set(100, 9, seed=0)[0, 0] != 99
    assert permutation_set(24, 4).shape == (24, 4)  # 2 x 2 grid: every permutation
    with pytest.raises(ValueError, match="n must be"):
        permutation_set(25, 4)


# --- relative patch location ----------------------------------------------------------------


def test_rpl_label_matches_the_neighbour_position():
    # the 8 positions around the centre, raster order, as (row step, column step)
    positions = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
    x = _coordinate_images(64, 36)  # 12 px cells
    centre, neighbour, labels = relative_patches(
        x, gap=4, jitter=2, generator=torch.Generator().manual_seed(0), standardize_tiles=False
    )
    assert centre.shape == neighbour.shape == (64, 3, 8, 8)
    assert set(labels.tolist()) == set(range(8))  # 64 draws cover every label
    for b in range(64):
        assert centre[b, 2, 0, 0] == b and neighbour[b, 2, 0, 0] == b  # from its own image
        # centre tile sits in the middle cell (rows/cols 12..23)
        assert 12 <= centre[b, 0, 0, 0] and centre[b, 0, -1, -1] <= 23
        dr = round(float(neighbour[b, 0].mean() - centre[b, 0].mean()) / 12)
        dc = round(float(neighbour[b, 1].mean() - centre[b, 1].mean()) / 12)
        assert positions[int(labels[b])] == (dr, dc)


def test_shuffle_tiles_many_puzzles_per_image():
    from wildsight.views.pretext import shuffle_tiles

    tiles = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [N, T, E]
    perms = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]])
    labels = torch.tensor([[1, 2], [0, 1]])  # [N, K]
    out = shuffle_tiles(tiles, perms, labels)  # [N, K, T, E]
    assert out.shape == (2, 2, 4, 3)
    for n in range(2):
        for k in range(2):
            for j in range(4):
                assert torch.equal(out[n, k, j], tiles[n, perms[labels[n, k], j]])
