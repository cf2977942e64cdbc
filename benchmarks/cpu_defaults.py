#!/usr/bin/env python
"""The CPU defaults of issue 17 measured and written into ``docs/benchmarks.md``: the demo from a
fresh clone (several runs in a row), plans under load, budget fill (planned vs actual), and the
tables of ``cpu_backends.py``, ``scaling.py`` and ``profile_step.py`` from their JSON files.

    .venv/bin/python benchmarks/cpu_defaults.py demo --runs 3          # ~5 min per run, idle machine
    .venv/bin/python benchmarks/cpu_defaults.py plan-load WORK         # WORK: a planned hippocampus work dir
    .venv/bin/python benchmarks/cpu_defaults.py fill WORK [WORK ...]   # trained work dirs with run.json schedules
    .venv/bin/python benchmarks/cpu_defaults.py render                 # the block in docs/benchmarks.md

Each measuring command writes ``docs/benchmarks/cpu_defaults/<name>.json``; ``render`` reads those
and the other benchmarks' JSON and replaces the block between the markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "cpu_defaults"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- cpu_defaults:begin -->", "<!-- cpu_defaults:end -->"


def _save(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    data = {"command": " ".join(["python", "benchmarks/cpu_defaults.py", *map(shlex.quote, sys.argv[1:])]),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(), **data}
    path = OUT / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def _machine() -> str:
    return f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"


def _schedule(run_json: Path) -> dict:
    run = json.loads(run_json.read_text())
    row = {"run": str(run_json), "budget_min": (run.get("budget") or {}).get("time_budget_min"),
           **(run.get("schedule") or {})}
    initial = ((run.get("plans_config") or {}).get("training") or {}).get("initial_lr")
    if initial and row.get("actual", {}).get("final_lr") is not None:
        row["actual"]["final_lr_fraction"] = row["actual"]["final_lr"] / initial
    return row


def demo(args: argparse.Namespace) -> None:
    """``make demo`` from fresh clones of this repository's HEAD, one after the other."""
    runs = []
    for i in range(args.runs):
        clone = Path(tempfile.mkdtemp(prefix=f"medseg_demo{i + 1}_"))
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone / "repo")], check=True)
        env = {**os.environ, "MEDSEG_HOME": str(clone / "home")}  # no step-time cache: a new machine
        env.pop("VIRTUAL_ENV", None)
        start = time.monotonic()
        proc = subprocess.run(["make", "demo"], cwd=clone / "repo", env=env, capture_output=True, text=True)
        wall = time.monotonic() - start
        (clone / "make_demo.log").write_text(proc.stdout + proc.stderr)
        out = clone / "repo" / "demo_output"
        row = {"run": i + 1, "rc": proc.returncode, "wall_s": round(wall, 1), "log": str(clone / "make_demo.log")}
        if proc.returncode == 0:
            plans = json.loads((out / "model" / "plans.json").read_text())
            summary = json.loads((out / "report" / "summary.json").read_text())
            key = plans["recommended"][0]
            run_json = next((out / "model" / "runs" / key).glob("fold_*/run.json"))
            row |= {"config": key, "recommendation": plans.get("recommendation", ""),
                    "width": plans["configurations"][key]["architecture"]["features"][0],
                    "dice_fg": summary["foreground_mean"]["dice"],
                    "dice": {v["name"]: v["dice"]["mean"] for v in summary["classes"].values()},
                    "hd95": {v["name"]: v["hd95_mm"]["mean"] for v in summary["classes"].values()},
                    "schedule": _schedule(run_json)}
        runs.append(row)
        print(json.dumps(row))
        if not args.keep:
            subprocess.run(["rm", "-rf", str(clone / "repo" / ".venv")], check=False)
    _save("demo", {"runs": runs})


