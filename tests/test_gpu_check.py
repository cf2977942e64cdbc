"""``benchmarks/gpu_check.sh --device cpu --tiny``: the prepared GPU check runs on a CPU, every
section passes or says why it was skipped, and it needs none of SimpleITK, pydicom and highdicom
(the GPU machine has none of them): they are made unimportable for the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO_ROOT

from medseg.networks.variants import VARIANTS

BLOCKED = ("SimpleITK", "pydicom", "highdicom")
SECTIONS = ["variants", "resume", "ddp", "memory", "predict", "throughput"]


def _blocking_env(tmp_path) -> dict[str, str]:
    block = tmp_path / "block"
    block.mkdir()
    for name in BLOCKED:
        (block / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = dict(os.environ, PYTHON=sys.executable)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(block), env.get("PYTHONPATH")) if p)
    return env


def test_the_tiny_cpu_gpu_check_passes_without_simpleitk_pydicom_highdicom(tmp_path):
    env = _blocking_env(tmp_path)
    for name in BLOCKED:  # the block works: none of the three imports in this environment
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert probe.returncode != 0 and "not on the GPU machine" in probe.stderr

    results = tmp_path / "results"
    proc = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(results), "--device", "cpu",
                           "--tiny"], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = json.loads((results / "gpu_check.json").read_text())
    sections = report["sections"]
    summary = {k: v["status"] + (f" ({v.get('reason') or v.get('error')})" if v["status"] != "passed" else "")
               for k, v in sections.items()}
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert list(sections) == SECTIONS
    for name, rec in sections.items():
        assert rec["status"] == "passed" or (rec["status"] == "skipped" and rec["reason"]), (name, rec)
    assert report["environment"]["device"] == "cpu" and report["tiny"]

    # the figures are the sections' own: every registered variant trained, resume is exact on a CPU
    assert set(sections["variants"]["variants"]) == set(VARIANTS)
    assert all(v["max_weight_change"] > 0 for v in sections["variants"]["variants"].values())
    assert sections["resume"]["bit_identical"] and sections["resume"]["max_abs_diff_resumed"] == 0.0
    assert sections["ddp"]["status"] == "skipped"
    assert len(sections["memory"]["rows"]) == 3
    assert all(r["measured_bytes"] > 0 and r["estimate_bytes"] > 0 for r in sections["memory"]["rows"])
    assert sections["predict"]["cases"] == 4 and sections["predict"]["fraction_differing"] == 0.0
    assert sections["throughput"]["samples_per_s"] > 0
    assert "sections passed or skipped" in proc.stdout


def test_a_malformed_device_is_refused_in_one_line_before_anything_runs(tmp_path):
    proc = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "r"), "--device",
                           "cuda:x"], env=_blocking_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check: --device cuda:x: expected cpu, cuda or cuda:N (or auto)"
    assert not (tmp_path / "r" / "gpu_check.json").exists()
