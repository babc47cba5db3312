"""`bsr study`, `bsr study-combine` and `bsr show-tokens`: a tiny study end to end, skip and resume, seeds pooled
from two studies, Pareto front, bad study files, the committed study files parse offline."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from bsr.cli import EXIT_USER_ERROR, main
from bsr.errors import BSRError
from bsr.study import combine_studies, load_study, pareto_front, parse_study, run_state, run_study, show_tokens

ROOT = Path(__file__).resolve().parent.parent

# vit_micro at 16 px (4x4 patches), 32 images, 2 steps: seconds per run.
TINY = {
    "name": "tiny",
    "base": {"model": "vit_micro_patch4_28", "img_size": 16, "checkpoint": "none", "limit": 32, "batch_size": 16, "steps": 2, "eval_every": 2,
             "threads": 1},
    "datasets": ["digits-embedded"],
    "seeds": [0],
    "measure": {"mmap_threshold": None},  # in-process here: leave pytest's allocator alone
    "runs": [{"name": "full", "method": "full", "lr": 1e-3}, {"name": "bsr", "method": "bsr"}],
    "quick": {"runs": ["bsr"]},
}


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    """The tiny study, run once in this process (each run through bsr.train.train, as `bsr train` does)."""
    out = tmp_path_factory.mktemp("study") / "out"
    lines = []
    data = run_study(parse_study(TINY), out, isolate=False, log=lines.append)
    return out, data, lines


def test_study_writes_table_json_and_plots(study_out):
    out, data, _ = study_out
    for name in ("study.json", "study.md", "accuracy_vs_memory.png", "tokens-digits-embedded.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {a["point"]: a for a in json.loads((out / "study.json").read_text())["aggregates"]}
    assert set(rows) == {"full", "bsr"}
    assert rows["full"]["memory_ratio_vs_full"] == pytest.approx(1.0)
    assert rows["bsr"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["bsr"]["train_flops_per_step"] < rows["full"]["train_flops_per_step"]
    assert all(a["train_peak_bytes"] > 0 and a["best_mean"] is not None for a in rows.values())
    table = (out / "study.md").read_text()
    assert "| full | full |" in table and "| bsr | bsr |" in table
    assert (out / "runs" / "bsr-digits-embedded-s0" / "report.json").is_file()


def test_second_invocation_skips_finished_runs(study_out):
    out, _, _ = study_out
    report = out / "runs" / "full-digits-embedded-s0" / "report.json"
    before = report.stat().st_mtime_ns
    lines = []
    run_study(parse_study(TINY), out, isolate=False, tokens=False, log=lines.append)
    assert "2 runs" in lines[0] and "priority 0: 0 jobs (0 runs)" in lines[1]
    assert report.stat().st_mtime_ns == before


def test_a_second_study_in_the_same_directory_is_refused(study_out):
    """While a study runs into `out` another is refused (it would resume the same runs); rendering is not."""
    from bsr.files import exclusive_dir

    out, _, _ = study_out
    with exclusive_dir(out, "study directory"):  # the running study's lock
        with pytest.raises(BSRError, match="study directory .* is in use by another bsr process"):
            run_study(parse_study(TINY), out, isolate=False, tokens=False, log=lambda s: None)
        data = run_study(parse_study(TINY), out, isolate=False, tokens=False, log=lambda s: None,
                         execute_jobs=False)
    assert {a["point"] for a in data["aggregates"]} == {"full", "bsr"}


def test_killed_run_resumes_from_its_checkpoint(study_out):
    out, _, _ = study_out
    run_dir = out / "runs" / "bsr-digits-embedded-s0"
    first = json.loads((run_dir / "report.json").read_text())
    (run_dir / "report.json").unlink()  # killed after its last checkpoint, before the report
    assert run_state(run_dir, parse_study(TINY).runs[1].config) == "resume"
    run_study(parse_study(TINY), out, isolate=False, tokens=False, log=lambda s: None)
    again = json.loads((run_dir / "report.json").read_text())
    assert again["accuracy"] == first["accuracy"]
    assert again["median_step_time_s"] is None  # resumed at its last step: nothing left to train


def test_changed_config_is_refused_not_mixed(study_out):
    out, _, _ = study_out
    changed = {**TINY, "base": {**TINY["base"], "steps": 3}}
    with pytest.raises(BSRError, match="steps=2.*now says 3.*another --out"):
        run_study(parse_study(changed), out, isolate=False, log=lambda s: None)


def test_study_combine_pools_the_seeds_of_two_studies(study_out, tmp_path, capsys):
    """Seed 0 from the module's study, seed 1 from another study of the same points: one table over both seeds, every
    mean recomputed from the run records; a point run differently, or a seed found twice, is refused in one line."""
    first, data0, _ = study_out
    data1 = run_study(parse_study({**TINY, "seeds": [1]}), tmp_path / "second", isolate=False, tokens=False,
                      log=lambda s: None)
    out = tmp_path / "combined"
    assert main(["study-combine", str(first / "study.json"), str(tmp_path / "second"), "--out", str(out)]) == 0
    combined = json.loads((out / "study.json").read_text())
    rows = {a["point"]: a for a in combined["aggregates"]}
    for point in ("full", "bsr"):
        runs = [r for d in (data0, data1) for r in d["runs"] if r["point"] == point]
        assert rows[point]["seeds"] == [0, 1]
        assert rows[point]["best_mean"] == pytest.approx(sum(r["best"] for r in runs) / 2)
        measured = next(a for a in data0["aggregates"] if a["point"] == point)  # the first input's measurement
        assert rows[point]["train_peak_bytes"] == measured["train_peak_bytes"]
    assert rows["bsr"]["memory_ratio_vs_full"] == pytest.approx(
        rows["full"]["train_peak_bytes"] / rows["bsr"]["train_peak_bytes"])
    md = (out / "study.md").read_text()
    assert "Combined by `bsr study-combine`" in md and "| 2/2 |" in md
    assert (out / "accuracy_vs_memory.png").stat().st_size > 0

    with pytest.raises(BSRError, match="seed 0 of point full .* is also in"):
        combine_studies([first, first], "twice")
    other = json.loads((tmp_path / "second" / "study.json").read_text())
    next(a for a in other["aggregates"] if a["point"] == "full")["config"]["img_size"] = 32  # any training option
    (tmp_path / "other.json").write_text(json.dumps(other))
    capsys.readouterr()
    assert main(["study-combine", str(first), str(tmp_path / "other.json"), "--out", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "point full on digits-embedded has img_size=32" in err


def test_show_tokens_writes_png(study_out, tmp_path):
    out, _, _ = study_out
    image = tmp_path / "seven.png"
    Image.new("L", (28, 28), 0).save(image)
    png = show_tokens(out / "runs" / "bsr-digits-embedded-s0", [str(image)], dataset_images=2,
                      out=tmp_path / "tokens.png")
    assert png.stat().st_size > 0
    with pytest.raises(BSRError, match="drops no tokens"):
        show_tokens(out / "runs" / "full-digits-embedded-s0", dataset_images=1, out=tmp_path / "x.png")


@pytest.mark.parametrize("points, front", [
    ([(1, 50), (2, 60), (3, 55)], [0, 1]),             # the third costs more and is worse
    ([(5, 90), (1, 10), (3, 90)], [1, 2]),             # same accuracy for more memory is dominated
    ([(2, 70), (2, 80), (1, 60)], [2, 1]),             # equal memory: only the better one
    ([(1, 70), (1, 70)], [0]),                         # exact tie: the first
    ([], []),
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


@pytest.mark.parametrize("change, message", [
    ({"epochs_total": 3}, "unknown study key 'epochs_total'"),
    ({"runs": [{"name": "x", "method": "fastest"}]}, "run x on digits-embedded: method='fastest' is not valid"),
    ({"runs": [{"name": "x", "lr_max": 1}]}, "run x on digits-embedded: unknown config key 'lr_max'"),
    ({"runs": [{"name": "x", "bsr": {"keep": 0.3}}]}, "unknown config key 'bsr.keep'"),
    ({"runs": [{"name": "x"}, {"name": "x"}]}, "run name 'x' is used twice"),
    ({"runs": [{"method": "bsr"}]}, "runs[0] needs a name"),
    ({"seeds": "0,1"}, "seeds must be a non-empty list of ints"),
    ({"base": {"seed": 3}}, "'seed' is set by the study"),
    ({"quick": {"runs": ["nope"]}}, "quick.runs names 'nope'"),
    ({"quick": {"jobs": 2}}, "unknown key quick.jobs"),
    ({"quick": {"sweep": {"nope": False}}}, "quick.sweep names 'nope', which is not a quick run"),
    ({"quick": {"sweep": {"bsr": [0]}}}, "runs.bsr.sweep must be a non-empty list of positive learning rates"),
    ({"measure": {"steps_": 1}}, "unknown key measure.steps_"),
])
def test_bad_study_is_one_line_error(change, message):
    quick = "quick" in change
    with pytest.raises(BSRError) as info:
        parse_study({**TINY, **change}, quick=quick)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_bad_study_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "runs": [{"name": "x", "method": "fastest"}]}))
    assert main(["study", str(path), "--out", str(tmp_path / "o")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bsr: error:") and "method='fastest'" in err[0]
    assert not (tmp_path / "o").exists()


def test_quick_sweep_replaces_an_entrys_lr_list():
    data = {**TINY, "base": {**TINY["base"], "val_fraction": 0.25}, "sweep": {"lr": [1e-4, 3e-4, 1e-3]},
            "quick": {"runs": ["bsr"], "sweep": {"bsr": [3e-4]}}}
    assert {r.sweep and tuple(r.sweep) for r in parse_study(data).runs if r.point == "bsr"} == {(1e-4, 3e-4, 1e-3)}
    assert {tuple(r.sweep) for r in parse_study(data, quick=True).runs} == {(3e-4,)}
    data["quick"]["sweep"] = {"bsr": False}
    assert [r.sweep for r in parse_study(data, quick=True).runs] == [None]


def test_committed_studies_parse_offline():
    paper = load_study(ROOT / "studies" / "paper.yaml")
    assert len(paper.runs) == 2 * 7 * 5 * 3  # 2 models x 7 methods x 5 datasets x 3 seeds
    by_id = {r.run_id: r.config for r in paper.runs}
    assert by_id["vitb-bsr-flowers102-s0"]["lr"] == 3e-2  # the SGD recipe's per-dataset lr
    assert by_id["vitb-full-food101-s0"]["steps"] == 30_000
    assert by_id["deits-lora-pets-s2"]["optimizer"] == "adamw"
    assert all(c["pretrained"] and c["download"] for c in by_id.values())
    offline = load_study(ROOT / "studies" / "offline.yaml")
    methods = {r.config["method"] for r in offline.runs}
    assert methods == {"full", "head", "bitfit", "last-k", "lora", "tokendrop", "bsr"}
    assert {r.seed for r in offline.runs} == {0, 1, 2}
    assert offline.datasets == ["digits-embedded", "sklearn-digits"]
    quick = load_study(ROOT / "studies" / "offline.yaml", quick=True)
    assert len(quick.runs) < len(offline.runs) and {r.seed for r in quick.runs} == {0}
    long = load_study(ROOT / "studies" / "offline-long.yaml")
    assert {r.config["method"] for r in long.runs if r.dataset == "sklearn-digits"} == methods
    assert all(r.config["epochs"] == 10 for r in long.runs if r.dataset == "sklearn-digits")
    moe = load_study(ROOT / "studies" / "moe.yaml")
    assert {tuple(r.config["tasks"]) for r in moe.runs} == {("fashion-mnist", "digits-embedded", "sklearn-digits")}
    assert {(r.point, r.config["moe"]) for r in moe.runs} >= {("full", True), ("bsr", True), ("dense-full", False)}


def test_worker_process_runs_jobs_in_turn(tmp_path):
    """--jobs: training runs go to a process pool whose workers run one job after another."""
    from bsr.study.runner import Job, run_jobs

    runs = parse_study(TINY).runs
    jobs = [Job("train", r.run_id, {"config": r.config, "run_dir": str(tmp_path / r.run_id), "resume": False},
                tmp_path / r.run_id / "train.log") for r in runs]
    lines = []
    results = run_jobs(jobs, 1, lines.append)
    assert all(results[r.run_id]["ok"] for r in runs), results
    assert all((tmp_path / r.run_id / "report.json").is_file() for r in runs)
    assert "step 2/2" in (tmp_path / runs[0].run_id / "train.log").read_text()  # each job's output in its own log
    assert len(lines) == 2 and lines[-1].startswith("[2/2] train bsr-digits-embedded-s0: best top-1")


PARENT = """
import os, sys, time
from bsr.study.runner import new_pool
if __name__ == "__main__":
    pool = new_pool(1, None)
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 600)  # a long job, still running when this process is killed
    time.sleep(600)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and /proc")