def plan_load(args: argparse.Namespace) -> None:
    """Plans of WORK's fingerprint: idle with fresh measurements, with one core kept busy (fresh, then
    from the idle run's cache) — the decisions compared."""
    from medseg.fingerprint import Fingerprint
    from medseg.planning.planner import StepTimer, plan_dataset
    from medseg.workdir import WorkDir

    fp = Fingerprint.model_validate_json(WorkDir(args.work).fingerprint.read_text())
    cache = Path(tempfile.mkdtemp()) / "step_times.json"

    def plan(timer: StepTimer) -> tuple[dict, float]:
        start = time.monotonic()
        p = plan_dataset(fp, device="cpu", configs=["2d", "3d_fullres"], time_budget_min=args.minutes, timer=timer)
        decided = {k: {"patch": c.patch_size, "batch": c.batch_size, "width": c.architecture.features[0],
                       "iterations": c.training.iterations_per_epoch}
                   for k, c in p.configurations.items()}
        return decided | {"recommended": p.recommended}, time.monotonic() - start

    idle_timer = StepTimer(cache)
    idle, idle_s = plan(idle_timer)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        fresh_timer = StepTimer(None)
        fresh, fresh_s = plan(fresh_timer)
        cached_timer = StepTimer(cache)
        cached, cached_s = plan(cached_timer)
    finally:
        busy.kill()
        busy.wait()
    common = sorted(set(idle_timer.memo) & set(fresh_timer.memo))
    ratios = [fresh_timer.memo[k] / idle_timer.memo[k] for k in common]
    _save("plan_load", {"minutes": args.minutes, "idle": idle, "busy_fresh": fresh, "busy_cached": cached,
                        "fresh_equal": fresh == idle, "cached_equal": cached == idle,
                        "seconds": {"idle": idle_s, "busy_fresh": fresh_s, "busy_cached": cached_s},
                        "ratios": ratios, "cached_measured": cached_timer.measured})


def fill(args: argparse.Namespace) -> None:
    rows = [_schedule(p) for w in args.works for p in sorted(Path(w).glob("runs/*/fold_*/run.json"))]
    _save("fill", {"runs": [r for r in rows if r.get("actual")]})


