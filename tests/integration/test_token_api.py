"""The Python API over token stores: `AlignedTokenBatches`, `token_distillation_loss` and
`TokenTargets`, on real top-k and sampled stores of the tiny causal teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import softcache
from softcache.errors import DatasetMismatchError
from softcache.losses.tokens import teacher_bins
from softcache.store import LogitStore, decode_token_rows
from softcache.trainer.tokens import token_kd_loss
from tests.helpers import ROOT
from tests.helpers import token_specs as data


@pytest.fixture(scope="module", params=["topk", "sampled"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("token_api") / f"{request.param}.zarr"
    extra = {"top_k": 8} if request.param == "topk" else {"draws": 12}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        softcache.build(
            softcache.BuildConfig(
                teacher="tests.helpers.token_specs:causal_teacher",
                dataset="tests.helpers.token_specs:ragged_dataset",
                output=str(out), lm=True, encoding=request.param, shard_rows=16,
                batch_size=3, device="cpu", **extra,
            ),
            progress=False,
        )  # fmt: skip
    return out


def _direct(store: LogitStore, i: int) -> dict[str, torch.Tensor]:
    offsets = store.offsets()
    return decode_token_rows(store.read_rows(offsets[i], offsets[i + 1]), store.meta)


def test_aligned_token_batches_cover_the_epoch_with_the_stores_rows(store: Path) -> None:
    opened = softcache.open_store(str(store))
    dataset = data.ragged_dataset()
    aligned = softcache.AlignedTokenBatches(dataset, opened)
    plan = softcache.EpochPlan(
        num_samples=len(dataset), block_rows=aligned.block_rows(4), batch_size=4, seed=3
    )
    seen: list[int] = []
    student = data.causal_teacher()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    for inputs, targets in aligned.epoch(plan):
        seen += targets.indices.tolist()
        expected = [_direct(opened, int(i)) for i in targets.indices]
        decoded = {name: torch.cat([e[name] for e in expected]) for name in expected[0]}
        for name, tensor in decoded.items():
            torch.testing.assert_close(targets.fields[name], tensor)
        codec = opened.meta.codec
        if codec.encoding == "topk":  # the loader's teacher bins are the loss's own
            probs, neg_entropy = teacher_bins(decoded["values"], decoded["residual"])
            torch.testing.assert_close(targets.fields["probs"], probs)
            torch.testing.assert_close(targets.fields["neg_entropy"], neg_entropy)
        assert set(targets.fields) - set(decoded) <= {"probs", "neg_entropy"}
        logits = student(inputs.input_ids)
        loss = softcache.token_distillation_loss(logits, inputs, targets, codec)
        if inputs.num_tokens:
            rows = logits[inputs.attention_mask]
            torch.testing.assert_close(loss, token_kd_loss(rows, targets.fields, codec))
            # ... and the loss from the loader's bins is the loss from the rows alone
            torch.testing.assert_close(loss, token_kd_loss(rows, decoded, codec))
        mixed = softcache.token_distillation_loss(
            logits, inputs, targets, opened.meta.codec, alpha=0.5
        )
        assert bool(torch.isfinite(mixed))
    assert len(seen) == aligned.steps(plan) * 4 and len(set(seen)) == len(seen)


def test_a_changed_sample_stops_the_epoch_naming_it(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTCACHE_TEST_LM_VARIANT", "token")
    dataset = data.ragged_dataset()
    opened = softcache.open_store(str(store))
    aligned = softcache.AlignedTokenBatches(dataset, opened)
    plan = softcache.EpochPlan(
        num_samples=len(dataset), block_rows=aligned.block_rows(4), batch_size=4, seed=0
    )
    with pytest.raises(DatasetMismatchError, match=f"sample {data.CHANGED_SAMPLE} "):
        for _ in aligned.epoch(plan):
            pass
    with pytest.raises(DatasetMismatchError, match="hash"):
        softcache.TokenTargets(opened).check(
            data.CHANGED_SAMPLE, data.sequences()[data.CHANGED_SAMPLE]
        )


def test_token_targets_read_any_sample_through_a_small_cache(store: Path) -> None:
    opened = softcache.open_store(str(store))
    targets = softcache.TokenTargets(str(store), cache_shards=1)
    order = np.random.default_rng(0).permutation(len(targets))
    for i in order:
        rows = targets.rows(int(i))
        for name, tensor in _direct(opened, int(i)).items():
            torch.testing.assert_close(rows[name], tensor)
        targets.check(int(i), data.sequences()[int(i)])
    assert len(targets._cache) == 1


def test_aligned_batches_points_token_stores_to_the_token_api(store: Path) -> None:
    with pytest.raises(softcache.SoftcacheError, match="AlignedTokenBatches"):
        softcache.AlignedBatches(data.ragged_dataset(), softcache.open_store(str(store)))


def test_a_token_stream_takes_no_row_targets(store: Path) -> None:
    from softcache.trainer.stream import SoftLabelStream

    with pytest.raises(ValueError, match="is a token store; only a row store's batches carry"):
        SoftLabelStream(LogitStore.open(str(store)), targets=lambda soft: None)
