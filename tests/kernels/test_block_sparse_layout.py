"""Block layouts: each pattern against its definition written out block by block
(exact membership), the compressed row form, density, and bad input."""

import pytest
import torch

from infermatrix.kernels import block_sparse_layout as L


def expected(n, keep, causal):
    """The (n, n) block mask of a predicate keep(i, j), written as a plain loop."""
    return torch.tensor([[bool(keep(i, j)) and (not causal or j <= i) for j in range(n)] for i in range(n)])


def element_mask(blocks, seq, bs, causal):
    """Every (query, key) position pair: its blocks' entry, and key <= query when causal."""
    pos = torch.arange(seq)
    mask = blocks[pos[:, None] // bs, pos[None, :] // bs]
    return mask & (pos[None, :] <= pos[:, None]) if causal else mask


CASES = [  # layout, predicate on (query block i, key block j), causal; seq 512 / block 32 -> 16 blocks
    (lambda: L.causal(512, 32), lambda i, j: True, True),
    (lambda: L.sliding_window(512, 32, 96), lambda i, j: 0 <= i - j < 3, True),
    (lambda: L.sliding_window(512, 32, 96, causal=False), lambda i, j: abs(i - j) < 3, False),
    (lambda: L.strided(512, 32, 128), lambda i, j: i - j < 4 or (i - j) % 4 == 0, True),
    (lambda: L.strided(512, 32, 128, causal=False), lambda i, j: abs(i - j) < 4 or (i - j) % 4 == 0, False),
    (lambda: L.fixed(512, 32, 128), lambda i, j: i // 4 == j // 4 or j % 4 == 3, True),
    (lambda: L.fixed(512, 32, 128, summary=64, causal=False), lambda i, j: i // 4 == j // 4 or j % 4 >= 2, False),
    (lambda: L.longformer(512, 32, 64, global_tokens=[0, 300]),
     lambda i, j: 0 <= i - j < 2 or i in (0, 9) or j in (0, 9), True),
    (lambda: L.bigbird(512, 32, 64, n_global=2, n_random=0), lambda i, j: abs(i - j) < 2 or i < 2 or j < 2, True),
    (lambda: L.from_block_fn(512, 32, lambda i, j: (i + j) % 3 == 0), lambda i, j: (i + j) % 3 == 0, False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_each_pattern_has_exactly_the_blocks_of_its_definition(case):
    build, keep, causal = CASES[case]
    layout = build()
    want = expected(16, keep, causal)
    assert torch.equal(layout.block_mask()[0], want)
    assert layout.causal is causal
    assert torch.equal(layout.dense_mask()[0], element_mask(want, 512, 32, causal))
    assert layout.density == pytest.approx(want.float().mean().item())


def test_compressed_rows_are_int32_counts_and_ascending_indices():
    layout = L.strided(512, 32, 128)
    assert layout.kv_num_blocks.dtype == layout.kv_indices.dtype == torch.int32
    assert layout.kv_num_blocks.shape == (1, 16) and layout.kv_indices.shape[:2] == (1, 16)
    blocks = layout.block_mask()[0]
    for i in range(16):
        count = int(layout.kv_num_blocks[0, i])
        assert layout.kv_indices[0, i, :count].tolist() == blocks[i].nonzero().flatten().tolist()


def test_bigbird_random_blocks_are_seeded_counted_and_causal():
    a = L.bigbird(1024, 32, 64, n_global=1, n_random=3, seed=7)
    b = L.bigbird(1024, 32, 64, n_global=1, n_random=3, seed=7)
    c = L.bigbird(1024, 32, 64, n_global=1, n_random=3, seed=8)
    assert torch.equal(a.block_mask(), b.block_mask()) and not torch.equal(a.block_mask(), c.block_mask())
    base = expected(32, lambda i, j: abs(i - j) < 2 or i < 1 or j < 1, True)
    extra = a.block_mask()[0] & ~base
    assert not (a.block_mask()[0] & ~torch.ones(32, 32, dtype=torch.bool).tril()).any()  # nothing above the diagonal
    assert (extra.sum(-1) <= 3).all() and extra.sum() > 0  # at most n_random new blocks per row
    # a causal row's random blocks do not depend on the sequence length (KV-cache decode = recompute)
    longer = L.bigbird(2048, 32, 64, n_global=1, n_random=3, seed=7)
    assert torch.equal(longer.block_mask()[0, :32, :32], a.block_mask()[0])


def test_per_head_layout_from_a_block_function():
    layout = L.from_block_fn(256, 32, lambda h, i, j: (i - j <= h) & (j <= i), causal=True, heads=3)
    assert layout.heads == 3
    for h in range(3):
        assert torch.equal(layout.block_mask()[h], expected(8, lambda i, j, h=h: i - j <= h, True))


def test_short_last_block_and_rows_mask():
    layout = L.sliding_window(100, 32, 64)  # blocks 0..3, the last one 4 positions long
    assert layout.n_blocks == 4 and layout.dense_mask().shape == (1, 100, 100)
    want = element_mask(expected(4, lambda i, j: 0 <= i - j < 2, True), 100, 32, True)
    assert torch.equal(layout.dense_mask()[0], want)
    pos = torch.tensor([[0, 33, 99]])
    assert torch.equal(layout.rows_mask(pos)[0, 0], want[[0, 33, 99]])


def test_density_and_picture():
    layout = L.sliding_window(4096, 64, 256)
    n = 64
    assert layout.density == pytest.approx(sum(min(i + 1, 4) for i in range(n)) / n ** 2)
    grid = layout.grid(16).split("/")
    assert len(grid) == 16 and all(len(row) == 16 for row in grid)
    assert grid[5][5] != "0" and grid[5][0] == "0" and grid[0][15] == "0"  # the band, nothing off it


def test_a_query_block_with_no_key_block_is_an_error_at_layout_time():
    with pytest.raises(ValueError, match="query block 1 .*attends to no key block"):
        L.from_block_fn(128, 32, lambda i, j: (i != 1) & (j == 0))
    with pytest.raises(ValueError, match="attends to no key block"):  # only blocks above the diagonal
        L.from_block_fn(128, 32, lambda i, j: j == 3, causal=True)


@pytest.mark.parametrize("call, match", [
    (lambda: L.sliding_window(512, 32, 100), "window=100 is not a multiple of block_size=32"),
    (lambda: L.strided(512, 64, 96), "stride=96 is not a multiple of block_size=64"),
    (lambda: L.fixed(512, 32, 64, summary=128), "summary=128 exceeds stride=64"),
    (lambda: L.sliding_window(512, 0, 64), "block_size must be a positive integer"),
    (lambda: L.longformer(512, 32, 64, global_tokens=[600]), "global_tokens"),
    (lambda: L.make_layout("sliding", 512, 32, window=64, stride=64), "has no parameter 'stride'"),
    (lambda: L.make_layout("sliding", 512, 32), "needs 'window'"),
    (lambda: L.make_layout("diagonal", 512, 32), "unknown block layout pattern 'diagonal'"),
    (lambda: L.bigbird(512, 32, 64, n_random=-1), "n_random must be a non-negative integer"),
])
def test_bad_input_names_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_make_layout_by_name():
    layout = L.make_layout("bigbird", 512, 32, window=64, n_global=1, n_random=1, seed=3)
    assert layout.pattern == "bigbird" and torch.equal(
        layout.block_mask(), L.bigbird(512, 32, 64, 1, 1, 3).block_mask())


@pytest.mark.parametrize("window, block, seq", [(8, 8, 40), (5, 4, 23), (1, 4, 9), (40, 16, 100)])
def test_a_token_window_is_exactly_a_models_sliding_window(window, block, seq):
    """token_window: query q sees keys q-window+1 .. q, whole number of blocks or not;
    each active block holds a visible key; decode rows and prefixes keep the window."""
    layout = L.token_window(seq, block, window)
    q, k = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    rule = (k <= q) & (q - k < window)
    assert torch.equal(layout.dense_mask()[0], rule) and layout.window == window
    assert torch.equal(layout.rows_mask(torch.arange(seq))[0], rule)
    blocks = layout.block_mask()[0]
    for i, j in blocks.nonzero().tolist():
        assert rule[i * block:(i + 1) * block, j * block:(j + 1) * block].any(), (i, j)
    assert all(torch.equal(layout.row_keys(p), rule[p].nonzero()[:, 0]) for p in range(seq))
    assert torch.equal(layout.prefix(seq - 1).dense_mask()[0], rule[:-1, :-1])
