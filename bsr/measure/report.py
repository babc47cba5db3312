"""Rendering of `bsr bench` records: `bench.md` tables, `bench.json`, `bench.png`, and the analytic comparison.

Everything here reads the records `bsr.measure.bench.run_bench` returns (or `bench.json` loads back) and measures
nothing, so a report can be re-rendered from a saved run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..train.methods import format_tokens
from .bench import BenchResult
from .bench_spec import BF16_STATE, FUSED, MIB, base_method

HIGHLIGHT = ("bsr", "bsr-lean", "moe-bsr", "moe-bsr-lean")


def _mib(nbytes: Optional[float]) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:,.1f}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def baseline_of(records: list[dict]) -> str:
    """The method the ratios divide (`full`, or `moe-full` in a multi-task run; older records: `full`)."""
    return records[0].get("baseline", "full") if records else "full"


def _ratios(r: dict) -> dict:
    """baseline/method ratios of a record (`ratio_vs_full` in records written before the baseline was named)."""
    return r["ratio_vs_baseline"] if "ratio_vs_baseline" in r else r["ratio_vs_full"]


def _same_option(records: list[dict], kind: str) -> Optional[tuple[str, list[str]]]:
    """With `+fused` methods in the run: (header, cells) of the `kind` ratio against the baseline given the same
    option (`full+fused` for a fused method), so that the fused step's own saving is not read as the method's."""
    if not _with_options(records):
        return None
    return (f"{baseline_of(records)}(same option)/x",
            [_ratio((r.get("ratio_vs_same_option") or {}).get(kind)) for r in records])


def _with_options(records: list[dict]) -> bool:
    """Whether any record used an optimizer option (`+fused`, `+bf16`)."""
    return any(r.get("fused_step") or r.get("bf16_state") for r in records)


def _name(r: dict) -> str:
    return f"**{r['method']}**" if base_method(r["method"]) in HIGHLIGHT else r["method"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table: first column left-aligned, the figures right-aligned."""
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(row) + " |" for row in rows)]


def memory_table(records: list[dict]) -> list[str]:
    """Measured memory per method (MiB) with baseline/method ratios, and the analytic figure beside it."""
    per = f"{baseline_of(records)}/x"
    header = ["method", "trainable params", "params MiB", "grads MiB", "optimizer MiB", "saved MiB", per,
              "train peak MiB", per, "infer peak MiB", "train/infer", "analytic MiB"]
    rows = []
    for r in records:
        ratio = _ratios(r)
        rows.append([_name(r), f"{r['trainable_params']:,} / {r['total_params']:,}", _mib(r["param_bytes"]),
                     _mib(r["grad_bytes"]), _mib(r["optimizer_bytes"]), _mib(r["saved_activation_bytes"]),
                     _ratio(ratio["saved_activation"]), _mib(r["train_peak_bytes"]), _ratio(ratio["train_peak"]),
                     _mib(r["infer_peak_bytes"]), _ratio(r["train_over_infer_peak"]),
                     _mib(r["analytic_memory_bytes"])])
    return _table(*_with_column(header, rows, 9, _same_option(records, "train_peak")))


def compute_table(records: list[dict]) -> list[str]:
    """FLOPs, forward GMACs and median step time per method, with baseline/method ratios and achieved GFLOP/s."""
    per = f"{baseline_of(records)}/x"
    header = ["method", "train GFLOP/step", per, "fwd GMACs/img", "step s (median)", per, "steps s",
              "achieved GFLOP/s", "matmul GFLOP/s"]
    rows = []
    for r in records:
        ratio = _ratios(r)
        rows.append([_name(r), f"{r['train_flops_per_step'] / 1e9:,.1f}", _ratio(ratio["flops"]),
                     f"{r['fwd_gmacs_per_image']:.2f}", f"{r['step_time_median_s']:.3f}", _ratio(ratio["step_time"]),
                     ", ".join(f"{t:.2f}" for t in r["step_times_s"]), f"{r['achieved_gflops']:.1f}",
                     f"{r['matmul_gflops']:.1f}"])
    return _table(*_with_column(header, rows, 6, _same_option(records, "step_time")))


def _with_column(header: list[str], rows: list[list[str]], at: int,
                 column: Optional[tuple[str, list[str]]]) -> tuple[list[str], list[list[str]]]:
    """`header` and `rows` with `column` (a header and one cell per row) inserted at position `at`, if given."""
    if column is None:
        return header, rows
    return header[:at] + [column[0]] + header[at:], [row[:at] + [cell] + row[at:] for row, cell in zip(rows, column[1])]


def _block_order(name: str) -> tuple:
    is_block = name.startswith("blocks.")
    return (not is_block, int(name.split(".")[1]) if is_block else 0, name)


