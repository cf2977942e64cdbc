"""``medseg report``: one self-contained HTML page per work directory, opened in a real browser
(Debian's chromium, headless): every image decodes, the main tables are there, and a screenshot is
taken. Without chromium the browser part skips, unless MEDSEG_REQUIRE_BROWSER is set (CI sets it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch
from test_training import _tiny_plan

from medseg.orchestration.crossval import train_and_validate
from medseg.orchestration.report import write_report


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("MEDSEG_REQUIRE_BROWSER"):
        pytest.fail("MEDSEG_REQUIRE_BROWSER is set but chromium is not installed")
    return found


def _headless(chromium: str, tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=180)


def test_the_report_is_one_offline_page_whose_images_all_load_in_a_browser(msd_dataset, tmp_path):
    torch.set_num_threads(1)
    work = tmp_path / "work"
    _tiny_plan(msd_dataset, work)
    train_and_validate(work, "3d_fullres", 0, epochs=2, num_workers=0)
    page = write_report(work)
    text = page.read_text()
    assert page == work / "report.html"
    for table in ("dataset-geometry", "dataset-intensities", "plans", "cross-validation"):
        assert f'id="{table}"' in text, table
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    # dataset, training curves, per-case plot, overlays of the worst and the best case (here one case, twice)
    assert len(images) >= 5 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in text and "https://" not in text  # opens offline
    assert "Worst cases:" in text

    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    dom = _headless(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)"', dom.stdout)
    total = re.search(r'data-images-total="(\d+)"', dom.stdout)
    assert loaded and total, dom.stdout[:500]
    assert int(loaded.group(1)) == int(total.group(1)) == len(images)
    assert all(f'id="{t}"' in dom.stdout for t in ("plans", "cross-validation"))
    shot = tmp_path / "report.png"
    result = _headless(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    assert result.returncode == 0 and shot.exists() and shot.stat().st_size > 20000, result.stderr[-2000:]
    if os.environ.get("MEDSEG_REPORT_SCREENSHOT"):  # to refresh the README's picture
        shutil.copy(shot, os.environ["MEDSEG_REPORT_SCREENSHOT"])
