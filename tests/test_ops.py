"""The pure token functions against brute-force references."""

import pytest
import torch

from bsr.core.ops import (attention_probs_scores, cls_attention_scores, drop_tokens, fuse_tokens, gather_tokens,
                          kept_count, mean_attention_scores, select_tokens, token_counts)


@pytest.mark.parametrize("num_tokens,keep_rate,expected", [
    (197, 0.5, 98), (100, 0.5, 50), (52, 0.5, 26), (11, 0.7, 7), (197, 1.0, 196), (197, 0.01, 2), (1, 0.5, 0),
    (65, 0.3, 20),
])
def test_kept_count(num_tokens, keep_rate, expected):
    assert kept_count(num_tokens, keep_rate) == expected


def test_token_counts_vit_b16_224_spec_table():
    # SPEC section 1: attention / MLP tokens per block with the defaults.
    expected = [(197, 197)] * 3 + [(197, 100)] + [(100, 100)] * 2 + [(100, 52)] + [(52, 52)] * 2 + [(52, 28)] + \
        [(28, 28)] * 2
    assert token_counts(197, 12, [3, 6, 9], 0.5, True) == expected


def test_token_counts_without_fuse_and_disabled():
    assert [m for _, m in token_counts(197, 12, [3, 6, 9], 0.5, False)][3::3] == [99, 50, 26]
    assert token_counts(197, 12, [3, 6, 9], 1.0, True) == [(197, 197)] * 12


def _brute_scores(q, k, scale):
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)  # full (B, H, N, N)
    return attn.mean(1)[:, 0, 1:]


def test_cls_attention_scores_match_full_attention_row():
    torch.manual_seed(0)
    q, k = torch.randn(3, 4, 17, 8), torch.randn(3, 4, 17, 8)
    scores = cls_attention_scores(q, k, 8 ** -0.5)
    assert scores.shape == (3, 16)
    torch.testing.assert_close(scores, _brute_scores(q, k, 8 ** -0.5))


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("chunk", [0, 1, 5, 64])
def test_mean_attention_scores_match_the_full_matrix(prefix, chunk):
    torch.manual_seed(4)
    q, k = torch.randn(2, 3, 19, 6), torch.randn(2, 3, 19, 6)
    full = ((q @ k.transpose(-2, -1)) * 6 ** -0.5).softmax(-1)  # (B, H, N, N)
    expected = torch.tensor([[sum(full[b, h, i, j].item() for h in range(3) for i in range(19)) / (3 * 19)
                              for j in range(prefix, 19)] for b in range(2)])
    scores = mean_attention_scores(q, k, 6 ** -0.5, prefix, chunk)
    assert scores.shape == (2, 19 - prefix)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(attention_probs_scores(full, "mean", prefix), expected)
    if prefix == 0:  # every query's row sums to 1, so the mean received attention does too
        torch.testing.assert_close(scores.sum(1), torch.ones(2))


def test_cls_scores_skip_every_prefix_token():
    torch.manual_seed(5)
    q, k = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4)
    full = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1)
    torch.testing.assert_close(cls_attention_scores(q, k, 0.5, prefix=5), full.mean(1)[:, 0, 5:])
    torch.testing.assert_close(attention_probs_scores(full, "cls", 5), full.mean(1)[:, 0, 5:])


def test_drop_tokens_keeps_registers_in_front():
    torch.manual_seed(6)
    x, scores = torch.randn(2, 3 + 8, 4), torch.rand(2, 8)
    out, keep = drop_tokens(x, scores, 0.5, fuse=True, prefix=3)
    assert out.shape == (2, 3 + 4 + 1, 4) and torch.equal(out[:, :3], x[:, :3])
    for b in range(2):
        assert torch.equal(out[b, 3:7], x[b, keep[b] + 3])
    assert token_counts(3 + 8, 2, [0], 0.5, True, prefix=3) == [(11, 8), (8, 8)]
    assert kept_count(3 + 8, 0.01, prefix=3) == 1  # ceil: never every patch


@pytest.mark.parametrize("n,k", [(16, 8), (16, 1), (16, 16), (5, 3)])
def test_select_tokens_keeps_exactly_the_top_k(n, k):
    torch.manual_seed(1)
    scores = torch.rand(4, n)
    keep, drop = select_tokens(scores, k)
    assert keep.shape == (4, k) and drop.shape == (4, n - k)
    for b in range(4):
        expected = set(torch.argsort(scores[b], descending=True)[:k].tolist())
        assert set(keep[b].tolist()) == expected
        assert set(keep[b].tolist()) | set(drop[b].tolist()) == set(range(n))
        assert keep[b].tolist() == sorted(keep[b].tolist()) and drop[b].tolist() == sorted(drop[b].tolist())
        if k < n:
            assert scores[b, keep[b]].min() >= scores[b, drop[b]].max()


def test_select_tokens_ties_prefer_earlier_tokens():
    keep, drop = select_tokens(torch.ones(1, 6), 2)
    assert keep.tolist() == [[0, 1]] and drop.tolist() == [[2, 3, 4, 5]]


def test_gather_and_fuse_match_loops():
    torch.manual_seed(2)
    x, w = torch.randn(2, 7, 5), torch.rand(2, 7)
    idx = torch.tensor([[0, 3, 6], [1, 2, 5]])
    g = gather_tokens(x, idx)
    for b in range(2):
        for j in range(3):
            assert torch.equal(g[b, j], x[b, idx[b, j]])
    fused = fuse_tokens(x, w)
    ref = torch.stack([sum(w[b, m] * x[b, m] for m in range(7)) for b in range(2)]).unsqueeze(1)
    torch.testing.assert_close(fused, ref)


def test_drop_tokens_keeps_cls_top_k_and_fuses_the_rest():
    torch.manual_seed(3)
    x, scores = torch.randn(2, 11, 4), torch.rand(2, 10)
    out, keep = drop_tokens(x, scores, 0.5, fuse=True)
    assert out.shape == (2, 1 + 5 + 1, 4)
    assert torch.equal(out[:, 0], x[:, 0])
    for b in range(2):
        top = torch.argsort(scores[b], descending=True)[:5].sort().values
        assert torch.equal(keep[b], top)
        assert torch.equal(out[b, 1:6], x[b, 1 + top])
        dropped = [i for i in range(10) if i not in top.tolist()]
        fused = sum(scores[b, i] * x[b, 1 + i] for i in dropped)
        torch.testing.assert_close(out[b, 6], fused)
    out_nf, _ = drop_tokens(x, scores, 0.5, fuse=False)
    assert torch.equal(out_nf, out[:, :6])


def test_fused_token_carries_score_gradient():
    x = torch.randn(1, 5, 3, requires_grad=True)
    scores = torch.rand(1, 4, requires_grad=True)
    out, _ = drop_tokens(x, scores, 0.5, fuse=True)
    out[:, -1].sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_gather_saves_only_its_index():
    saved = []
    x = torch.randn(2, 50, 8, requires_grad=True)
    idx = torch.tensor([[1, 2], [3, 4]])
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gather_tokens(x.clone(), idx)
    assert all(t.dtype == torch.int64 for t in saved)
