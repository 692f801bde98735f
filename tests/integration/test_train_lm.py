"""`softcache train --lm` end to end on tiny per-token stores built by `softcache build --lm`.

Covered: offline KD from topk and sampled stores moves the student towards the teacher (its KL to
the teacher, measured here independently of the trainer, falls well below an untrained student's);
the hard and online baselines; ``--max-steps``; resume to bitwise the same weights, and refusing
a checkpoint made with other settings; the refusals (a per-token store without ``--lm``, a row
store with it, a dataset or eval store the store was not built from); the token stream handing
out exactly each sample's rows; and the alignment in training: with the known next-token
teacher, KD alone teaches the next-token rule, which a stream shifted by one row would not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from softcache.cli import main
from softcache.config import TrainConfig
from softcache.errors import DatasetMismatchError
from softcache.store import LogitStore
from softcache.trainer import checkpoint as lm_train
from softcache.trainer import train
from softcache.trainer.checkpoint import CHECKPOINT, METRICS
from softcache.trainer.plan import EpochPlan
from softcache.trainer.stream import SoftLabelStream
from softcache.trainer.token_labels import (
    BLOCK_TOKENS,
    TokenBlocks,
    block_samples_for,
    decode_with_bins,
)
from tests.helpers import lm_train_specs as ls
from tests.helpers import one_line_error, snapshot
from tests.helpers import token_specs as ts

ROOT = Path(__file__).resolve().parents[2]
SPECS = "tests.helpers.token_specs"
STUDENTS = "tests.helpers.lm_train_specs"
RAGGED = f"{SPECS}:ragged_dataset"
TEACHER = f"{SPECS}:causal_teacher"
NEXT_DATA = f"{SPECS}:next_token_dataset"
NEXT_TEACHER = f"{SPECS}:next_token_teacher"
SHARD_ROWS = 16  # 358 tokens in 23 shards: about 2 samples per plan block, so many blocks
TOTAL = int(ts.lengths().sum())
BATCH = 4
STEPS_PER_EPOCH = -(-ts.NUM_SEQUENCES // BATCH)  # every sample once per epoch, empty ones too
FAST = ("--batch-size", str(BATCH), "--lr", "5e-2")

# Documented in `softcache.trainer.loop.train` (per epoch) and the CLI's summary.
PER_EPOCH_KEYS = (
    "train_loss",
    "eval_perplexity",
    "eval_bits_per_token",
    "eval_accuracy",
    "teacher_agreement",
    "eval_kl_to_teacher",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Read-only per-token stores: `topk` (k = 8) and `sampled` (12 draws) of `causal_teacher` on
    the ragged dataset, and `next` (topk, k = 4) of `next_token_teacher` on its dataset."""
    base = tmp_path_factory.mktemp("lm_stores")
    builds = {
        "topk": ("causal_teacher", "ragged_dataset", "--encoding", "topk", "--top-k", "8"),
        "sampled": ("causal_teacher", "ragged_dataset", "--encoding", "sampled", "--draws", "12"),
        "next": ("next_token_teacher", "next_token_dataset", "--encoding", "topk", "--top-k", "4"),
    }
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.delenv("SOFTCACHE_TEST_LM_VARIANT", raising=False)
        mp.delenv("SOFTCACHE_TEST_LM_SLEEP", raising=False)
        for name, (teacher, dataset, *extra) in builds.items():
            path = base / f"{name}.zarr"
            args = [
                "build", "--lm", "--teacher", f"{SPECS}:{teacher}", "--dataset",
                f"{SPECS}:{dataset}", "-o", str(path), "--shard-rows", str(SHARD_ROWS),
                "--batch-size", "4", "--device", "cpu", "-q", *extra,
            ]  # fmt: skip
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            out[name] = str(path)
    return out


# ---- helpers --------------------------------------------------------------------------------------


def _args(
    out: Path,
    *extra: str,
    dataset: str = RAGGED,
    student: str = "causal_student",
    lm: bool = True,
) -> list[str]:
    return [
        "train", *(["--lm"] if lm else []), "--dataset", dataset,
        "--student", f"{STUDENTS}:{student}", "--device", "cpu", "--output", str(out),
        "--quiet", *extra,
    ]  # fmt: skip


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(main, args)


