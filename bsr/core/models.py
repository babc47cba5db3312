"""ViT definitions registered with timm: the embedded default's model and a small one for tests and the quick demo.

They are ordinary timm `VisionTransformer`s (same classes, same `state_dict` keys):
- `vit_small_patch14_dinov2_112`: timm's `vit_small_patch14_dinov2` (DINOv2 ViT-S/14) at 112 px (8 x 8 patches + CLS
  = 65 tokens) instead of 518, the embedded default's model. Its base weights come from `bsr.weights` ("dinov2-s",
  offline) or, with `pretrained=True`, from timm's hub (`vit_small_patch14_dinov2.lvd142m`).
- `vit_micro_patch4_28`: a 1.35 M-parameter ViT for 28 px images, so that everything `bsr` does to ViT-B/16 runs on a
  laptop CPU in seconds (tests, `--recipe micro`).
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _cfg, _create_vision_transformer

# timm's registry reads `default_cfgs` from the module that registers a model. No hub weights: the embedded default's
# weights ship inside this package (see `bsr/assets/README.md`).
default_cfgs = generate_default_cfgs({
    "vit_micro_patch4_28": _cfg(input_size=(3, 28, 28), num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3,
                                crop_pct=1.0),
    "vit_small_patch14_dinov2_112.lvd142m": _cfg(
        hf_hub_id="timm/vit_small_patch14_dinov2.lvd142m", input_size=(3, 112, 112), num_classes=0,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=1.0, license="apache-2.0"),
})


@register_model
def vit_micro_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Micro/4 for 28 px images: 12 blocks, width 96, 3 heads (1.3 M parameters, 7 x 7 patches + CLS)."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=96, depth=12, num_heads=3)
    return _create_vision_transformer("vit_micro_patch4_28", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_small_patch14_dinov2_112(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DINOv2 ViT-S/14 (timm's `vit_small_patch14_dinov2`: 12 blocks, width 384, 6 heads, LayerScale) at 112 px."""
    model_args = dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5, img_size=112)
    return _create_vision_transformer("vit_small_patch14_dinov2_112", pretrained=pretrained,
                                      **dict(model_args, **kwargs))