def test_pool_worker_exits_when_the_study_process_is_killed(tmp_path):
    """`kill -9` of a study leaves no worker training on (a restarted study would resume its run in a second one)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.5)
        assert _alive(worker)  # the sleeping job keeps it busy while its parent lives
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 30
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_multitask_study_label_trains_the_tasks_together(tmp_path):
    """A dataset label "a+b" is a multi-task run (`--tasks a,b`): per-task columns, memory of one task's step."""
    study = {**TINY, "datasets": ["digits-embedded+sklearn-digits"], "quick": {},
             "base": {**TINY["base"], "moe_experts": 4, "moe_top_k": 2, "val_fraction": 0.25, "steps": 4},
             "runs": [{"name": "full", "method": "full", "lr": 1e-3}, {"name": "dense-full", "method": "full",
                                                                       "moe": False}]}
    parsed = parse_study(study)
    assert [r.config["tasks"] for r in parsed.runs] == [["digits-embedded", "sklearn-digits"]] * 2
    data = run_study(parsed, tmp_path / "out", isolate=False, tokens=False, log=lambda s: None)
    rows = {a["point"]: a for a in data["aggregates"]}
    assert set(rows["full"]["tasks"]) == {"digits-embedded", "sklearn-digits"}
    assert rows["full"]["trainable_params"] > rows["dense-full"]["trainable_params"]  # the experts
    assert rows["full"]["train_peak_bytes"] > 0 and rows["full"]["train_flops_per_step"] > 0
    md = (tmp_path / "out" / "study.md").read_text()
    assert "| point | digits-embedded | sklearn-digits | mean |" in md
    # per task: the test top-1 at the evaluation with the best mean validation top-1 (what the mean column reports)
    assert "Per task, test top-1 at the best validation point" in md
    (run,) = [r for r in data["runs"] if r["point"] == "full"]
    run_dir = tmp_path / "out" / "runs" / "full-digits-embedded+sklearn-digits-s0"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "val_acc" in e]
    assert [e["step"] for e in evals] == [2, 4]
    best = max(evals, key=lambda e: e["val_acc"])  # the first of equals, as the trainer keeps it
    assert {name: t["at_val"] for name, t in run["tasks"].items()} == \
        {name: t["test_acc"] for name, t in best["tasks"].items()}
    assert rows["full"]["tasks"]["sklearn-digits"]["at_val_mean"] == best["tasks"]["sklearn-digits"]["test_acc"]
    assert run["test_at_val_best"] == pytest.approx(best["test_acc"])


