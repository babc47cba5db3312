"""`BSRConfig`: the options of Block Selective Reprogramming, and the parser of block specs.

Block specs may be written as lists (`[3, 7, 11]`) or strings (`"3,7,11"`, `"last:3"`, `"all"`, `"none"`). They are
parsed once, here; everything downstream only sees explicit per-block lists (`BSRConfig.resolve`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Sequence, Union

from ..errors import BSRError

BlockSpec = Union[str, Sequence[int]]

FROZEN_DTYPES = ("float32", "bfloat16", "float16", "int8")
RECOMPUTE = ("auto", "none", "first", "all")
TOKEN_SCORES = ("auto", "cls", "mean")
PRESETS: dict[str, dict] = {
    "paper": {},
    "lean": {"frozen_dtype": "bfloat16", "recompute": "all", "score_grad": False},
}

_SPEC_HELP = 'comma-separated indices ("3,7,11"), "last:K", "first:K", "all" or "none"'


def parse_blocks(spec: BlockSpec, depth: int, option: str = "blocks") -> list[int]:
    """Turn a block spec into a sorted list of distinct block indices in `[0, depth)`.

    Raises `BSRError` naming `option` if the spec is malformed or an index is out of range.
    """
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(depth))
        if text in ("none", ""):
            return []
        if ":" in text:
            where, _, count = text.partition(":")
            if where not in ("last", "first") or not count.strip().isdigit():
                raise BSRError(f"{option}={spec!r} is not a block spec; use {_SPEC_HELP}")
            k = int(count)
            if k > depth:
                raise BSRError(f"{option}={spec!r} asks for {k} blocks but the model has {depth}; use at most {depth}")
            return list(range(depth - k, depth)) if where == "last" else list(range(k))
        try:
            indices = [int(part) for part in text.replace(" ", "").split(",") if part]
        except ValueError:
            raise BSRError(f"{option}={spec!r} is not a block spec; use {_SPEC_HELP}") from None
    else:
        try:
            indices = [int(i) for i in spec]
        except (TypeError, ValueError):
            raise BSRError(f"{option}={spec!r} is not a block spec; use {_SPEC_HELP}") from None
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise BSRError(f"{option} has block index {bad[0]} but the model has blocks 0..{depth - 1}; "
                       f"pick indices in that range")
    return sorted(set(indices))


def _check_spec_syntax(spec: BlockSpec, option: str) -> None:
    """Validate a spec without knowing the depth (a very deep model is assumed)."""
    parse_blocks(spec, depth=1 << 20, option=option)


@dataclass
class BSRConfig:
    """Options of Block Selective Reprogramming (Sarkar et al., arXiv 2405.10951)."""

    trainable_blocks: BlockSpec = field(
        default_factory=lambda: [3, 7, 11],
        metadata={"help": f"blocks trained in full, plus the final norm and head; {_SPEC_HELP}"})
    drop_blocks: BlockSpec = field(
        default_factory=lambda: [3, 6, 9],
        metadata={"help": f"blocks whose attention decides which tokens the MLP and later blocks keep; {_SPEC_HELP}"})
    keep_rate: float = field(
        default=0.5,
        metadata={"help": "fraction of non-CLS tokens kept at each drop block, in (0, 1]; 1 disables dropping"})
    fuse_token: bool = field(
        default=True,
        metadata={"help": "merge the dropped tokens into one extra token, weighted by their scores"})
    token_score: str = field(
        default="auto",
        metadata={"help": "how drop blocks rank patch tokens: cls (the class token's attention, the paper's rule); "
                          "mean (the attention each token receives, averaged over all queries and heads: the rule "
                          "for heads that average or attention-pool the tokens); auto (cls when the head reads the "
                          "class token, global_pool='token'; else mean)"})
    drop_in_eval: bool = field(
        default=True,
        metadata={"help": "drop tokens in evaluation too (off: evaluate on all tokens)"})
    score_grad: bool = field(
        default=True,
        metadata={"help": "let gradients flow through the token scores into the fused token (the paper's gradient). "
                          "Off (the lean preset): the scores are constants, saving about 5%% of the step's memory "
                          "(37 MiB for ViT-B/16 at batch 32) but changing the gradients of trained blocks before the "
                          "last drop block (7.4%% and 3.6%% relative L2 at blocks 3 and 7 of DINOv2 ViT-S/14; "
                          "BENCHMARKS.md)"})
    train_patch_embed: bool = field(
        default=False,
        metadata={"help": "also train the patch embedding, position embedding and CLS token (the blocks before "
                          "the first trainable one then keep activations for backward)"})
    frozen_dtype: str = field(
        default="float32",
        metadata={"help": "storage dtype of the frozen blocks' Linear weights: float32; bfloat16/float16 (stored "
                          "and multiplied in that dtype); int8 (a scale per output channel, dequantized for each "
                          "matmul, multiplied in the activation's dtype); nothing extra is saved for backward; "
                          "--method bsr only"})
    recompute: str = field(
        default="auto",
        metadata={"help": "recompute activations in backward instead of keeping them: none; first (the first "
                          "trainable block, the only one that sees every token); all (every block from the first "
                          "trainable one on); auto (first when that block is a mixture of experts, whose top-k "
                          "experts keep k times a dense MLP's activations; else none)"})

    def __post_init__(self) -> None:
        _check_spec_syntax(self.trainable_blocks, "trainable_blocks")
        _check_spec_syntax(self.drop_blocks, "drop_blocks")
        if isinstance(self.keep_rate, bool) or not isinstance(self.keep_rate, (int, float)):
            raise BSRError(f"keep_rate={self.keep_rate!r} is not a number; use a value in (0, 1], e.g. 0.5")
        if not (0.0 < float(self.keep_rate) <= 1.0) or math.isnan(self.keep_rate):
            raise BSRError(f"keep_rate={self.keep_rate} is outside (0, 1]; use e.g. 0.5 (1 disables dropping)")
        self.keep_rate = float(self.keep_rate)
        for name in ("fuse_token", "drop_in_eval", "score_grad", "train_patch_embed"):
            if not isinstance(getattr(self, name), bool):
                raise BSRError(f"{name}={getattr(self, name)!r} is not true/false; use true or false")
        for name, choices in (("frozen_dtype", FROZEN_DTYPES), ("recompute", RECOMPUTE),
                              ("token_score", TOKEN_SCORES)):
            if getattr(self, name) not in choices:
                raise BSRError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}; pick one of them")

    @classmethod
    def preset(cls, name: str, **overrides) -> "BSRConfig":
        """A named configuration: `paper` (the defaults) or `lean` (bf16 frozen weights, recomputation of the
        trained region, scores without autograd: close to, not equal to, the paper's updates; see `score_grad`),
        with `overrides` applied on top."""
        if name not in PRESETS:
            raise BSRError(f"unknown BSR preset {name!r}; use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def resolve(self, depth: int) -> "ResolvedBSR":
        """Explicit per-block lists for a model with `depth` blocks."""
        trainable = parse_blocks(self.trainable_blocks, depth, "trainable_blocks")
        drop = parse_blocks(self.drop_blocks, depth, "drop_blocks") if self.keep_rate < 1.0 else []
        return ResolvedBSR(depth=depth, trainable_blocks=trainable, drop_blocks=drop, keep_rate=self.keep_rate,
                           fuse_token=self.fuse_token, drop_in_eval=self.drop_in_eval, score_grad=self.score_grad,
                           frozen_dtype=self.frozen_dtype, recompute=self.recompute,
                           train_patch_embed=self.train_patch_embed, token_score=self.token_score)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), (list, tuple)) else v)
                for f in fields(self)}


@dataclass(frozen=True)
class ResolvedBSR:
    """A `BSRConfig` applied to a model of known depth: explicit block lists only."""

    depth: int
    trainable_blocks: list[int]
    drop_blocks: list[int]
    keep_rate: float
    fuse_token: bool
    drop_in_eval: bool
    score_grad: bool
    frozen_dtype: str = "float32"
    recompute: str = "none"
    train_patch_embed: bool = False
    token_score: str = "cls"

    @property
    def first_trainable(self) -> int:
        """Index of the first trainable block (`depth` if none): blocks before it run without autograd."""
        return self.trainable_blocks[0] if self.trainable_blocks else self.depth
