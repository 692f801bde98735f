"""pipelines.textlm.fidelity: the held-out figures of a stored LM encoding, on tiny real stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.textlm.fidelity import measure
from softcache.builder import build as build_tokens
from softcache.config import BuildConfig
from softcache.store import LogitStore
from tests.helpers import lm_train_specs as ls
from tests.helpers import token_specs as ts

SPECS = "tests.helpers.token_specs"


def _store(tmp_path: Path, **encoding) -> LogitStore:
    config = BuildConfig(
        teacher=f"{SPECS}:causal_teacher",
        dataset=f"{SPECS}:ragged_dataset",
        output=str(tmp_path / "s.zarr"),
        lm=True,
        device="cpu",
        shard_rows=64,
        **encoding,
    )
    build_tokens(config, progress=False)
    return LogitStore.open(config.output)


def _student() -> torch.nn.Module:
    return ls.causal_student().eval()


def test_every_token_kept_reconstructs_the_teacher(in_root: Path, tmp_path: Path) -> None:
    store = _store(tmp_path, encoding="topk", top_k=ts.VOCAB, dtype="float16")
    f = measure(store, ts.causal_teacher(), ts.ragged_dataset(), _student())
    assert f["kl_reconstructed"] == pytest.approx(0.0, abs=1e-3)  # float16 rounding only
    assert f["loss_over_kl"] == pytest.approx(1.0, abs=1e-2)


def test_a_small_top_k_loses_the_tail_and_underestimates_the_kl(
    in_root: Path, tmp_path: Path
) -> None:
    store = _store(tmp_path, encoding="topk", top_k=4)
    f = measure(store, ts.causal_teacher(), ts.ragged_dataset(), _student())
    assert f["kl_reconstructed"] > 0.05
    assert f["loss_over_kl"] < 0.99
    assert f["kl_bins_quant"] == pytest.approx(0.0, abs=1e-3)  # float16 values: no quantisation


def test_sampled_loss_is_the_kl_within_its_error(in_root: Path, tmp_path: Path) -> None:
    store = _store(tmp_path, encoding="sampled", draws=64)
    f = measure(store, ts.causal_teacher(), ts.ragged_dataset(), _student())
    assert f["kl_reconstructed"] is None
    assert abs(f["loss_over_kl"] - 1.0) < 4 * f["loss_se"] + 1e-3
