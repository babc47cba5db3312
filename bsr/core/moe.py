"""Mixture-of-Experts MLPs with task-conditioned routing, and the multi-task ViT that BSR fine-tunes (SPEC section 5).

M3ViT (Liang, Fan, Chen et al., "M3ViT: Mixture-of-Experts Vision Transformer for Efficient Multi-task Learning with
Model-Accelerator Co-design", NeurIPS 2022) replaces the MLP of some ViT blocks by a mixture of experts routed per
token, with one gate per task. The BSR paper (Sarkar et al., arXiv 2405.10951, section on MoE multi-task learning)
reprograms such a model: the MoE blocks are the trainable blocks, token dropping happens at other blocks.

Here everything is plain PyTorch (no CUDA-only MoE package): each expert's fc1 and fc2 weights are parameters of their
own (`w1[e]`, `w2[e]`, so backward hands every expert its gradient as it is computed, and no stacked gradient is ever
assembled), the biases are stacked; tokens are grouped by expert and each expert runs one matmul over its tokens.
Pieces:

- pure routing functions: `route_top_k`, `group_by_expert`, `balance_loss`;
- `MoEMlp`: drop-in replacement of a timm `Mlp` inside a `Block`;
- `moeify(model, blocks, ...)`: swaps the `Mlp` of chosen blocks for `MoEMlp`s initialised from it, in place;
- `set_moe_task` / `moe_task` / `moe_aux_loss`: what a trainer calls around a forward.

The multi-task ViT built on these layers (shared backbone, one head per task, BSR on it) is `bsr.core.multitask`.

State dict of a MoE layer at block i (everything else keeps timm's keys; `blocks.{i}.mlp.fc1.*`/`fc2.*` are gone). The
per-expert weight parameters (`named_parameters`: `w1.0` ... `w1.{E-1}`) are stacked into one tensor by a state-dict
hook and split again on load, so files hold one tensor per weight kind:

    blocks.{i}.mlp.w1              (E, hidden, C)   expert e's fc1.weight is w1[e]
    blocks.{i}.mlp.b1              (E, hidden)      fc1.bias        (absent if the dense fc1 had no bias)
    blocks.{i}.mlp.w2              (E, C_out, hidden) fc2.weight
    blocks.{i}.mlp.b2              (E, C_out)       fc2.bias        (absent if the dense fc2 had no bias)
    blocks.{i}.mlp.gates.{t}.weight (E, C)          router of task t, zero-initialised
    blocks.{i}.mlp.gates.{t}.bias   (E,)
    blocks.{i}.mlp.lora_a1, lora_b1 (E, r, C), (E, hidden, r)   only after `add_lora`: expert e's fc1 weight is
    blocks.{i}.mlp.lora_a2, lora_b2 (E, r, hidden), (E, C_out, r)   w1[e] + alpha/r * lora_b1[e] @ lora_a1[e], fc2's too

In a `bsr.core.multitask.MultiTaskViT` these keys are prefixed by `backbone.`, and the heads are `heads.{t}.weight` /
`heads.{t}.bias`.

Shapes: T tokens (batch and sequence flattened), C input width, E experts, k experts per token.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from ..errors import BSRError
from .config import BlockSpec, parse_blocks

DEFAULT_MOE_BLOCKS = (3, 7, 11)


# --------------------------------------------------------------------------------------------------------------------
# Routing: pure tensor functions
# --------------------------------------------------------------------------------------------------------------------

def route_top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Pick each token's `k` experts with the highest router logits and weight them by a softmax over those `k`.

    Ties go to the lower expert index (a stable sort, unlike `torch.topk`), so zero-initialised gates route every
    token to experts 0..k-1, deterministically on every device.
    logits: (T, E) -> (weights (T, k) float32, each row summing to 1; experts (T, k) int64, best first).
    """
    logits = logits.float()  # routing decisions and weights in fp32, also under autocast
    top, experts = torch.sort(logits, dim=-1, descending=True, stable=True)
    return top[:, :k].softmax(dim=-1), experts[:, :k]


