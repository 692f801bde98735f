"""The pure parts of `softcache fidelity`: reconstruction, per-row figures, ECE, the frontier; and
the plots' missing-matplotlib error."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from softcache.tools.fidelity import (
    expected_calibration_error,
    reconstruct_topk,
    row_figures,
    sampled_log_probs,
    topk_tail,
)
from softcache.tools.plots import PlotError, pyplot
from softcache.tools.sweep import Candidate, compressed_bytes, frontier


def test_top_k_reconstruction_spreads_the_tail_evenly() -> None:
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    ids = torch.tensor([[0, 1]])
    log_kept = p.log()[:, :2]
    q = reconstruct_topk(log_kept, ids, topk_tail(log_kept), 4).exp()
    assert q.tolist()[0] == pytest.approx([0.5, 0.3, 0.1, 0.1], abs=1e-6)
    kept = torch.zeros(1, 4, dtype=torch.bool).scatter_(1, ids, True)
    f = row_figures(p.log(), (q.log(), kept))
    want = 0.15 * math.log(0.15 / 0.1) + 0.05 * math.log(0.05 / 0.1)
    assert f.kl[0] == pytest.approx(want, rel=1e-5)
    assert f.kept[0] == pytest.approx(0.8) and bool(f.agree[0])


def test_every_class_kept_is_exact() -> None:
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    log_p = torch.log_softmax(logits, dim=1)
    ids = torch.arange(6).repeat(5, 1)
    q = reconstruct_topk(log_p, ids, torch.full((5,), -math.inf), 6)
    assert torch.allclose(q, log_p, atol=1e-6)


def test_sampled_rows_are_draw_frequencies_and_infinite_kl() -> None:
    ids = torch.tensor([[2, 0, 0]])
    counts = torch.tensor([[3, 1, 0]])  # the last entry is padding
    log_q, kept = sampled_log_probs(ids, counts, 4)
    assert log_q.exp().tolist()[0] == pytest.approx([0.25, 0.0, 0.75, 0.0])
    assert kept.tolist()[0] == [True, False, True, False]
    f = row_figures(torch.full((1, 4), math.log(0.25)), (log_q, kept))
    assert math.isinf(f.kl[0]) and f.kept[0] == pytest.approx(0.5)


def test_ece_by_hand() -> None:
    conf = np.array([0.95, 0.95, 0.55, 0.52, 1.0])
    correct = np.array([True, False, True, True, True])
    # bins (of 15): [0.9333, 1] holds 0.95, 0.95, 1.0 (acc 2/3, conf 0.9667); [0.5333, 0.6)
    # holds 0.55 (acc 1); [0.4667, 0.5333) holds 0.52 (acc 1).
    want = 3 / 5 * abs(2 / 3 - 2.9 / 3) + 1 / 5 * 0.45 + 1 / 5 * 0.48
    assert expected_calibration_error(conf, correct) == pytest.approx(want)
    assert expected_calibration_error(np.array([]), np.array([], dtype=bool)) == 0.0


def test_frontier_keeps_what_nothing_beats() -> None:
    def c(label: str, b: float, kl: float | None) -> Candidate:
        return Candidate(label, {}, b, kl, 1.0, 1.0)

    cands = [c("a", 10, 0.5), c("b", 12, 0.6), c("c", 20, 0.1), c("d", 30, 0.1), c("s", 5, None)]
    assert [x.label for x in frontier(cands)] == ["a", "c"]


def test_compressed_bytes_counts_chunks_and_checksums() -> None:
    zeros = np.zeros((2048, 10), dtype=np.float16)
    assert compressed_bytes(zeros) < 200  # two chunks of zeros compress to almost nothing
    noise = np.random.default_rng(0).integers(0, 2**63, size=1000, dtype=np.uint64)
    assert compressed_bytes(noise) >= 8000 + 4


def test_plots_without_matplotlib_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotError, match=r"pip install 'softcache\[plot\]'"):
        pyplot()