def saved_by_block_table(records: list[dict]) -> list[str]:
    """Saved-for-backward MiB per top-level part (blocks kept apart) of every method: where the bytes go."""
    names = sorted({k for r in records for k in r["saved_by_block"]}, key=_block_order)
    rows = [[name, *(_mib(r["saved_by_block"].get(name, 0)) for r in records)] for name in names]
    rows.append(["**total**", *(f"**{_mib(r['saved_activation_bytes'])}**" for r in records)])
    return _table(["part", *(r["method"] for r in records)], rows)


def _multitask_lines(spec: dict) -> list[str]:
    """What a multi-task (`--moe`) run measured, for the header of `bench.md`; nothing for a single-task run."""
    if not spec.get("moe"):
        return []
    return [f"- multi-task: {spec['num_tasks']} tasks of {spec['num_classes']} classes (one head, and one gate per "
            f"MoE layer, per task); MoE layers at blocks 3, 7, 11 with {spec['moe_experts']} experts, top-"
            f"{spec['moe_top_k']}, router noise on; each measured step is one batch of task 0 (forward on its head, "
            f"cross-entropy, backward, optimizer step); moe-full: the MoE model trained in full without dropping; "
            f"moe-bsr(-lean): `reprogram_multitask` (MoE blocks trained, dropping at 3, 6, 9); dense-full: the "
            f"dense multi-task ViT trained in full"]


def _tokens(counts: list) -> str:
    """`0-2: 197/197, 3: 197/100, ...` (attention/MLP tokens, runs of equal blocks merged)."""
    return format_tokens([tuple(c) for c in counts])


