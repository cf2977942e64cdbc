"""Model selection, postprocessing and QC on synthetic out-of-fold predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medseg.inference.postprocessing import apply_postprocessing, keep_largest_foreground, keep_largest_per_class
from medseg.inference.probabilities import load_probabilities, load_qc_score, save_probabilities
from medseg.inference.uncertainty import entropy_map, qc_score, spearman
from medseg.orchestration.selection import choose, decide_postprocessing, qc_figures, select_model

LABELS = {0: "background", 1: "a", 2: "b"}


class MemorySource:
    """Out-of-fold predictions held in memory: ``probs[key][case]`` (K, X, Y, Z), ``refs[case]``."""

    def __init__(self, probs: dict, refs: dict, scores: dict | None = None) -> None:
        self.probs, self.refs, self.scores = probs, refs, scores or {}

    @property
    def case_ids(self) -> list[str]:
        return sorted(self.refs)

    def probabilities(self, key: str, case_id: str) -> np.ndarray:
        return self.probs[key][case_id]

    def qc_score(self, key: str, case_id: str) -> float:
        return self.scores.get(key, {}).get(case_id, qc_score(self.probs[key][case_id]))

    def reference(self, case_id: str):
        return self.refs[case_id], (1.0, 1.0, 1.0)


def _probs_from(seg: np.ndarray, confidence: float = 0.9, k: int = 3) -> np.ndarray:
    p = np.full((k, *seg.shape), (1 - confidence) / (k - 1), dtype=np.float32)
    for c in range(k):
        p[c][seg == c] = confidence
    return p


def _reference(shape=(24, 24, 24)) -> np.ndarray:
    ref = np.zeros(shape, np.int16)
    ref[4:14, 4:14, 4:14] = 1
    ref[14:20, 14:20, 14:20] = 2
    return ref


def test_ensemble_wins_when_members_err_in_different_places():
    """A misses the left half of class 1 (weakly), B the right half: the softmax mean is right everywhere."""
    refs, probs = {}, {"A": {}, "B": {}}
    for i in range(4):
        ref = _reference()
        refs[f"c{i}"] = ref
        for key, half in (("A", slice(4, 9)), ("B", slice(9, 14))):
            p = _probs_from(ref)
            region = np.zeros(ref.shape, bool)
            region[half, 4:14, 4:14] = True
            p[:, region] = np.array([0.55, 0.4, 0.05], np.float32)[:, None]  # background wins narrowly
            probs[key][f"c{i}"] = p
    sel = select_model(MemorySource(probs, refs), ["A", "B"], LABELS)
    table = sel.table.set_index("candidate")
    assert sel.best == ("A", "B")
    assert table.loc["A + B", "dice_fg"] == pytest.approx(1.0)
    assert table.loc["A", "dice_fg"] < 0.85 and table.loc["B", "dice_fg"] < 0.85


def test_ties_go_to_the_simpler_candidate():
    table = pd.DataFrame([{"candidate": "A", "members": 1, "order": 0, "dice_fg": 0.90001},
                          {"candidate": "B", "members": 1, "order": 1, "dice_fg": 0.90002},
                          {"candidate": "A + B", "members": 2, "order": 2, "dice_fg": 0.90003}])
    assert choose(table) == "A"  # equal at 4 decimals: fewer members, then plans order
    table.loc[2, "dice_fg"] = 0.9010
    assert choose(table) == "A + B"


def test_postprocessing_rejected_when_the_structure_really_has_two_components():
    """Class 1 is two separate blobs in the reference and the prediction is exact: keeping the
    largest component would delete a true blob, so neither option may be chosen."""
    refs, probs = {}, {"A": {}}
    for i in range(3):
        ref = np.zeros((24, 24, 24), np.int16)
        ref[2:8, 2:8, 2:8] = 1
        ref[14:22, 14:22, 14:22] = 1
        ref[2:6, 16:22, 2:6] = 2
        refs[f"c{i}"] = ref
        probs["A"][f"c{i}"] = _probs_from(ref)
    sel = select_model(MemorySource(probs, refs), ["A"], LABELS)
    assert not sel.postprocessing.foreground and sel.postprocessing.classes == []
    assert sel.pp_figures["dice_after"] == sel.pp_figures["dice_before"]


def test_postprocessing_accepted_when_it_removes_false_positives():
    refs, probs = {}, {"A": {}}
    for i in range(3):
        ref = _reference()
        refs[f"c{i}"] = ref
        pred = ref.copy()
        pred[0:2, 20:23, 0:2] = 1  # a stray blob of class 1 far from everything
        probs["A"][f"c{i}"] = _probs_from(pred)
    sel = select_model(MemorySource(probs, refs), ["A"], LABELS)
    assert sel.postprocessing.foreground
    after, before = sel.pp_figures["dice_after"], sel.pp_figures["dice_before"]
    assert after[1] > before[1] and after[2] == pytest.approx(before[2])


def test_decide_postprocessing_rejects_foreground_step_that_hurts_a_class():
    per_case = pd.DataFrame({"case": ["x", "y"], "none_1": [0.8, 0.8], "fg_1": [0.9, 0.9], "cls_1": [0.8, 0.8],
                             "fgcls_1": [0.9, 0.9], "none_2": [0.7, 0.7], "fg_2": [0.69, 0.69],
                             "cls_2": [0.72, 0.72], "fgcls_2": [0.6, 0.6]})
    pp, fig = decide_postprocessing(per_case, [1, 2])
    assert not pp.foreground  # the mean improves but class 2 gets worse
    assert pp.classes == [2]  # class 2's own largest component helps it
    assert fig["dice_after"] == {1: pytest.approx(0.8), 2: pytest.approx(0.72)}


def test_largest_component_helpers():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[1:4, 1:4, 1:4] = 1
    seg[4:6, 1:4, 1:4] = 2  # touches class 1: one foreground component
    seg[8:10, 8:10, 8:10] = 1  # separate
    fg = keep_largest_foreground(seg)
    assert (fg[8:, 8:, 8:] == 0).all() and (fg[1:6, 1:4, 1:4] == seg[1:6, 1:4, 1:4]).all()
    per = keep_largest_per_class(seg, [1])
    assert (per[8:, 8:, 8:] == 0).all() and (per == 2).sum() == (seg == 2).sum()
    assert np.array_equal(apply_postprocessing(seg, {"foreground": False, "classes": []}), seg)


def test_qc_score_ranks_uncertain_cases_and_flags_the_worst():
    rng = np.random.default_rng(0)
    scores = rng.random(50)
    dice = 1.0 - scores + 0.05 * rng.standard_normal(50)
    threshold, rho, flagged, n_worst = qc_figures(scores, dice)
    assert rho < -0.8 and n_worst == 5 and flagged >= 3
    assert threshold == pytest.approx(np.quantile(scores, 0.9))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_entropy_and_qc_score():
    certain = _probs_from(_reference(), confidence=1.0)
    unsure = _probs_from(_reference(), confidence=0.5)
    assert entropy_map(certain).max() == pytest.approx(0.0, abs=1e-5)
    assert qc_score(unsure) > qc_score(certain)
    empty = _probs_from(np.zeros((4, 4, 4), np.int16))
    assert qc_score(empty) == 1.0


def test_probabilities_round_trip(tmp_path):
    probs = _probs_from(_reference())
    probs[:, :2] = 0
    probs[0, :2] = 1
    save_probabilities(tmp_path / "c.npz", probs, [[2, 24], [0, 24], [0, 24]], qc_score=0.25)
    back = load_probabilities(tmp_path / "c.npz")
    assert back.shape == probs.shape and np.abs(back - probs).max() < 1e-3
    assert load_qc_score(tmp_path / "c.npz") == pytest.approx(0.25)
