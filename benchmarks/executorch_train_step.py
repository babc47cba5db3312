"""Step time of one BSR training step in ExecuTorch's training extension against the same step in PyTorch, on CPU.

    python benchmarks/executorch_train_step.py --out runs/executorch-step.json

It cannot run in the project's main environment: executorch 1.5.1 pins torch 2.13. The environment it was run in:

    python3 -m venv /work/et-venv
    /work/et-venv/bin/pip install torch==2.13.0 executorch==1.5.1      # torch 2.13.0+cpu (the local wheel)
    /work/et-venv/bin/pip install --no-deps timm==1.0.31 safetensors torchvision==0.28.0 pillow
    echo /path/to/bsr/checkout > /work/et-venv/lib/python3.11/site-packages/bsr-main.pth  # bsr, no install step

PyPI's torchvision 0.28 is built against CUDA torch: with torch 2.13.0+cpu its `_C` extension does not load and
`import timm` fails with `operator torchvision::nms does not exist`. `_torchvision_shim` declares the two operator
schemas torchvision registers fake kernels for, so torchvision (and timm) import; no torchvision operator is used.

Model: timm vit_tiny_patch16_224 at 112 px, 10 classes, random init; `bsr.reprogram` with the default `BSRConfig` (mode
`bsr`) or every parameter trained without dropping (mode `full`). Batch 16, plain SGD (lr 0.01), cross-entropy.
PyTorch trains the model as bsr does (timm's fused attention, stable sort); ExecuTorch trains the export copy of
`bsr.deploy.onnx_export.export_copy(train=True)` (TopK ranking, gradients kept) with fused attention off, through
`torch.export` -> `_export_forward_backward` -> `to_edge` -> `to_executorch`, `TrainingModule` and ExecuTorch's SGD.
Variant `rewrite` replaces every Linear by matmul + add (no `addmm`) and the patch-embedding convolution by
reshape + matmul before the export; `transposed` also holds every Linear weight as (in, out), so that the graph
transposes no weight (a device checkpoint would hold them so). One intra-op thread for both; steps taken in turn,
PyTorch then ExecuTorch, on the same batches; the medians are over the timed steps after the warm-up steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import types
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _torchvision_shim() -> None:
    """Declare torchvision::nms/qnms when torchvision's CUDA-built `_C` cannot load into a CPU-only torch."""
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    try:
        torch.ops.load_library(str(Path(spec.origin).with_name("_C.so")))
    except OSError:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        globals()["_TV_LIB"] = lib  # keep the library alive


class LossStep(nn.Module):
    """(images, labels) -> (cross-entropy loss,): the graph ExecuTorch differentiates."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor]:
        return (F.cross_entropy(self.vit(images), labels),)


def _linear_as_mm(self: nn.Linear, x: Tensor) -> Tensor:
    y = x.matmul(self.weight_t if hasattr(self, "weight_t") else self.weight.t())
    return y if self.bias is None else y + self.bias


def _conv_as_mm(self: nn.Conv2d, x: Tensor) -> Tensor:
    """A patchifying convolution (stride == kernel, no padding) as reshape + matmul."""
    b, c, hh, ww = x.shape
    p, q = self.kernel_size
    h, w = hh // p, ww // q
    x = x.reshape(b, c, h, p, w, q).permute(0, 2, 4, 1, 3, 5).reshape(b * h * w, c * p * q)
    y = x.matmul(self.weight.reshape(self.out_channels, -1).t()) + self.bias
    return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def build(mode: str, img_size: int, classes: int) -> tuple[nn.Module, nn.Module]:
    """(the model PyTorch trains, the copy ExecuTorch exports), same weights."""
    import bsr
    import timm
    from bsr.deploy.onnx_export import export_copy

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=img_size, num_classes=classes)
    if mode == "bsr":
        bsr.reprogram(model, bsr.BSRConfig())
        exported = export_copy(model, train=True)
    else:
        exported = copy.deepcopy(model)
    model.train()
    exported.train()
    for blk in exported.blocks:
        blk.attn.fused_attn = False  # the fused attention's backward has no ExecuTorch kernel
    return model, exported


def rewrite(vit: nn.Module, transposed: bool) -> nn.Module:
    for module in vit.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_linear_as_mm, module)
            if transposed:  # hold the weight as (in, out): no transpose of it in the graph
                w = module._parameters.pop("weight")
                module.weight_t = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    proj = vit.patch_embed.proj
    assert tuple(proj.stride) == tuple(proj.kernel_size) and tuple(proj.padding) == (0, 0)
    proj.forward = types.MethodType(_conv_as_mm, proj)
    return vit


def export_program(vit: nn.Module, images: Tensor, labels: Tensor) -> tuple[bytes, dict]:
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward

    start = time.perf_counter()
    ep = _export_forward_backward(torch.export.export(LossStep(vit), (images, labels), strict=False))
    ops = Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    grads = sum(1 for s in ep.graph_signature.output_specs if s.kind.name == "GRADIENT_TO_PARAMETER")
    buffer = to_edge(ep).to_executorch().buffer
    info = {"export_s": round(time.perf_counter() - start, 1), "pte_mib": round(len(buffer) / 2**20, 2),
            "gradients": grads, "aten_ops": dict(ops.most_common(12))}
    return buffer, info


def profile(buffer: bytes, images: Tensor, labels: Tensor, path: Path, top: int = 12) -> list:
    """Top operators of one ExecuTorch forward_backward by total time (ETDump, read with the devtools Inspector)."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer
    from executorch.extension.training import TrainingModule

    module = _load_for_executorch_from_buffer(buffer, enable_etdump=True)
    TrainingModule(module).forward_backward("forward", (images, labels))
    module.write_etdump_result_to_file(str(path))
    totals: Counter = Counter()
    for block in Inspector(etdump_path=str(path)).event_blocks:
        for event in block.events:
            if event.perf_data is not None and event.name.startswith("native_call_"):  # one per kernel call
                totals[event.name[len("native_call_"):]] += sum(event.perf_data.raw)
    whole = sum(totals.values())
    return [(name, round(ms, 1), round(100 * ms / whole, 1)) for name, ms in totals.most_common(top)]  # ms, %