def render_markdown(result: BenchResult, compare: bool = False) -> str:
    """The whole `bench.md`: run header, memory and compute tables, saved bytes per block, tokens, environment."""
    meta, records = result.meta, result.records
    spec, machine, versions = meta["spec"], meta["machine"], meta["versions"]
    first, baseline = records[0], baseline_of(records)
    lines = [f"# bsr bench{' --moe' if spec.get('moe') else ''}: {spec['model']}, {first['img_size']} px, "
             f"batch {spec['batch_size']}, {spec['optimizer']}", "",
             f"- command: `{meta['command'] or '(library call)'}`",
             f"- date: {meta['started']} to {meta['finished']} (UTC)",
             f"- machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
             f"device {machine['device']}" + (f" ({machine['gpu']})" if "gpu" in machine else ""),
             f"- versions: bsr {versions['bsr']} (commit {versions.get('commit') or 'unknown'}), "
             f"torch {versions['torch']}, timm {versions['timm']}, python {versions['python']}",
             f"- protocol: memory in a fresh process per method ({spec['warmup']} warm-up + {spec['memory_steps']} "
             f"measured step(s), peak minus the memory before the model was built); time round-robin in one process "
             f"({spec['warmup']} warm-up + {spec['steps']} timed rounds, medians); matmul GFLOP/s sampled each round: "
             + ", ".join(f"{g:.0f}" for g in meta["matmul_gflops_per_round"]),
             "- glibc mmap threshold: "
             + (f"fixed at {spec['mmap_threshold']:,} bytes (peak RSS tracks live tensors)"
                if spec.get("mmap_threshold") else "glibc's default (dynamic; its heap may keep freed activations)"),
             *_multitask_lines(spec),
             f"- ratios are {baseline}/method from this run, baseline **{baseline}** (higher is better for the "
             f"method)" + (f"; `(same option)` columns: against {baseline} with the method's options: `{FUSED}` "
                           f"(the optimizer step fused into backward, gradients freed as they are used; its grads "
                           f"MiB: the largest gradient, the most it holds at once), `{BF16_STATE}` (momentum in bf16)"
                           if _with_options(records) else ""), "",
             "## Memory", "", *memory_table(records), "",
             "## Compute and time", "", *compute_table(records), "",
             "## Saved for backward, MiB per part", "", *saved_by_block_table(records), "",
             "## Tokens per block (attention/MLP)", ""]
    lines += [f"- {r['method']}: {_tokens(r['tokens'])}" for r in records]
    configs = [r for r in records if r.get("bsr_config")]
    if configs:
        lines += ["", "## BSR options", ""]
        lines += [f"- {r['method']}: `{json.dumps(r['bsr_config'])}`" for r in configs]
    if compare:
        lines += ["", "## Analytic formula against the measurements", "", *compare_analytic(records)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- analytic


def _reasons(r: dict) -> list[str]:
    """Why the authors' formula and our measurements differ for this record, each with its size."""
    a = r["analytic"]
    cfg = r.get("bsr_config") or {}
    frozen = r["trainable_params"] < r["total_params"]
    stored = cfg.get("frozen_dtype", "float32") if frozen else None
    why = [f"weights {_mib(r['param_bytes'])} MiB stored vs {_mib(a['param_bytes'])} in the formula"
           + (f" (it counts frozen weights at 8 bit, here they are {stored})" if frozen else
              " (all trainable: 32 bit in both)"),
           f"gradients {_mib(r['grad_bytes'])} MiB and optimizer state {_mib(r['optimizer_bytes'])} MiB are not in "
           f"the formula",
           _activation_reason(a)]
    if a.get("softmax_bytes"):
        why.append(f"it counts {_mib(a['softmax_bytes'])} MiB of attention matrices (heads x N^2 per block), which "
                   f"timm's fused attention never stores (it keeps a logsumexp per row)")
    if cfg.get("recompute", "none") not in ("none", "auto"):
        why.append(f"recompute={cfg['recompute']}: backward re-runs the trained blocks, so little is kept, "
                   f"which the formula does not model")
    rest = r["train_peak_bytes"] - r["param_bytes"] - r["grad_bytes"] - r["optimizer_bytes"] \
        - r["saved_activation_bytes"]
    if rest >= 0:
        why.append(f"the measured peak is {_mib(rest)} MiB above weights + grads + optimizer + saved: backward's "
                   f"temporaries, recomputed activations, the allocator's retained heap, kernels' workspaces")
    else:
        why.append(f"the measured peak is {_mib(-rest)} MiB below weights + grads + optimizer + saved: backward "
                   f"frees saved activations as the gradients appear, so they never all coexist")
    return why


def _activation_reason(a: dict) -> str:
    if a["activation_bytes"] > 1.01 * a["kept_bytes"]:
        return (f"its activation term is a per-layer peak ({_mib(a['activation_bytes'])} MiB): what is kept "
                f"({_mib(a['kept_bytes'])} MiB) plus one layer's input and output")
    return (f"its activation term is what is kept ({_mib(a['kept_bytes'])} MiB), counted per layer; saved counts "
            f"each storage once")


def compare_analytic(records: list[dict]) -> list[str]:
    """Per method: analytic total vs measured training peak, analytic kept vs measured saved bytes, and why."""
    lines = []
    for r in records:
        if r.get("analytic") is None:
            lines.append(f"- {r['method']}: no analytic counterpart (the formula covers full, head, last-k, "
                         f"tokendrop and bsr)")
            continue
        a, total, peak = r["analytic"], r["analytic_memory_bytes"], r["train_peak_bytes"]
        lines.append(f"- {r['method']}: analytic {_mib(total)} MiB vs measured train peak {_mib(peak)} MiB "
                     f"(measured/analytic {peak / total:.2f}); analytic kept activations {_mib(a['kept_bytes'])} "
                     f"MiB vs measured saved {_mib(r['saved_activation_bytes'])} MiB"
                     + (f" ({r['saved_activation_bytes'] / a['kept_bytes']:.2f})" if a["kept_bytes"] else ""))
        lines += [f"  - {why}" for why in _reasons(r)]
    return lines


# ------------------------------------------------------------------------------------------------- plot and files


def plot(result: BenchResult, path: Path) -> None:
    """`bench.png`: training peak memory against median step time, one point per method, BSR highlighted."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    baseline = baseline_of(result.records)
    for r in result.records:
        highlight = r["method"] in HIGHLIGHT
        x, y = r["step_time_median_s"], r["train_peak_bytes"] / MIB
        ax.scatter([x], [y], s=90 if highlight else 40, color="tab:red" if highlight else "tab:blue",
                   zorder=3 if highlight else 2)
        ratio = _ratios(r)["train_peak"]
        label = r["method"] + (" (baseline)" if r["method"] == baseline else
                               f" ({ratio:.2f}x)" if ratio is not None else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4),
                    fontweight="bold" if highlight else "normal")
    spec, first = result.meta["spec"], result.records[0]
    ax.set_xlabel("median training step time (s)")
    ax.set_ylabel("training peak memory above the pre-build RSS (MiB)")
    title = f"{spec['model']}{' MoE multi-task' if spec.get('moe') else ''}, {first['img_size']} px, " \
            f"batch {spec['batch_size']}, {spec['optimizer']}"
    ax.set_title(f"{title}\n(x): train peak {baseline}/method", fontsize=10)
    # Room on the right and top for the labels of the slowest and largest methods.
    ax.set_xlim(0, 1.15 * max(r["step_time_median_s"] for r in result.records))
    ax.set_ylim(0, 1.1 * max(r["train_peak_bytes"] for r in result.records) / MIB)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(result: BenchResult, out: Path, compare: bool = False) -> dict[str, Path]:
    """Write `bench.json`, `bench.md` and `bench.png` into `out` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    paths["md"].write_text(render_markdown(result, compare=compare))
    plot(result, paths["png"])
    return paths


def load_result(path: Path) -> BenchResult:
    """A `BenchResult` back from a `bench.json`."""
    return BenchResult.from_dict(json.loads(Path(path).read_text()))
