"""Optimizer graphs for ONNX Runtime on-device training: PyTorch's AdamW and SGD with momentum, as `bsr train` steps.

ORT's training API runs one optimizer graph per step over all trained parameters, fed as tensor sequences (`params`,
`gradients`, `first_order_moments`, `second_order_moments`) whose elements alias the live buffers. It picks the
optimizer algorithm from the graph's one top-level `com.microsoft` `AdamWOptimizer` node (an ORT-format optimizer
graph is always taken as AdamW), and only that node writes parameters and moments in place. ORT's stock graphs are
not what `bsr train` does: its AdamW is Hugging Face's (`adam_mode` 1), its SGD has no momentum, and both decay every
tensor alike. So bsr writes its own, each around one `AdamWOptimizer` node:

- AdamW: gradient-norm clipping (`InplaceClipGradNorm`, torch's `clip_grad_norm_`), then PyTorch's decoupled weight
  decay on the decayed tensors (p <- p - lr * wd * p, as an in-place `SGDOptimizerV2` step of `wd * p` inside an
  `If`, so that the algorithm detection sees one optimizer node), then `AdamWOptimizer` in PyTorch's mode
  (`adam_mode` 0, bias correction) without decay, which waits on the decay through its `update_signal` input;
- SGD with momentum: clipping, torch's coupled weight decay folded into the gradient (g + wd * p), then
  `AdamWOptimizer` (Hugging Face mode) with beta1 = momentum, beta2 = 1, eps = 1, no bias correction and the
  learning rate scaled by 1 / (1 - momentum): its first moment is then (1 - momentum) times torch's momentum
  buffer, its second moment stays 0 and the update is exactly torch's `p -= lr * buf` (up to float rounding; the
  second moment's buffer is unused).

Which tensors decay: `bsr train` decays none of the 1-D parameters (biases, norms) nor the position embedding and
class/register tokens (timm's `no_weight_decay`); ORT's graph sees tensors, not names, so the rule is written by rank:
decay iff the tensor has 2 (Linear weights) or 4 (the patch embedding's convolution) dimensions; token and position
tensors are 3-D. `decay_matches` checks a model's trained parameters against timm's own grouping before export.
Layer-wise lr decay needs each tensor's name and is not expressible: it is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

from bsr_device.artifacts import IR_VERSION

from ..errors import BSRError

OPSET = 17
DECAYED_RANKS = (2, 4)


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of `bsr train` that the device graph reproduces (the learning rate is fed every step)."""

    kind: str  # "adamw" or "sgd"
    weight_decay: float = 0.0
    clip_grad: Optional[float] = None
    momentum: float = 0.9  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw: torch's defaults, as bsr train uses them
    eps: float = 1e-8

    def to_dict(self) -> dict:
        return {**asdict(self), "betas": list(self.betas)}


def decays(shape) -> bool:
    """Whether the device optimizer decays a tensor of `shape` (`DECAYED_RANKS`)."""
    return len(shape) in DECAYED_RANKS


def decay_matches(params: Mapping[str, object], no_decay: set[str]) -> Optional[str]:
    """The first trained parameter whose decay by rank differs from `bsr train`'s (`no_decay`: names it does not
    decay), or None."""
    for name, p in params.items():
        if decays(p.shape) == (name in no_decay):
            return name
    return None


def _helper():
    import onnx
    from onnx import TensorProto, helper

    return onnx, TensorProto, helper


def _per_tensor(name: str, wd: float, add_grad: bool) -> tuple[list, str]:
    """Nodes of a `Loop` over the parameter sequence that builds the sequence `name` of `c_i * p_i` (plus `g_i` with
    `add_grad`), c_i = `wd` for decayed ranks, else 0."""
    onnx, TP, h = _helper()
    body_nodes = [
        h.make_node("SequenceAt", ["params", "i"], ["p"]),
        h.make_node("Shape", ["p"], ["shape"]),
        h.make_node("Size", ["shape"], ["rank"]),
        *[h.make_node("Equal", ["rank", f"r{r}"], [f"is{r}"]) for r in DECAYED_RANKS],
        h.make_node("Or", [f"is{r}" for r in DECAYED_RANKS], ["decayed"]),
        h.make_node("Cast", ["decayed"], ["decayed_f"], to=TP.FLOAT),
        h.make_node("Mul", ["decayed_f", "wd"], ["coef"]),
        h.make_node("Mul", ["p", "coef"], ["term"]),
    ]
    if add_grad:
        body_nodes += [h.make_node("SequenceAt", ["gradients_in", "i"], ["g"]),
                       h.make_node("Add", ["g", "term"], ["term_g"])]
    body_nodes += [h.make_node("SequenceInsert", ["acc", "term_g" if add_grad else "term"], ["acc_out"]),
                   h.make_node("Identity", ["cond"], ["cond_out"])]
    consts = [h.make_tensor(f"r{r}", TP.INT64, [], [r]) for r in DECAYED_RANKS]
    consts.append(h.make_tensor("wd", TP.FLOAT, [], [wd]))
    body = h.make_graph(
        body_nodes, f"{name}_body",
        [h.make_tensor_value_info("i", TP.INT64, []), h.make_tensor_value_info("cond", TP.BOOL, []),
         h.make_tensor_sequence_value_info("acc", TP.FLOAT, None)],
        [h.make_tensor_value_info("cond_out", TP.BOOL, []),
         h.make_tensor_sequence_value_info("acc_out", TP.FLOAT, None)],
        initializer=consts)
    nodes = [h.make_node("SequenceLength", ["params"], [f"{name}_count"]),
             h.make_node("SequenceEmpty", [], [f"{name}_empty"], dtype=TP.FLOAT),
             h.make_node("Loop", [f"{name}_count", "", f"{name}_empty"], [name], body=body)]
    return nodes, name


