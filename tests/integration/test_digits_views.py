"""The digits views experiment end to end in its quick mode: every mode trains and is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.digits.views import AUGMENT, VIEWS, modes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_views_experiment_reports_every_mode(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pipelines.digits.views", "--quick", "--seeds", "1"]
    proc = subprocess.run(
        [*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["seeds"] == [0]
    figures = results["modes"]
    assert list(figures) == [mode.name for mode in modes(tmp_path, AUGMENT)]
    for name, mode in figures.items():
        assert len(mode["eval_accuracy"]) == 1, name
        assert all(0.0 <= a <= 1.0 for a in mode["eval_accuracy"]), name
        assert 0.0 <= mode["teacher_agreement_mean"] <= 1.0, name
    stored = [figures[f"offline V={v}"]["store_bytes_per_sample"] for v in VIEWS]
    assert VIEWS == (1, 4, 16) and stored[0] < stored[1] < stored[2], stored
    assert "offline V=16" in proc.stdout  # the table is printed
