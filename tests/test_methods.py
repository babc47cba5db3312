"""Every fine-tuning method trains exactly what it should: gradients on its trainable set, none elsewhere."""

import pytest
import timm
import torch
from torch import nn

import bsr  # noqa: F401  (registers vit_micro_patch4_28)
from bsr.core.config import BSRConfig
from bsr.errors import BSRError
from bsr.train.methods import apply_method, count_params, format_tokens, host, lora_targets, tokens_per_block

DEPTH = 4


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_micro_patch4_28", depth=DEPTH, img_size=16, num_classes=5)  # 16 patches + CLS


def final_params(vit) -> set:
    return {id(p) for m in (vit.norm, vit.fc_norm, vit.head) for p in m.parameters()}


def block_params(vit, blocks) -> set:
    return {id(p) for i in blocks for p in vit.blocks[i].parameters()}


def biases(vit) -> set:
    return {id(m.bias) for m in vit.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}


# method -> (kwargs, expected trainable parameter ids as a function of the host ViT)
CASES = {
    "full": ({}, lambda v: {id(p) for p in v.parameters()}),
    "head": ({}, final_params),
    "bitfit": ({}, lambda v: biases(v) | final_params(v)),
    "last-k": ({"last_k": 2}, lambda v: block_params(v, [2, 3]) | final_params(v)),
    "tokendrop": ({"bsr": BSRConfig(drop_blocks="1,2", keep_rate=0.5)},
                  lambda v: {id(p) for p in v.parameters()}),
    "bsr": ({"bsr": BSRConfig(trainable_blocks="1,3", drop_blocks="1,2", keep_rate=0.5)},
            lambda v: block_params(v, [1, 3]) | final_params(v)),
}


def backward_once(model: nn.Module) -> None:
    x = torch.randn(3, 3, 16, 16)
    model.train()
    model(x).logsumexp(-1).sum().backward()


@pytest.mark.parametrize("method", list(CASES))
def test_method_trains_only_its_set(method):
    kwargs, expected = CASES[method]
    vit = tiny_vit()
    model = apply_method(vit, method, **kwargs)
    backward_once(model)
    want = expected(vit)
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in want), name
        assert (p.grad is not None) == p.requires_grad, name
    count = count_params(model)
    assert count.trainable == sum(p.numel() for p in vit.parameters() if id(p) in want)
    assert count.total == sum(p.numel() for p in vit.parameters())


def test_lora_trains_adapters_norm_and_head_only():
    vit = tiny_vit()
    targets = lora_targets(vit)
    assert len(targets) == 4 * DEPTH and targets[0] == "blocks.0.attn.qkv"
    model = apply_method(vit, "lora", lora_rank=2, lora_alpha=4)
    backward_once(model)
    inner = host(model)
    final = final_params(inner)
    adapters = {id(p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(adapters) == 2 * 4 * DEPTH
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in final | adapters), name
        assert (p.grad is not None) == p.requires_grad, name
    assert count_params(model).trainable == sum(p.numel() for p in model.parameters() if id(p) in final | adapters)


def test_lora_starts_as_the_host_model():
    x = torch.randn(2, 3, 16, 16)
    reference = tiny_vit().eval()
    model = apply_method(tiny_vit(), "lora").eval()
    torch.testing.assert_close(model(x), reference(x))  # lora_B starts at zero


def test_token_dropping_methods_see_fewer_tokens():
    x = torch.randn(2, 3, 16, 16)
    full = tokens_per_block(apply_method(tiny_vit(), "full"), x)
    assert full == [(17, 17)] * DEPTH
    dropped = tokens_per_block(apply_method(tiny_vit(), "bsr", bsr=BSRConfig(trainable_blocks="3",
                                                                             drop_blocks="1", keep_rate=0.5)), x)
    assert dropped == [(17, 17), (17, 10), (10, 10), (10, 10)]  # CLS + 8 kept + 1 fused
    assert format_tokens(dropped) == "0: 17/17, 1: 17/10, 2-3: 10/10"


@pytest.mark.parametrize("method,kwargs,match", [
    ("nope", {}, "method='nope' is unknown"),
    ("last-k", {"last_k": DEPTH + 1}, "last_k=5 is out of range"),
    ("bsr", {"bsr": BSRConfig(trainable_blocks="7")}, "block index 7"),
])
def test_bad_method_arguments(method, kwargs, match):
    with pytest.raises(BSRError, match=match):
        apply_method(tiny_vit(), method, **kwargs)