def _train(out: Path, *extra: str, **kwargs) -> dict:
    """Run `softcache train --lm ... --json`; return metrics.json (checked against the output)."""
    result = _invoke([*_args(out, *extra, **kwargs), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((out / METRICS).read_text())
    assert json.loads(result.output) == {k: v for k, v in metrics.items() if k != "config"}
    return metrics


def _trained(out: Path, factory) -> torch.nn.Module:
    """A fresh student from `factory` with the weights of the checkpoint in `out`."""
    student = factory()
    state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    student.load_state_dict(state["student"])
    return student.eval()


def _kl_to_teacher(student: torch.nn.Module) -> float:
    """Mean over the ragged dataset's real tokens of KL(teacher || student) at temperature 1:
    every sample run alone, so nothing of the trainer's batching is involved."""
    seqs = ts.sequences()
    log_p = torch.log_softmax(ts.reference_logits(ts.causal_teacher(), seqs), dim=1)
    log_q = torch.log_softmax(ts.reference_logits(student, seqs), dim=1)
    assert log_p.shape == (TOTAL, ts.VOCAB)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())


def _next_token_accuracy(student: torch.nn.Module) -> float:
    """Share of the next-token dataset's positions j < n - 1 where the student's top-1 is
    token j + 1."""
    hits, counted = 0, 0
    with torch.inference_mode():
        for ids in ts.next_token_sequences():
            if len(ids) < 2:
                continue
            pred = student(ids[None])[0].argmax(dim=1)
            hits += int((pred[:-1] == ids[1:]).sum())
            counted += len(ids) - 1
    return hits / counted


# ---- offline KD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["topk", "sampled"])
def test_offline_kd_moves_the_student_towards_the_teacher(
    in_root: Path, tmp_path: Path, stores: dict[str, str], encoding: str
) -> None:
    epochs = 4
    out = tmp_path / encoding
    metrics = _train(
        out,
        "--store", stores[encoding], "--teacher", TEACHER, "--eval-dataset", RAGGED,
        "--epochs", str(epochs), *FAST,
    )  # fmt: skip
    assert metrics["mode"] == "offline" and metrics["lm"] is True
    assert metrics["store_encoding"]["encoding"] == encoding
    store = LogitStore.open(stores[encoding])
    assert metrics["store_bytes_per_token"] == pytest.approx(store.nbytes_stored() / TOTAL)
    assert metrics["steps"] == epochs * STEPS_PER_EPOCH
    assert metrics["epoch"] == list(range(1, epochs + 1))
    for key in PER_EPOCH_KEYS:
        assert len(metrics[key]) == epochs, key
        assert all(v is not None and math.isfinite(v) for v in metrics[key]), key
    ppl, bits = metrics["eval_perplexity"][-1], metrics["eval_bits_per_token"][-1]
    assert ppl > 1 and bits == pytest.approx(math.log2(ppl))
    assert 0 <= metrics["eval_accuracy"][-1] <= 1

    # The KL to the teacher, computed here from the saved weights, is the one reported...
    trained = _kl_to_teacher(_trained(out, ls.causal_student))
    assert trained == pytest.approx(metrics["eval_kl_to_teacher"][-1], rel=1e-4)
    # ... and well below an untrained student's: the KD loss pulls towards the teacher.
    untrained = _kl_to_teacher(ls.causal_student().eval())
    assert trained < 0.7 * untrained, (trained, untrained)
    kl = metrics["eval_kl_to_teacher"]
    assert kl[-1] < kl[0] < untrained, kl
    assert metrics["teacher_agreement"][-1] > metrics["teacher_agreement"][0]
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]


def test_batches_of_empty_samples_train(
    in_root: Path, tmp_path: Path, stores: dict[str, str]
) -> None:
    """Batches of one sample: the empty samples make batches without a token (a zero loss)."""
    for encoding in ("topk", "sampled"):
        metrics = _train(
            tmp_path / encoding,
            "--store", stores[encoding], "--epochs", "1", "--batch-size", "1", "--alpha", "0.5",
        )  # fmt: skip
        assert metrics["steps"] == ts.NUM_SEQUENCES
        assert math.isfinite(metrics["train_loss"][0])