def test_lr_sweep_chooses_on_validation_and_reuses_the_sweep_run(tmp_path):
    """sweep: each lr once at the sweep seed; the other seeds train with the lr of the best validation top-1, and the
    sweep seed's run is the chosen sweep run itself (not trained again)."""
    spec = {**TINY, "base": {**TINY["base"], "val_fraction": 0.25}, "seeds": [0, 1],
            "sweep": {"lr": [1e-5, 1e-2], "seed": 0}, "runs": [{"name": "bsr", "method": "bsr"}]}
    study = parse_study(spec)
    assert [r.run_id for r in study.sweep_runs()] == ["bsr@lr1e-05-digits-embedded-s0", "bsr@lr0.01-digits-embedded-s0"]
    data = run_study(study, tmp_path / "out", isolate=False, tokens=False, log=lambda _: None)
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert runs == ["bsr-digits-embedded-s1", "bsr@lr0.01-digits-embedded-s0", "bsr@lr1e-05-digits-embedded-s0"]
    sweep = {r["lr"]: r for r in data["sweep"]}
    chosen = max(sweep, key=lambda lr: sweep[lr]["val_best"])
    assert sweep[chosen]["chosen"] and sum(r["chosen"] for r in sweep.values()) == 1
    seed1 = yaml.safe_load((tmp_path / "out" / "runs" / "bsr-digits-embedded-s1" / "config.yaml").read_text())
    assert seed1["lr"] == chosen
    (row,) = data["aggregates"]
    assert row["lr"] == chosen and row["seeds"] == [0, 1] and row["test_at_val_mean"] is not None
    assert "Learning rates, chosen on validation" in (tmp_path / "out" / "study.md").read_text()
    from bsr.study.runner import token_run
    assert token_run(study, tmp_path / "out", "digits-embedded").name == f"bsr@lr{chosen:g}-digits-embedded-s0"
    with pytest.raises(BSRError, match="no validation split"):
        parse_study({**spec, "base": TINY["base"]})