def profile(args: argparse.Namespace) -> None:
    data = json.loads(args.json.read_text())
    _save("profile", data)
    saved = OUT / "profile.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "command": args.profile_command}, indent=1) + "\n")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def render(args: argparse.Namespace) -> None:
    lines = [BEGIN, "", "## CPU defaults (issue 17; generated by `benchmarks/cpu_defaults.py render`)", ""]
    d = _load(OUT / "demo.json")
    if d:
        lines += ["### `make demo` from a fresh clone, runs in a row", "", f"`{d['command']}` ({d['date']}, "
                  f"{d['machine']}). Wall time is all of `make demo`: venv, install, plan (cold step-time "
                  "measurements), training, prediction of the 4 held-out cases, evaluation.", "",
                  "| run | rc | wall | config (width) | epochs × it. | training min (budget used) | Dice fg | HD95 mm |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in d["runs"]:
            s = (r.get("schedule") or {}).get("actual") or {}
            hd = r.get("hd95") or {}
            lines.append(f"| {r['run']} | {r['rc']} | {r['wall_s'] / 60:.2f} min | {r.get('config', '–')} "
                         f"({r.get('width', '–')}) | {s.get('epochs', '–')} × "
                         f"{(r.get('schedule') or {}).get('planned', {}).get('iterations_per_epoch', '–')} | "
                         f"{_f(s.get('minutes'), 2)} ({_f(100 * s['budget_used'] if s.get('budget_used') else None, 0)}%)"
                         f" | **{_f(r.get('dice_fg'))}** | {' / '.join(_f(v, 2) for v in hd.values())} |")
        lines.append("")
    p = _load(OUT / "plan_load.json")
    if p:
        r = p["ratios"]
        lines += ["### Plans under load", "", f"`{p['command']}` ({p['date']}): the hippocampus fingerprint "
                  f"planned for {p['minutes']} min, idle, then with another process keeping one core busy.", "",
                  "| plan | 2d (patch, batch, width) | 3d_fullres (patch, batch, width) | recommended | seconds "
                  "| equals idle |",
                  "|---|---|---|---|---|---|"]
        for name, key, eq in [("idle, fresh measurements", "idle", True),
                              ("one core busy, fresh measurements", "busy_fresh", p["fresh_equal"]),
                              ("one core busy, idle run's cache", "busy_cached", p["cached_equal"])]:
            plan = p[key]
            cells = [f"{plan[c]['patch']}, {plan[c]['batch']}, {plan[c]['width']}" if c in plan else "–"
                     for c in ("2d", "3d_fullres")]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {', '.join(plan['recommended'])} | "
                         f"{p['seconds'][key]:.1f} | {'yes' if eq else '**no**'} |")
        lines += ["", f"Step time measured with one core busy ÷ idle (one thread's CPU time, {len(r)} steps): "
                  f"min {min(r):.2f}, median {sorted(r)[len(r) // 2]:.2f}, max {max(r):.2f}. The test "
                  "`tests/test_budget_plans.py` checks the same on a synthetic fingerprint.", ""]
    f = _load(OUT / "fill.json")
    runs = (f or {}).get("runs", []) + [r["schedule"] for r in (d or {}).get("runs", []) if r.get("schedule")]
    if runs:
        lines += ["### Budget fill: planned vs actual", "", "| run | budget min | planned epochs × it. (min) | "
                  "actual epochs, steps | actual min | budget used | final lr ÷ initial |", "|---|---|---|---|---|---|---|"]
        for r in runs:
            pl, ac = r.get("planned") or {}, r.get("actual") or {}
            lr = ac.get("final_lr_fraction") or ac.get("final_lr")
            lines.append(f"| `{Path(r['run']).parent.parent.name}/{Path(r['run']).parent.name}` | "
                         f"{_f(r.get('budget_min'), 1)} | {pl.get('epochs', '–')} × {pl.get('iterations_per_epoch', '–')}"
                         f" ({_f(pl.get('minutes'), 2)}) | {ac.get('epochs', '–')}, {ac.get('steps', '–')} | "
                         f"{_f(ac.get('minutes'), 2)} | {_f(100 * ac['budget_used'] if ac.get('budget_used') else None, 0)}%"
                         f" | {_f(lr, 4)} |")
        lines.append("")
    backend_files = sorted((ROOT / "docs" / "benchmarks" / "cpu_backends").rglob("hippocampus.json"))
    if backend_files:
        lines += ["### CPU inference backends", ""]
    for b in map(_load, backend_files):
        m = b.get("model") or {}
        model = (f" Model: {m['config']}, patch {'×'.join(map(str, m['patch']))}, features {m['features']}."
                 if m else " Model: 3d_fullres of a 5-minute hippocampus plan (width 8).")
        lines += [f"`{b.get('command', 'benchmarks/cpu_backends.py')}`: "
                  f"{len(b['cases'])} held-out fold-0 hippocampus cases, whole `predict_folder` per case, medians "
                  f"of {b['repeats']} repeats, {b.get('torch_threads', '?')} threads.{model}", "",
                  "| variant | s/case | speedup vs torch (no mirroring) | Dice fg | Dice − torch's "
                  "| labels equal to torch's |",
                  "|---|---|---|---|---|---|"]
        for r in b["rows"]:
            lines.append(f"| {r['variant']} | {r['s_per_case']:.2f} | {r['speedup_vs_torch']:.2f}× | {r['dice_fg']:.4f}"
                         f" | {r['dice_vs_torch']:+.4f} | {100 * r['label_agreement_vs_torch']:.2f}% |")
        sbs = _load(ROOT / "docs" / "benchmarks" / "side_by_side" / "results.json")
        torch_s = next((r["s_per_case"] for r in b["rows"] if r["backend"] == "torch" and not r["mirroring"]), None)
        if sbs and torch_s:  # nnU-Net v2's own predictor, from the side-by-side harness (its own 30-min model)
            for mode in ("mirroring", "no_mirroring"):
                n = (sbs.get("inference", {}).get(mode) or {}).get("nnunet")
                if n:
                    lines.append(f"| nnU-Net v2 predictor, {'mirroring' if mode == 'mirroring' else 'no mirroring'}"
                                 f" (side_by_side.py, {sbs['inference']['cases']} cases, its own model) | "
                                 f"{n['s_per_case']['median']:.2f} | {torch_s / n['s_per_case']['median']:.2f}× | "
                                 f"{n['scores']['mean_fg_dice']:.4f} | | |")
        lines.append("")
    s = _load(ROOT / "docs" / "benchmarks" / "scaling" / "results.json")
    if s:
        lines += ["### Large volumes: predict (no mirroring) and preprocess vs size", "",
                  "`python benchmarks/scaling.py --model WORK --baseline-rev HEAD --nnunet-venv bench/nnunet-venv` "
                  "(spleen-CT-based volumes; peak = largest PSS sum over the process tree).", "",
                  "![scaling](benchmarks/scaling/scaling.png)", "",
                  "| size | voxels | medseg predict s / peak GB | before s / GB | nnU-Net v2 s / GB "
                  "| labels equal to before | preprocess s / GB |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in s["sizes"].items():
            def cell(part: dict | None) -> str:
                return "–" if not part else f"{part['wall_s']:.0f} / {part['peak_mb'] / 1024:.2f}"
            def cell_pre(part: dict | None) -> str:
                return "–" if not part else f"{part['time_s']:.1f} / {part['peak_mb'] / 1024:.2f}"
            pre = r.get("preprocess")
            lines.append(f"| {name} | {r['voxels'] / 1e6:.1f} M | {cell(r.get('predict'))} | {cell(r.get('baseline'))} | "
                         f"{cell(r.get('nnunet'))} | {r.get('labels_equal', '–')} | "
                         f"{cell_pre(pre)} |")
        lines.append("")
    prof = _load(OUT / "profile.json")
    if prof:
        lines += ["### Where a CPU training step goes", "",
                  f"`{prof.get('command', 'benchmarks/profile_step.py')}`: {prof['config']}, patch "
                  f"{'×'.join(map(str, prof['patch']))}, batch {prof['batch']}, features {prof['features']}, "
                  f"{prof['threads']} threads, {prof['workers']} augmentation worker(s), medians of {prof['steps']} "
                  f"iterations (iteration {prof['phases_median_s']['iteration']:.3f} s).", "",
                  "| phase | median s | share |", "|---|---|---|"]
        lines += [f"| {k} | {prof['phases_median_s'][k]:.4f} | {100 * v:.1f}% |" for k, v in prof["phases_share"].items()]
        lines += ["", "| operator family (torch.profiler, self CPU time) | share |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in prof["operator_share"].items()]
        lines.append("")
    lines.append(END)
    block = "\n".join(lines)
    text = DOC.read_text()
    text = (text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):] if BEGIN in text
            else text.rstrip("\n") + "\n\n" + block + "\n")
    DOC.write_text(text)
    print(f"rendered {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("demo")
    a.add_argument("--runs", type=int, default=3)
    a.add_argument("--keep", action="store_true", help="keep each clone's venv")
    a = sub.add_parser("plan-load")
    a.add_argument("work", type=Path)
    a.add_argument("--minutes", type=float, default=30)
    a = sub.add_parser("profile", help="record benchmarks/profile_step.py's JSON (read from a file)")
    a.add_argument("json", type=Path)
    a.add_argument("--profile-command", default="python benchmarks/profile_step.py WORK --steps 20")
    a = sub.add_parser("fill")
    a.add_argument("works", type=Path, nargs="+")
    sub.add_parser("render")
    args = ap.parse_args()
    {"demo": demo, "plan-load": plan_load, "fill": fill, "render": render, "profile": profile}[args.cmd](args)


if __name__ == "__main__":
    main()
