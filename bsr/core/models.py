"""Small ViT definitions registered with timm, used by the embedded default and the tests.

They are ordinary timm `VisionTransformer`s (same classes, same `state_dict` keys), only smaller, so that everything
`bsr` does to ViT-B/16 can be run on a laptop CPU in seconds.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _cfg, _create_vision_transformer

# timm's registry reads `default_cfgs` from the module that registers a model. No hub weights: the embedded default's
# weights ship inside this package (see `bsr/assets/README.md`).
default_cfgs = generate_default_cfgs({
    "vit_micro_patch4_28": _cfg(input_size=(3, 28, 28), num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3,
                                crop_pct=1.0),
})


@register_model
def vit_micro_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Micro/4 for 28 px images: 12 blocks, width 96, 3 heads (1.3 M parameters, 7 x 7 patches + CLS)."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=96, depth=12, num_heads=3)
    return _create_vision_transformer("vit_micro_patch4_28", pretrained=pretrained, **dict(model_args, **kwargs))