def test_lr_from_trains_at_the_lr_chosen_for_another_point(tmp_path):
    """lr_from: an ablation is not swept; it waits for the named point's sweep and trains at the lr chosen there."""
    spec = {**TINY, "base": {**TINY["base"], "val_fraction": 0.25}, "seeds": [0],
            "sweep": {"lr": [1e-5, 1e-2], "seed": 0},
            "runs": [{"name": "bsr", "method": "bsr", "priority": 1},
                     {"name": "bsr-keep1", "method": "bsr", "bsr": {"keep_rate": 1.0}, "lr_from": "bsr"}]}
    study = parse_study(spec)
    assert [r.point for r in study.sweep_runs()] == ["bsr@lr1e-05", "bsr@lr0.01"]
    assert next(r for r in study.runs if r.point == "bsr-keep1").waiting  # no lr before the sweep
    data = run_study(study, tmp_path / "out", isolate=False, tokens=False, log=lambda _: None)
    chosen = next(r["lr"] for r in data["sweep"] if r["chosen"])
    ablation = yaml.safe_load((tmp_path / "out" / "runs" / "bsr-keep1-digits-embedded-s0" / "config.yaml").read_text())
    assert ablation["lr"] == chosen
    for bad in ({"name": "x", "method": "bsr", "lr_from": "nope"},
                {"name": "x", "method": "bsr", "lr_from": "bsr", "priority": 2},
                {"name": "x", "method": "bsr", "lr_from": "bsr", "lr": 1e-3}):
        with pytest.raises(BSRError, match="lr_from"):
            parse_study({**spec, "runs": [spec["runs"][0], bad]})