def run(mode: str, variant: str, args, batches: list) -> dict:
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer

    model, copy_ = build(mode, args.img_size, args.classes)
    if variant in ("rewrite", "transposed"):
        rewrite(copy_, transposed=variant == "transposed")
    buffer, info = export_program(copy_, *batches[0])
    del copy_
    et = _load_for_executorch_for_training_from_buffer(buffer)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    et_opt = None
    times: dict = {"pt": [], "et": [], "pt_cpu": [], "et_cpu": []}
    losses: dict = {"pt": [], "et": []}
    for i, (images, labels) in enumerate(batches):
        w0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        w1, c1 = time.perf_counter(), time.process_time()
        et_loss = et.forward_backward("forward", (images, labels))[0]
        if et_opt is None:  # the parameters are known only after the first forward_backward
            et_opt = get_sgd_optimizer(et.named_parameters(), args.lr)
        et_opt.step(et.named_gradients())
        w2, c2 = time.perf_counter(), time.process_time()
        losses["pt"].append(loss.item())
        losses["et"].append(float(et_loss))
        if i >= args.warmup:
            times["pt"].append(w1 - w0), times["et"].append(w2 - w1)
            times["pt_cpu"].append(c1 - c0), times["et_cpu"].append(c2 - c1)
    med = {k: round(1000 * statistics.median(v), 1) for k, v in times.items()}
    rec = {"mode": mode, "variant": variant, **info, "trained_params": len(list(et.named_parameters())),
           "pt_ms": med["pt"], "et_ms": med["et"], "pt_cpu_ms": med["pt_cpu"], "et_cpu_ms": med["et_cpu"],
           "ratio": round(med["et"] / med["pt"], 2),
           "loss_max_abs_diff": max(abs(a - b) for a, b in zip(losses["pt"], losses["et"])),
           "losses_pt": losses["pt"], "losses_et": losses["et"]}
    if args.profile:
        path = Path(args.out).with_name(f"etdump-{mode}-{variant}.etdp")
        try:
            rec["et_top_ops"] = profile(buffer, *batches[0], path)
        except Exception as e:  # the profile is extra information; the timing stands without it
            rec["et_top_ops"] = f"profile failed: {type(e).__name__}: {e}"
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="bsr,full")
    parser.add_argument("--variants", default="stock,rewrite,transposed")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--profile", action="store_true", help="also write an ETDump and list ExecuTorch's top ops")
    parser.add_argument("--out", default="runs/executorch-step.json")
    args = parser.parse_args()

    torch.set_num_threads(1)
    _torchvision_shim()
    import executorch
    from executorch.extension.pybindings import portable_lib

    et_threads = portable_lib._threadpool_get_thread_count()
    portable_lib._unsafe_reset_threadpool(1)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen),
                torch.randint(0, args.classes, (args.batch_size,), generator=gen))
               for _ in range(args.warmup + args.steps)]
    records = []
    for mode in args.modes.split(","):
        for variant in args.variants.split(","):
            records.append(run(mode, variant, args, batches))
            r = records[-1]
            print(f"{mode:4s} {variant:7s} PyTorch {r['pt_ms']:8.1f} ms  ExecuTorch {r['et_ms']:8.1f} ms  "
                  f"x{r['ratio']:<5}  export {r['export_s']} s  loss diff {r['loss_max_abs_diff']:.1e}", flush=True)
    doc = {"what": "median train-step time, ms, PyTorch vs ExecuTorch training extension (1 thread)",
           "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "executorch": getattr(executorch, "__version__", "1.5.1"),
           "et_threadpool_default": et_threads, "et_threadpool_used": portable_lib._threadpool_get_thread_count(),
           "batch_size": args.batch_size, "img_size": args.img_size, "steps": args.steps, "warmup": args.warmup,
           "lr": args.lr, "results": records}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(f"{'mode':4s} {'variant':7s} {'PyTorch ms':>10s} {'ExecuTorch ms':>13s} {'ratio':>6s} {'export s':>8s}")
    for r in records:
        print(f"{r['mode']:4s} {r['variant']:7s} {r['pt_ms']:10.1f} {r['et_ms']:13.1f} {r['ratio']:6.2f} "
              f"{r['export_s']:8.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