def optimizer_graph(spec: OptimizerSpec, params: Mapping[str, object]):
    """The ONNX optimizer graph (IR 10) of `spec` for ORT's training API; `params`: the trained tensors (their shapes
    only decide whether any tensor decays)."""
    onnx, TP, h = _helper()
    if spec.kind not in ("adamw", "sgd"):
        raise BSRError(f"optimizer={spec.kind!r} has no on-device graph; use adamw or sgd")
    if not 0 <= spec.momentum < 1:
        raise BSRError(f"momentum={spec.momentum} must be in [0, 1) for the on-device SGD graph")
    inputs = [h.make_tensor_value_info("learning_rate", TP.FLOAT, [1]), h.make_tensor_value_info("step", TP.INT64, [1])]
    inputs += [h.make_tensor_sequence_value_info(n, TP.FLOAT, None)
               for n in ("params", "gradients", "first_order_moments", "second_order_moments")]
    nodes, grads = [], "gradients"
    any_decayed = spec.weight_decay > 0 and any(decays(p.shape) for p in params.values())
    if spec.clip_grad is not None:
        nodes.append(h.make_node("InplaceClipGradNorm", ["gradients"], ["gradients_clipped"], domain="com.microsoft",
                                 max_norm=float(spec.clip_grad)))
        grads = "gradients_clipped"
    signal = None
    if spec.kind == "adamw":
        lr = "learning_rate"
        adam = dict(alpha=spec.betas[0], beta=spec.betas[1], epsilon=spec.eps, correct_bias=1, adam_mode=0)
        if any_decayed:  # decoupled decay first, as torch.optim.AdamW: p <- p - lr * wd * p
            loop, decay = _per_tensor("decay_terms", spec.weight_decay, add_grad=False)
            nodes += loop
            one = h.make_tensor("one", TP.INT64, [1], [1])
            then = h.make_graph(  # Reshape: the flag's shape follows the fed lr's, the If's output must be fixed
                [h.make_node("SGDOptimizerV2", ["learning_rate", "params", decay], ["decay_flag"],
                             domain="com.microsoft"),
                 h.make_node("Constant", [], ["one"], value=one),
                 h.make_node("Reshape", ["decay_flag", "one"], ["decayed"])],
                "decay", [], [h.make_tensor_value_info("decayed", TP.BOOL, [1])])
            orelse = h.make_graph(
                [h.make_node("Constant", [], ["skipped"], value=h.make_tensor("v", TP.BOOL, [1], [False]))],
                "no_decay", [], [h.make_tensor_value_info("skipped", TP.BOOL, [1])])
            zero = h.make_tensor("zero_step", TP.INT64, [1], [0])
            nodes += [h.make_node("Constant", [], ["zero_step"], value=zero),
                      h.make_node("Greater", ["step", "zero_step"], ["do_decay"]),  # always true: not folded away
                      h.make_node("If", ["do_decay"], ["decay_done"], then_branch=then, else_branch=orelse)]
            signal = "decay_done"
    else:
        if any_decayed:  # torch.optim.SGD's coupled decay: g <- g + wd * p
            nodes.append(h.make_node("Identity", [grads], ["gradients_in"]))
            loop, grads = _per_tensor("gradients_decayed", spec.weight_decay, add_grad=True)
            nodes += loop
        scale = h.make_tensor("lr_scale", TP.FLOAT, [1], [1.0 / (1.0 - spec.momentum)])
        nodes += [h.make_node("Constant", [], ["lr_scale"], value=scale),
                  h.make_node("Mul", ["learning_rate", "lr_scale"], ["lr_momentum"])]
        lr = "lr_momentum"
        # mode 1 (mode 0 insists on bias correction, which divides by 1 - beta2^t = 0): without bias correction
        # and decay it is m1 / (sqrt(m2) + eps) with m2 = 0, eps = 1
        adam = dict(alpha=spec.momentum, beta=1.0, epsilon=1.0, correct_bias=0, adam_mode=1)
    adam_inputs = [lr, "step", "params", grads, "first_order_moments", "second_order_moments"]
    adam_inputs += [signal] if signal else []
    nodes.append(h.make_node(
        "AdamWOptimizer", adam_inputs,
        ["updated_flag"], domain="com.microsoft", weight_decay=0.0, **adam))
    graph = h.make_graph(nodes, f"bsr_{spec.kind}", inputs, [h.make_tensor_value_info("updated_flag", TP.BOOL, [1])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET), h.make_opsetid("com.microsoft", 1)],
                         producer_name="bsr")
    model.ir_version = IR_VERSION
    return model
