"""Tests of `bsr.measure.analytic`: the authors' memory formula reproduces their reference values and a hand count."""

from __future__ import annotations

import pytest
import timm
import torch

from bsr import BSRConfig, BSRError
from bsr.measure.analytic import MIB, analytic_memory_bytes, method_memory_bytes
from bsr.core.ops import token_counts

F32 = 4


def meta_model(name: str, **kwargs):
    """A timm model with shapes but no storage: the formula only reads shapes."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


# The paper's figures at batch 128, 10 classes, 224 px (SPEC section 6).
REFERENCES = [
    ("vit_base_patch16_224", "full", 17_388),
    ("vit_base_patch16_224", "bsr", 2_938),
    ("deit_small_patch16_224", "full", 8_650),
    ("deit_small_patch16_224", "bsr", 1_433),
]


@pytest.mark.parametrize("name, method, mib", REFERENCES)
def test_reproduces_the_papers_reference_values(name, method, mib):
    memory = method_memory_bytes(meta_model(name, num_classes=10), method, batch_size=128)
    assert memory.total_mib == pytest.approx(mib, rel=0.01)
    assert round(memory.total_mib) == mib  # in fact exact to the MiB


def test_bsr_defaults_match_explicit_arguments():
    model = meta_model("vit_base_patch16_224", num_classes=10)
    explicit = analytic_memory_bytes(model, batch_size=128, trainable_blocks=[3, 7, 11],
                                     token_counts=token_counts(197, 12, [3, 6, 9], 0.5, True))
    assert method_memory_bytes(model, "bsr", batch_size=128, config=BSRConfig()) == explicit


def _tiny():
    """4 blocks, 32 px, patch 8: N = 17 tokens, C = 192, 3 heads, MLP 768, 10 classes."""
    return meta_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10)


def test_full_kept_bytes_by_hand():
    n, c, h, hidden, depth = 17, 192, 3, 768, 4
    # each block: norm1, qkv, proj, norm2, fc1 inputs (N C each); attention H N^2 + 3 C N; GELU and fc2 N * hidden
    block = 5 * n * c + h * n * n + 3 * c * n + 2 * n * hidden
    kept = 3 * 32 * 32 + depth * block + n * c + c  # + image (trainable patch conv), final norm, head input
    memory = method_memory_bytes(_tiny(), "full", batch_size=4)
    assert memory.kept_per_sample == kept * F32
    # the peak is reached at the head: everything kept before it plus its input and output
    assert memory.peak_activation_per_sample == (kept - c + c + 10) * F32
    assert memory.activation == 4 * memory.peak_activation_per_sample


def test_frozen_prefix_keeps_nothing():
    n, c = 17, 192
    memory = method_memory_bytes(_tiny(), "head", batch_size=1)
    assert memory.kept_per_sample == (n * c + c) * F32  # only the final norm's and the head's inputs


def test_frozen_block_after_a_trainable_one_keeps_attention_and_gelu():
    n, c, h, hidden = 17, 192, 3, 768
    only_last = analytic_memory_bytes(_tiny(), batch_size=1, trainable_blocks=[3]).kept_per_sample
    from_two = analytic_memory_bytes(_tiny(), batch_size=1, trainable_blocks=[2, 3]).kept_per_sample
    two_then_frozen = analytic_memory_bytes(_tiny(), batch_size=1, trainable_blocks=[2]).kept_per_sample
    block_trainable = 5 * n * c + h * n * n + 3 * c * n + 2 * n * hidden
    block_frozen = h * n * n + 3 * c * n + n * hidden  # attention and GELU only
    assert from_two - only_last == block_trainable * F32
    assert from_two - two_then_frozen == (block_trainable - block_frozen) * F32


def test_param_bytes_trainable_32_bit_frozen_8_bit():
    model = _tiny()
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for m in (model.blocks[1], model.norm, model.head) for p in m.parameters())
    memory = analytic_memory_bytes(model, batch_size=1, trainable_blocks=[1])
    assert memory.trainable_params == trained * 4
    assert memory.frozen_params == (total - trained) * 1
    assert method_memory_bytes(model, "full", batch_size=1).params == total * 4


def test_token_dropping_reduces_the_estimate():
    model = _tiny()
    full = method_memory_bytes(model, "full", batch_size=8)
    dropped = method_memory_bytes(model, "tokendrop", batch_size=8, config=BSRConfig(drop_blocks=[1, 2]))
    assert dropped.total < full.total and dropped.params == full.params


def test_bad_method():
    with pytest.raises(BSRError, match="unknown method"):
        method_memory_bytes(_tiny(), "nope", batch_size=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0, trainable_blocks=[1]), "batch_size"),
    (dict(batch_size=1, trainable_blocks=[4]), "outside"),
    (dict(batch_size=1, trainable_blocks=[1], token_counts=[(17, 17)]), "token_counts"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(BSRError, match=message):
        analytic_memory_bytes(_tiny(), **kwargs)


def test_mib_is_binary():
    assert MIB == 1 << 20