# ---- baselines ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hard", "online"])
def test_baseline_modes_train_without_a_store(in_root: Path, tmp_path: Path, mode: str) -> None:
    out = tmp_path / mode
    metrics = _train(
        out,
        "--mode", mode, "--teacher", TEACHER, "--eval-dataset", RAGGED, "--epochs", "3", *FAST,
    )  # fmt: skip
    assert metrics["mode"] == mode
    assert metrics["store_encoding"] is None and metrics["store_bytes_per_token"] is None
    assert metrics["steps"] == 3 * STEPS_PER_EPOCH
    for key in PER_EPOCH_KEYS:
        assert len(metrics[key]) == 3 and all(v is not None for v in metrics[key]), key
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    kl = _kl_to_teacher(_trained(out, ls.causal_student))
    assert kl == pytest.approx(metrics["eval_kl_to_teacher"][-1], rel=1e-4)
    if mode == "online":  # the full KL to the teacher in the loop
        assert kl < 0.75 * _kl_to_teacher(ls.causal_student().eval())


def test_online_needs_a_teacher(in_root: Path, tmp_path: Path) -> None:
    result = _invoke(_args(tmp_path / "o", "--mode", "online", "--epochs", "1"))
    one_line_error(result, "mode online runs the teacher in the loop: pass --teacher")
    assert not (tmp_path / "o" / CHECKPOINT).exists()


# ---- --max-steps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_steps", "epochs_run"), [(3, 1), (STEPS_PER_EPOCH + 3, 2), (STEPS_PER_EPOCH, 1)]
)
def test_max_steps_stops_after_exactly_that_many_steps(
    in_root: Path, tmp_path: Path, stores: dict[str, str], max_steps: int, epochs_run: int
) -> None:
    out = tmp_path / "m"
    metrics = _train(
        out, "--store", stores["topk"], "--epochs", "5", "--max-steps", str(max_steps), *FAST
    )
    assert metrics["steps"] == max_steps
    assert len(metrics["train_loss"]) == epochs_run  # an epoch cut short still reports
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert state["step"] == max_steps and state["plan"]["epoch"] == epochs_run


def test_max_steps_stops_a_row_run_too(in_root: Path, tmp_path: Path, make_store) -> None:
    """One trainer for both layouts: --max-steps is no longer an LM-only setting."""
    rows, _ = make_store("rows.zarr")
    result = _invoke(
        [
            "train", "--store", str(rows), "--student", "tests.helpers.specs:teacher",
            "--dataset", "tests.helpers.specs:dataset", "--epochs", "3", "--max-steps", "2",
            "--device", "cpu", "--output", str(tmp_path / "r"), "-q", "--json",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["steps"] == 2 and len(metrics["train_loss"]) == 1


# ---- resume ---------------------------------------------------------------------------------------


class _Killed(Exception):
    """Raised right after the first epoch's checkpoint: the run dies between two epochs."""


def test_resume_reaches_the_weights_of_an_uninterrupted_run(
    in_root: Path, tmp_path: Path, stores: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ("--store", stores["topk"], "--epochs", "2", "--eval-dataset", RAGGED, *FAST)
    full = _train(tmp_path / "full", *settings)

    part = tmp_path / "part"
    save = lm_train.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        if args[5]["epoch"] == 1:  # the epoch the checkpoint resumes at
            raise _Killed

    monkeypatch.setattr(lm_train, "save_checkpoint", save_then_die)
    result = _invoke(_args(part, *settings))
    assert isinstance(result.exception, _Killed), (result.output, result.exception)
    monkeypatch.setattr(lm_train, "save_checkpoint", save)
    state = torch.load(part / CHECKPOINT, weights_only=False)
    assert state["plan"]["epoch"] == 1 and state["step"] == STEPS_PER_EPOCH

    resumed = _train(part, *settings, "--resume")
    assert resumed["steps"] == full["steps"] == 2 * STEPS_PER_EPOCH
    want = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=False)
    got = torch.load(part / CHECKPOINT, weights_only=False)
    assert want["student"].keys() == got["student"].keys()
    for name, tensor in want["student"].items():
        assert torch.equal(tensor, got["student"][name]), name
    assert want["schedule"] == got["schedule"]
    for key in PER_EPOCH_KEYS:
        assert resumed[key] == full[key], key

    # Resuming a finished run trains nothing and changes nothing.
    before = snapshot(part)
    again = _train(part, *settings, "--resume")
    assert again["train_loss"] == full["train_loss"] and again["steps"] == full["steps"]
    assert snapshot(part).keys() == before.keys()
    assert (part / CHECKPOINT).read_bytes() == before[CHECKPOINT]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("--lr", "1e-2"), "lr: 0.05 -> 0.01"),
        (("--epochs", "3"), "epochs: 2 -> 3"),
        (("--mode", "hard"), "mode: 'offline' -> 'hard'"),
    ],
    ids=["lr", "epochs", "mode"],
)
def test_resume_with_other_settings_is_refused(
    in_root: Path, tmp_path: Path, stores: dict[str, str], change: tuple, named: str
) -> None:
    out = tmp_path / "r"
    settings = ["--store", stores["topk"], "--epochs", "2", "--max-steps", "2", *FAST]
    _train(out, *settings)
    before = snapshot(out)
    for i in range(0, len(change), 2):
        flag, value = change[i], change[i + 1]
        if flag in settings:
            settings[settings.index(flag) + 1] = value
        else:
            settings += [flag, value]
    result = _invoke(_args(out, *settings, "--resume"))
    one_line_error(result, "--resume", "other settings", named, "original settings")
    assert snapshot(out) == before