def group_by_expert(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """Order the T*k token-expert assignments by expert, so each expert's tokens are one contiguous slice.

    experts: (T, k) -> (order (T*k,) positions into `experts.flatten()` sorted by expert (stable: tokens keep their
    order within an expert); token (T*k,) the token of each sorted assignment; counts: assignments per expert,
    a Python list of length E, for `torch.split`).
    """
    flat = experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    token = torch.div(order, experts.shape[1], rounding_mode="floor")
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync: slice sizes must be known
    return order, token, counts


def balance_loss(logits: Tensor, experts: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard load-balancing loss: E * sum_e f_e * P_e.

    f_e: fraction of the T*k assignments routed to expert e (sums to 1, not differentiable); P_e: mean over tokens of
    the softmax over all E logits (differentiable). It equals 1 whenever either is uniform, in particular at
    zero-initialised gates (P_e = 1/E), and is minimised by balanced routing; the gradient lowers the router
    probability of overloaded experts.
    logits: (T, E), experts: (T, k) -> scalar float32.
    """
    probs = logits.float().softmax(dim=-1).mean(dim=0)  # (E,)
    fraction = torch.bincount(experts.reshape(-1), minlength=num_experts).float() / experts.numel()
    return num_experts * (fraction * probs).sum()


# --------------------------------------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------------------------------------

def _check_dense_mlp(mlp: nn.Module, where: str) -> None:
    """Refuse anything `MoEMlp.from_mlp` cannot copy exactly."""
    if type(mlp) is not Mlp:
        raise BSRError(f"{where} is a {type(mlp).__name__}, not a timm Mlp; the MoE replaces timm's standard "
                       f"fc1 -> act -> fc2 MLP only (mlp_layer=Mlp)")
    if type(mlp.fc1) is not nn.Linear or type(mlp.fc2) is not nn.Linear:
        raise BSRError(f"{where} uses {type(mlp.fc1).__name__} layers (use_conv=True?); the MoE needs nn.Linear")
    if not isinstance(mlp.norm, nn.Identity):
        raise BSRError(f"{where} has a hidden-layer norm ({type(mlp.norm).__name__}); the MoE supports Mlp without "
                       f"norm_layer only")


class MoEMlp(nn.Module):
    """A mixture of `num_experts` fc1 -> act -> fc2 experts with top-k routing and one router per task (M3ViT).

    Changes against the host timm `Mlp` it replaces: `fc1`/`fc2` become per-expert weights `w1[e]`, `w2[e]` and
    stacked biases `b1`, `b2`; each token goes through its `top_k` experts (chosen by the current task's gate,
    `gates[task]`) and their outputs are summed with softmax weights over the selected logits. `act`, `drop1` and
    `drop2` are the host's. Input may have any leading shape and any token count (token dropping shrinks it freely).

    Routing noise: in training, Gaussian noise of std `router_noise` is added to the logits before the top-k choice
    and the softmax (noisy top-k gating, Shazeer et al. 2017, as M3ViT's gate, whose noise std starts at
    softplus(0) + 0.01 = 0.70). It matters: with zero gates and identical experts the task loss gives the gates no
    gradient (every expert's output is the same, and the weights sum to 1), so without noise every token would go to
    experts 0..k-1 forever and the experts would never specialise. Evaluation routes without noise.

    Load balancing: every forward stores `last_balance_loss` (see `balance_loss`); it is part of the graph only when
    `aux_loss_coef > 0`, and `moe_aux_loss(model)` sums `aux_loss_coef * last_balance_loss` over the layers.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None,
                 num_experts: int = 16, top_k: int = 4, num_tasks: int = 1, bias: bool = True,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0, aux_loss_coef: float = 0.0,
                 router_noise: float = 1.0):
        super().__init__()
        _check_routing(num_experts, top_k, num_tasks, aux_loss_coef, router_noise)
        out_features = out_features or in_features
        self.num_experts, self.top_k, self.num_tasks = num_experts, top_k, num_tasks
        self.aux_loss_coef, self.router_noise = float(aux_loss_coef), float(router_noise)
        # One parameter per expert weight: with one stacked (E, ...) parameter, backward would hold every expert's
        # gradient and then a stacked copy of them at once (twice the layer's weights, early in backward).
        self.w1 = nn.ParameterList(torch.empty(hidden_features, in_features) for _ in range(num_experts))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_features)) if bias else None
        self.w2 = nn.ParameterList(torch.empty(out_features, hidden_features) for _ in range(num_experts))
        self.b2 = nn.Parameter(torch.zeros(num_experts, out_features)) if bias else None
        for weights in (self.w1, self.w2):  # nn.Linear's default init, per expert (from_mlp overwrites it)
            for w in weights:
                nn.init.kaiming_uniform_(w, a=5 ** 0.5)
        if hasattr(self, "register_state_dict_post_hook"):
            self.register_state_dict_post_hook(_stack_expert_weights)
            self.register_load_state_dict_pre_hook(_split_expert_weights)
        else:  # torch < 2.5: the same hooks under their private names
            self._register_state_dict_hook(_stack_expert_weights)
            self._register_load_state_dict_pre_hook(_split_expert_weights, with_module=True)
        self.act, self.drop1, self.drop2 = act_layer(), nn.Dropout(drop), nn.Dropout(drop)
        self.gates = nn.ModuleList(nn.Linear(in_features, num_experts) for _ in range(num_tasks))
        for gate in self.gates:  # M3ViT: zero gates, so routing starts uniform and the output starts dense
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
        self.task: Optional[int] = None
        self.last_balance_loss: Optional[Tensor] = None
        self.lora_scale: Optional[float] = None  # alpha / rank once `add_lora` gave the experts low-rank adapters

    def add_lora(self, rank: int, alpha: float) -> None:
        """LoRA (Hu et al. 2022) on every expert's fc1 and fc2: low-rank factors per expert, A as `nn.Linear`'s
        default init, B zero (so the output is unchanged until training), scaled by alpha / rank, as peft does. The
        expert weights are not touched; the adapters run beside them (no merged weight is materialised).
        Freezing is the caller's (`bsr.train.methods`)."""
        if self.lora_scale is not None:
            raise BSRError("this MoE layer already has LoRA adapters")
        e, (hidden, c_in), c_out = self.num_experts, self.w1[0].shape, self.w2[0].shape[0]
        like = dict(device=self.w1[0].device, dtype=self.w1[0].dtype)
        for name, shape_a, shape_b in (("1", (e, rank, c_in), (e, hidden, rank)), ("2", (e, rank, hidden),
                                                                                  (e, c_out, rank))):
            a = nn.Parameter(torch.empty(shape_a, **like))
            for a_e in a.data:
                nn.init.kaiming_uniform_(a_e, a=5 ** 0.5)
            setattr(self, f"lora_a{name}", a)
            setattr(self, f"lora_b{name}", nn.Parameter(torch.zeros(shape_b, **like)))
        self.lora_scale = alpha / rank

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the adapters into the expert weights (w += alpha/r * B @ A per expert) and remove them."""
        if self.lora_scale is None:
            return
        for name in ("1", "2"):
            a, b = getattr(self, f"lora_a{name}"), getattr(self, f"lora_b{name}")
            for w, delta in zip(getattr(self, f"w{name}"), torch.bmm(b, a)):
                w.add_(delta, alpha=self.lora_scale)
            delattr(self, f"lora_a{name}")
            delattr(self, f"lora_b{name}")
        self.lora_scale = None

    @classmethod
    def from_mlp(cls, mlp: Mlp, num_experts: int = 16, top_k: int = 4, num_tasks: int = 1,
                 aux_loss_coef: float = 0.0, router_noise: float = 1.0) -> "MoEMlp":
        """A MoE whose every expert is a copy of the dense timm `mlp` (weights, activation, dropout), on its device
        and dtype. With zero gates its output equals `mlp`'s at any routing."""
        _check_dense_mlp(mlp, "the MLP")
        if (mlp.fc2.bias is None) != (mlp.fc1.bias is None):
            raise BSRError("the MLP has a bias on only one of fc1/fc2; the MoE supports both or neither")
        hidden, c_in = mlp.fc1.weight.shape
        moe = cls(c_in, hidden, mlp.fc2.out_features, num_experts, top_k, num_tasks, bias=mlp.fc1.bias is not None,
                  aux_loss_coef=aux_loss_coef, router_noise=router_noise)
        moe.act, moe.drop1, moe.drop2 = copy.deepcopy(mlp.act), copy.deepcopy(mlp.drop1), copy.deepcopy(mlp.drop2)
        moe.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        with torch.no_grad():
            for w1, w2 in zip(moe.w1, moe.w2):
                w1.copy_(mlp.fc1.weight)
                w2.copy_(mlp.fc2.weight)
            if moe.b1 is not None:
                moe.b1.copy_(mlp.fc1.bias.expand_as(moe.b1))
                moe.b2.copy_(mlp.fc2.bias.expand_as(moe.b2))
        return moe

    def extra_repr(self) -> str:
        (hidden, c_in), c_out = self.w1[0].shape, self.w2[0].shape[0]
        return (f"in={c_in}, hidden={hidden}, out={c_out}, experts={self.num_experts}, top_k={self.top_k}, "
                f"tasks={self.num_tasks}, aux_loss_coef={self.aux_loss_coef}, router_noise={self.router_noise}")

    def current_gate(self) -> nn.Linear:
        """The router of the current task; with several tasks the task must have been set (`set_moe_task`)."""
        if self.task is None:
            if self.num_tasks == 1:
                return self.gates[0]
            raise BSRError(f"MoE layer has {self.num_tasks} task gates but no task is set; call "
                           f"bsr.moe.set_moe_task(model, task) (MultiTaskViT.forward does) before the forward")
        return self.gates[self.task]

    def router_logits(self, x: Tensor) -> Tensor:
        """Router logits of the current task, noisy in training. x: (T, C) -> (T, E)."""
        logits = self.current_gate()(x)
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise
        return logits

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., C) -> (..., C_out)."""
        lead, c_in = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, c_in)  # (T, C)
        logits = self.router_logits(tokens)  # (T, E)
        weights, experts = route_top_k(logits, self.top_k)  # (T, k), (T, k)
        self._store_balance_loss(logits, experts)
        out = self.experts_forward(tokens, weights, experts)  # (T, C_out)
        return out.reshape(*lead, out.shape[-1])

    def experts_forward(self, tokens: Tensor, weights: Tensor, experts: Tensor) -> Tensor:
        """Run every token through its experts, grouped by expert: one matmul per expert and layer.

        tokens: (T, C), weights, experts: (T, k) -> (T, C_out) = sum_j weights[:, j] * expert_{experts[:, j]}(token).
        The gathers and `index_add` save only indices for backward; the expert matmuls are `addmm`/`mm`, visible to
        `FlopCounterMode` (their FLOPs are k times the dense MLP's).
        """
        if tokens.shape[0] == 0:  # no tokens: nothing to concatenate
            return tokens.new_zeros(0, self.w2[0].shape[0])
        order, token, counts = group_by_expert(experts, self.num_experts)
        routed = tokens[token]  # (T*k, C), grouped by expert
        b1 = self.b1.unbind(0) if self.b1 is not None else [None] * self.num_experts
        b2 = self.b2.unbind(0) if self.b2 is not None else [None] * self.num_experts
        lora = ([t.unbind(0) for t in (self.lora_a1, self.lora_b1, self.lora_a2, self.lora_b2)]
                if self.lora_scale is not None else None)
        outs = []
        for e, chunk in enumerate(torch.split(routed, counts)):
            if counts[e]:
                outs.append(self._expert(chunk, self.w1[e], b1[e], self.w2[e], b2[e],
                                         [t[e] for t in lora] if lora else None))
        y = torch.cat(outs)  # (T*k, C_out)
        y = y * weights.reshape(-1)[order].to(y.dtype).unsqueeze(1)
        return y.new_zeros(tokens.shape[0], y.shape[1]).index_add_(0, token, y)

    def _expert(self, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                lora: Optional[list[Tensor]] = None) -> Tensor:
        """One expert on its tokens: fc2(drop1(act(fc1(x)))), dropout after as in timm; with `lora` (this expert's
        A1, B1, A2, B2) each fc adds alpha/r * B(A(input)). x: (n, C) -> (n, C_out)."""
        h = F.linear(x, w1, b1)
        if lora is not None:
            h = h + F.linear(F.linear(x, lora[0]), lora[1]) * self.lora_scale
        h = self.drop1(self.act(h))
        y = F.linear(h, w2, b2)
        if lora is not None:
            y = y + F.linear(F.linear(h, lora[2]), lora[3]) * self.lora_scale
        return self.drop2(y)

    def _store_balance_loss(self, logits: Tensor, experts: Tensor) -> None:
        """Keep this forward's balance loss; off the graph when its coefficient is 0, so it costs no memory."""
        if self.aux_loss_coef > 0:
            self.last_balance_loss = balance_loss(logits, experts, self.num_experts)
        else:
            with torch.no_grad():
                self.last_balance_loss = balance_loss(logits, experts, self.num_experts)


def _stack_expert_weights(module: MoEMlp, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: the per-expert weights `w1.{e}`/`w2.{e}` as one stacked tensor `w1`/`w2` (the file layout)."""
    for name in ("w1", "w2"):
        keys = [f"{prefix}{name}.{e}" for e in range(module.num_experts)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


def _split_expert_weights(module: MoEMlp, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                          missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load-state-dict pre-hook, inverse of `_stack_expert_weights`: a stacked `w1`/`w2` of shape (E, ...) becomes
    the per-expert entries; another shape is left for `load_state_dict` to report as unexpected."""
    for name in ("w1", "w2"):
        stacked = state_dict.get(prefix + name)
        if isinstance(stacked, Tensor) and stacked.dim() == 3 and stacked.shape[0] == module.num_experts:
            del state_dict[prefix + name]
            for e, w in enumerate(stacked.unbind(0)):
                state_dict[f"{prefix}{name}.{e}"] = w


def _check_routing(num_experts: int, top_k: int, num_tasks: int, aux_loss_coef: float, router_noise: float) -> None:
    if num_experts < 1:
        raise BSRError(f"num_experts={num_experts}; use at least 1 (e.g. 16)")
    if not 1 <= top_k <= num_experts:
        raise BSRError(f"top_k={top_k} with {num_experts} experts; use 1 <= top_k <= num_experts (e.g. 4)")
    if num_tasks < 1:
        raise BSRError(f"num_tasks={num_tasks}; use at least 1")
    if aux_loss_coef < 0 or router_noise < 0:
        raise BSRError(f"aux_loss_coef={aux_loss_coef}, router_noise={router_noise}; both must be >= 0")


# --------------------------------------------------------------------------------------------------------------------
# Installing MoE layers and driving them
# --------------------------------------------------------------------------------------------------------------------

def moeify(model: nn.Module, blocks: BlockSpec = DEFAULT_MOE_BLOCKS, num_experts: int = 16, top_k: int = 4,
           num_tasks: int = 1, aux_loss_coef: float = 0.0, router_noise: float = 1.0) -> nn.Module:
    """Replace `model.blocks[i].mlp` by a `MoEMlp` copied from it, for each chosen block, in place; return `model`.

    `blocks` is a block spec (`[3, 7, 11]`, `"3,7,11"`, `"last:3"`, ...). Each expert starts as a copy of the block's
    pretrained MLP and the gates start at zero, so the model's outputs are unchanged until training (M3ViT). Refuses,
    with `BSRError`, indices out of range and blocks whose MLP is not a timm `Mlp` (e.g. already a `MoEMlp`).
    Block classes are untouched, so `bsr.reprogram` accepts the result. Not reversible: experts diverge in training.
    """
    stack = getattr(model, "blocks", None)
    if not isinstance(stack, (nn.Sequential, nn.ModuleList)):
        raise BSRError(f"moeify needs a timm ViT with a `blocks` sequence, got {type(model).__name__}")
    chosen = parse_blocks(blocks, len(stack), "moe_blocks")
    for i in chosen:  # check all first: refuse without changing anything
        _check_dense_mlp(getattr(stack[i], "mlp", None), f"the MLP of block {i}")
    for i in chosen:
        stack[i].mlp = MoEMlp.from_mlp(stack[i].mlp, num_experts, top_k, num_tasks, aux_loss_coef, router_noise)
    return model


def moe_layers(model: nn.Module) -> list[MoEMlp]:
    """The `MoEMlp` modules of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, MoEMlp)]


def set_moe_task(model: nn.Module, task: Optional[int]) -> None:
    """Make every MoE layer of `model` route with the gate of `task` (None: unset). Refuses a task out of range."""
    for layer in moe_layers(model):
        if task is not None and not 0 <= task < layer.num_tasks:
            raise BSRError(f"task {task} is out of range: the MoE layers have {layer.num_tasks} task gates "
                           f"(tasks 0..{layer.num_tasks - 1})")
        layer.task = task


@contextlib.contextmanager
def moe_task(model: nn.Module, task: int) -> Iterator[None]:
    """`with moe_task(model, t): model(x)` routes with task t's gates inside the block and restores the previous
    task after (only the first layer's previous task is remembered: all layers share one task)."""
    layers = moe_layers(model)
    previous = layers[0].task if layers else None
    set_moe_task(model, task)
    try:
        yield
    finally:
        set_moe_task(model, previous)


def moe_aux_loss(model: nn.Module) -> Tensor:
    """The load-balancing loss to add to the task loss: sum over MoE layers of `aux_loss_coef * last_balance_loss`.

    Read it after the forward and before the backward of the same step. A 0-dim float32 tensor (0 when every
    coefficient is 0 or the model has no MoE layer), on the device of the model's parameters.
    """
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for layer in moe_layers(model):
        if layer.aux_loss_coef > 0 and layer.last_balance_loss is not None:
            total = total + layer.aux_loss_coef * layer.last_balance_loss
    return total
