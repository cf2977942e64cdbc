"""End to end on real data: the bundled hippocampus demo (plan → train → predict → evaluate) with a
tiny CPU budget must clearly beat trivial predictions on the held-out cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_medseg

from medseg.demo import DEMO_DATASET
from medseg.evaluation.metrics import confusion, dice
from medseg.io.image import read_image


def _random_baseline_dice() -> float:
    """Mean foreground Dice of uniformly random labels {0,1,2} on the held-out cases."""
    rng = np.random.default_rng(0)
    scores = []
    for path in sorted((DEMO_DATASET / "labelsTs").glob("*.nii.gz")):
        ref = np.rint(read_image(path)[0][0]).astype(int)
        pred = rng.integers(0, 3, ref.shape)
        scores += [dice(*confusion(pred == k, ref == k)) for k in (1, 2)]
    return float(np.mean(scores))


@pytest.mark.slow
def test_demo_beats_all_background_and_random(tmp_path):
    out = tmp_path / "demo"
    result = run_medseg("demo", "-o", str(out), "--minutes", "3", timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["n_cases"] == 4
    fg = summary["foreground_mean"]["dice"]
    baseline = _random_baseline_dice()
    assert baseline < 0.15
    # all-background scores Dice 0; random labels score `baseline`
    assert fg > max(0.5, baseline + 0.3), f"demo Dice {fg:.3f} vs random {baseline:.3f}"
    assert (out / "report" / "metrics.png").stat().st_size > 0
    plans = json.loads((out / "model" / "plans.json").read_text())
    chosen = plans["recommended"][0]  # the plan's choice for the 3-minute budget
    run = out / "model" / "runs" / chosen / "fold_full"
    assert (run / "curves.png").exists()
    schedule = json.loads((run / "run.json").read_text())["schedule"]
    assert schedule["actual"]["budget_used"] == pytest.approx(1.0, abs=0.1)  # the budget filled, not cut short
    # a second run reuses everything and predicts nothing new
    again = run_medseg("demo", "-o", str(out), "--minutes", "3", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
