"""Named training recipes: the two of the BSR paper (Sarkar et al., arXiv 2405.10951, SPEC section 3) and the
quick micro-model demo.

A recipe is a set of `TrainConfig` values layered over the defaults and under `--config` and command-line flags, so
each of its options can still be overridden.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import BSRError

# ViT-B/16 with SGD: the paper's learning rate per dataset (others fall back to 1e-3), and its step budget.
VIT_SGD_LR = {"cifar10": 1e-3, "cifar100": 1e-2, "pets": 1e-3, "flowers102": 3e-2, "food101": 1e-2}
VIT_SGD_STEPS = {"food101": 30_000}

_RECIPES: dict[str, dict] = {
    # The quick demo (about 2 minutes on 2 CPU cores): the 1.35 M-parameter ViT this project pretrained on
    # Fashion-MNIST, with the recipe measured for it (STUDY.md, second section).
    "micro": dict(model="vit_micro_patch4_28", img_size=None, lr=4e-3, min_lr=1e-5, epochs=10),
    "vit-sgd": dict(
        optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.0, layer_decay=None,
        batch_size=128, steps=20_000, warmup_steps=500, warmup_epochs=0.0, schedule="cosine", min_lr=0.0,
        clip_grad=1.0, label_smoothing=0.0, amp="off",
        rrc_scale=[0.05, 1.0], hflip=False, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5],
    ),
    "deit-adamw": dict(
        # lr 5e-4 = base 1e-3 x batch 128 / 256; no weight decay on 1-D params, pos_embed and cls_token.
        optimizer="adamw", lr=5e-4, layer_decay=0.75, weight_decay=0.05,
        batch_size=128, epochs=50, steps=None, warmup_steps=0, warmup_epochs=5.0, schedule="cosine", min_lr=1e-6,
        clip_grad=None, label_smoothing=0.1, amp="bf16",
        rrc_scale=[0.08, 1.0], hflip=True, mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD),
    ),
}

RECIPE_NAMES = tuple(_RECIPES)


def recipe_values(name: str, dataset: str) -> dict:
    """The `TrainConfig` values of recipe `name` for `dataset` (the SGD recipe's lr and steps depend on it)."""
    if name not in _RECIPES:
        raise BSRError(f"recipe={name!r} is unknown; use one of {', '.join(RECIPE_NAMES)}")
    values = dict(_RECIPES[name])
    if name == "vit-sgd":
        values["lr"] = VIT_SGD_LR.get(dataset, values["lr"])
        values["steps"] = VIT_SGD_STEPS.get(dataset, values["steps"])
    return values