def test_resume_without_a_checkpoint_is_refused(
    in_root: Path, tmp_path: Path, stores: dict[str, str]
) -> None:
    result = _invoke(_args(tmp_path / "new", "--store", stores["topk"], "--resume", *FAST))
    one_line_error(result, "--resume: no checkpoint at", "drop --resume")


# ---- refusals -------------------------------------------------------------------------------------


def test_a_token_store_without_lm_is_refused(
    in_root: Path, tmp_path: Path, stores: dict[str, str]
) -> None:
    result = _invoke(_args(tmp_path / "x", "--store", stores["topk"], "--epochs", "1", lm=False))
    one_line_error(result, "per-token soft labels of a language model", "pass --lm")
    assert not (tmp_path / "x" / CHECKPOINT).exists()


def test_a_row_store_with_lm_is_refused(in_root: Path, tmp_path: Path, make_store) -> None:
    rows, _ = make_store("rows.zarr")  # tests.helpers.specs: a classifier teacher, a row store
    result = _invoke(_args(tmp_path / "x", "--store", str(rows), "--epochs", "1"))
    one_line_error(result, "has one row per sample", "--lm trains from a per-token store")
    assert not (tmp_path / "x" / CHECKPOINT).exists()


@pytest.mark.parametrize(("variant", "differ"), [("token", 1), ("length", 1), ("swap", 2)])
def test_a_changed_dataset_is_refused(
    in_root: Path,
    tmp_path: Path,
    stores: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
    differ: int,
) -> None:
    monkeypatch.setenv("SOFTCACHE_TEST_LM_VARIANT", variant)
    fragments = (
        f"{differ} sample(s) of dataset {RAGGED} differ from those store {stores['topk']} was "
        f"built from (first: sample {ts.CHANGED_SAMPLE})",
        "rebuild the store",
    )
    one_line_error(_invoke(_args(tmp_path / "c", "--store", stores["topk"])), *fragments)
    config = TrainConfig(
        student=f"{STUDENTS}:causal_student",
        dataset=RAGGED,
        store=stores["topk"],
        lm=True,
        device="cpu",
        output=str(tmp_path / "c"),
    )
    with pytest.raises(DatasetMismatchError, match=rf"first: sample {ts.CHANGED_SAMPLE}\)"):
        train(config, progress=False)
    assert not (tmp_path / "c" / CHECKPOINT).exists()


def test_hash_check_off_skips_the_per_sample_check(
    in_root: Path, tmp_path: Path, stores: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal above is the hash check's: with it off the same count is accepted."""
    monkeypatch.setenv("SOFTCACHE_TEST_LM_VARIANT", "token")
    metrics = _train(
        tmp_path / "off",
        "--store",
        stores["topk"],
        "--hash-check",
        "off",
        "--max-steps",
        "1",
        *FAST,
    )
    assert metrics["steps"] == 1


def test_plan_blocks_hold_at_least_a_batch_and_block_tokens(
    in_root: Path, tmp_path: Path, stores: dict[str, str]
) -> None:
    """Blocks of one shard's tokens would hold about 2 of these samples: too few to shuffle, and
    fewer than the default batch of 64. A block holds BLOCK_TOKENS tokens (here: every sample)
    and at least a batch."""
    store = LogitStore.open(stores["topk"])
    n = store.meta.num_samples
    assert block_samples_for(store) == n  # fewer than BLOCK_TOKENS tokens in all
    assert block_samples_for(store, 64) == 64
    metrics = _train(tmp_path / "w", "--store", stores["topk"], "--max-steps", "1")
    assert metrics["steps"] == 1


def test_block_samples_scale_with_sequence_length() -> None:
    """Unit check of the rule on metadata alone: tokens per block over mean tokens per sample."""

    class Meta:
        def __init__(self, samples: int, tokens: int, shard_rows: int) -> None:
            self.num_samples, self.num_tokens, self.shard_rows = samples, tokens, shard_rows

    class Store:
        def __init__(self, meta: Meta) -> None:
            self.meta = meta

    short = Store(Meta(100_000, 100_000 * 128, 4096))  # 128-token samples: 512 per block
    long = Store(Meta(10_000, 10_000 * 2048, 4096))  # 2,048-token samples: 32 per block
    big_shards = Store(Meta(10_000, 10_000 * 128, 262_144))  # a shard beyond BLOCK_TOKENS
    assert block_samples_for(short) == BLOCK_TOKENS // 128  # type: ignore[arg-type]
    assert block_samples_for(long) == BLOCK_TOKENS // 2048  # type: ignore[arg-type]
    assert block_samples_for(long, 64) == 64  # type: ignore[arg-type]
    assert block_samples_for(big_shards) == 262_144 // 128  # type: ignore[arg-type]


def test_a_dataset_of_another_size_is_refused(
    in_root: Path, tmp_path: Path, stores: dict[str, str]
) -> None:
    result = _invoke(
        _args(tmp_path / "n", "--store", stores["topk"], dataset=f"{SPECS}:empty_token_dataset")
    )
    one_line_error(result, "has 3 samples but store", f"built from {ts.NUM_SEQUENCES}")


@pytest.mark.parametrize(
    ("eval_dataset", "fragments"),
    [
        (RAGGED, ("sample(s) of dataset", "(first: sample 1)")),
        (f"{SPECS}:empty_token_dataset", ("has 3 samples but store",)),
    ],
    ids=["other-sequences", "other-size"],
)
def test_an_eval_store_of_another_dataset_is_refused(
    in_root: Path, tmp_path: Path, stores: dict[str, str], eval_dataset: str, fragments: tuple
) -> None:
    # The `next` store was built from the next-token dataset: same lengths, other tokens.
    args = _args(
        tmp_path / "e",
        "--store", stores["topk"], "--eval-dataset", eval_dataset, "--eval-store", stores["next"],
        *FAST,
    )  # fmt: skip
    line = one_line_error(_invoke(args), *fragments, stores["next"], eval_dataset)
    assert "use the dataset the store was built from" in line
    assert not (tmp_path / "e" / CHECKPOINT).exists()


# ---- the token stream ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["topk", "sampled"])
@pytest.mark.parametrize(("batch_size", "window_blocks", "prefetch"), [(3, 2, 1), (5, 3, 4)])
def test_stream_labels_are_each_samples_rows_in_batch_order(
    stores: dict[str, str], encoding: str, batch_size: int, window_blocks: int, prefetch: int
) -> None:
    store = LogitStore.open(stores[encoding])
    offsets = store.offsets()
    n = store.meta.num_samples
    # Each sample's rows read straight from the store, one read per sample (with the teacher's
    # bins of a top-k store, which the stream makes per block).
    own = [
        decode_with_bins(store.read_rows(int(offsets[i]), int(offsets[i + 1])), store.meta)
        for i in range(n)
    ]
    plan = EpochPlan(
        num_samples=n,
        block_rows=4,  # small blocks (a training run's are >= BLOCK_TOKENS tokens): many of them
        batch_size=batch_size,
        seed=5,
        window_blocks=window_blocks,
    )
    assert 1 < plan.block_rows < n // 4  # many blocks, so batches cross blocks and windows
    stream = SoftLabelStream(store, prefetch_blocks=prefetch)
    orders, empty_batches = [], 0
    for epoch in (0, 1):
        plan.set_epoch(epoch)
        seen: list[int] = []
        for got in stream.batches(plan):
            samples = got.indices.tolist()
            assert got.fields.keys() == own[0].keys()
            for key, tensor in got.fields.items():
                want = torch.cat([own[i][key] for i in samples])
                assert tensor.dtype == want.dtype and torch.equal(tensor, want), (key, samples)
            assert got.lengths.tolist() == [int(offsets[i + 1] - offsets[i]) for i in samples]
            assert len(next(iter(got.fields.values()))) == int(got.lengths.sum())
            empty_batches += any(i in ts.EMPTY_SAMPLES for i in samples)
            seen += samples
        assert sorted(seen) == list(range(n))
        orders.append(seen)
    assert orders[0] != orders[1]  # the second epoch is another order, read again
    assert empty_batches >= len(ts.EMPTY_SAMPLES)  # empty samples were among those handed out


def test_a_batch_of_empty_samples_has_no_rows_of_the_right_widths(stores: dict[str, str]) -> None:
    store = LogitStore.open(stores["topk"])
    plan = EpochPlan(num_samples=store.meta.num_samples, block_rows=4, batch_size=2, seed=0)
    stream = SoftLabelStream(store)
    source = stream.source
    assert isinstance(source, TokenBlocks)
    block = 7 // 4
    decoded = stream._compute([block], plan.block_rows)[block]
    got = source.gather(
        np.array([7, 8]),
        np.array([block, 8 // 4]),
        {block: decoded, 8 // 4: stream._compute([8 // 4], 4)[8 // 4]},
        4,
        (0, 0),
    )
    for key, tensor in got.fields.items():
        assert tensor.shape[0] == 0 and tensor.shape[1:] == decoded[key].shape[1:], key


def test_token_blocks_refuse_a_row_store(make_store) -> None:
    rows, _ = make_store("rows.zarr")
    with pytest.raises(ValueError, match="one row per sample, not per token"):
        TokenBlocks(LogitStore.open(rows))


# ---- alignment in training ------------------------------------------------------------------------


def _next_token_run(out: Path, stores: dict[str, str], *extra: str) -> dict:
    return _train(
        out,
        "--store", stores["next"], "--mode", "offline", "--alpha", "0",
        "--teacher", NEXT_TEACHER, "--eval-dataset", NEXT_DATA,
        "--epochs", "4", "--batch-size", "8", "--lr", "5e-2", *extra,
        dataset=NEXT_DATA, student="next_token_student",
    )  # fmt: skip


def test_kd_alone_teaches_the_next_token_rule(
    in_root: Path, tmp_path: Path, stores: dict[str, str]
) -> None:
    """The teacher is exactly right and the dataset has no labels: only soft labels at the right
    rows (row offsets[i] + j predicts token j + 1) can teach the token -> token map."""
    untrained = _next_token_accuracy(ls.next_token_student().eval())
    assert untrained < 0.05  # chance is 1 / 293
    metrics = _next_token_run(tmp_path / "next", stores)
    assert metrics["eval_accuracy"] == [None] * 4  # no labels to score against
    accuracy = _next_token_accuracy(_trained(tmp_path / "next", ls.next_token_student))
    assert accuracy > 0.9, accuracy
    assert metrics["teacher_agreement"][-1] > 0.9  # the teacher's top-1 is the next token


def test_rows_shifted_by_one_would_not_teach_it(
    in_root: Path, tmp_path: Path, stores: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: a stream one row off teaches the student another map."""
    gather = TokenBlocks.gather

    def shifted(self, *args):
        got = gather(self, *args)
        got.fields = {k: torch.roll(v, 1, dims=0) for k, v in got.fields.items()}
        return got

    monkeypatch.setattr(TokenBlocks, "gather", shifted)
    # The patch is this process's: the batches must be made here, not in a batch process.
    metrics = _next_token_run(tmp_path / "shifted", stores, "--loader", "thread")
    accuracy = _next_token_accuracy(_trained(tmp_path / "shifted", ls.next_token_student))
    assert accuracy < 0.1, accuracy
    assert metrics["teacher_agreement"][-1] < 0.2


def test_lm_metrics_reach_the_cli_summary(
    in_root: Path, tmp_path: Path, stores: dict[str, str]
) -> None:
    result = _invoke(_args(tmp_path / "s", "--store", stores["topk"], "--max-steps", "2", *FAST))
    assert result.exit_code == 0, result.output
    for label in ("next-token accuracy", "KL to teacher", "eval perplexity", "(2 steps)"):
        assert label in result.output
    assert np.isfinite(json.loads((tmp_path / "s" / METRICS).read_text())["train_loss"][0])


def test_hard_labels_without_labels_are_refused(in_root: Path, tmp_path: Path) -> None:
    """The next-token dataset gives input_ids only: hard mode would train on a zero loss."""
    result = _invoke(
        _args(tmp_path / "h", "--mode", "hard", dataset=NEXT_DATA, student="next_token_student")
    )
    one_line_error(result, "has no labels", "--alpha 0")


def test_hard_mode_accepts_a_store_and_reads_no_labels(
    in_root: Path, tmp_path: Path, stores: dict[str, str]
) -> None:
    """Given --store, every mode uses its block layout (the same data order as offline KD), but
    only offline reads its labels."""
    hard = _train(tmp_path / "h", "--mode", "hard", "--store", stores["topk"], "--max-steps", "2")
    assert hard["store_encoding"] is None and hard["steps"] == 2


def test_lm_training_under_torchrun_is_refused(
    in_root: Path, tmp_path: Path, stores: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = _invoke(_args(tmp_path / "d", "--store", stores["topk"]))
    one_line_error(result, "one process", "torchrun")


@pytest.mark.parametrize("encoding", ["topk", "sampled"])
def test_a_run_killed_inside_an_epoch_resumes_to_the_same_weights(
    in_root: Path,
    tmp_path: Path,
    stores: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    encoding: str,
) -> None:
    """--checkpoint-steps 3 checkpoints inside the first epoch (its cursor and sums so far); a run
    killed right after that checkpoint resumes there, to the uninterrupted run's weights."""
    settings = (
        "--store", stores[encoding], "--epochs", "2", "--eval-dataset", RAGGED,
        "--checkpoint-steps", "3", *FAST,
    )  # fmt: skip
    assert STEPS_PER_EPOCH > 3  # the checkpoint at step 3 is inside epoch 1
    full = _train(tmp_path / "full", *settings)
    part = tmp_path / "part"
    save = lm_train.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        if args[6] == 3:  # the step
            raise _Killed

    monkeypatch.setattr(lm_train, "save_checkpoint", save_then_die)
    result = _invoke(_args(part, *settings))
    assert isinstance(result.exception, _Killed), (result.output, result.exception)
    monkeypatch.setattr(lm_train, "save_checkpoint", save)
    state = torch.load(part / CHECKPOINT, weights_only=False)
    assert state["plan"]["epoch"] == 0 and state["plan"]["cursor"] == 3 and state["step"] == 3

    resumed = _train(part, *settings, "--resume")
    want = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=False)
    got = torch.load(part / CHECKPOINT, weights_only=False)
    for name, tensor in want["student"].items():
        assert torch.equal(tensor, got["student"][name]), name
    assert resumed["steps"] == full["steps"]
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)
    assert resumed["eval_kl_to_teacher"] == full["eval_kl_to_teacher"]
