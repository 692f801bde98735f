"""The teacher's tokenizer recorded by `build --lm`, and checked by `train --lm` (the CLI).

A tiny GPT-2 teacher is saved with a word-level tokenizer of its 300 ids in its directory
(`tests.helpers.word_tokenizers`; nothing is downloaded); `build --lm --teacher hf:DIR` records the
tokenizer's identity. Students are `hf-init:` directories: one whose tokenizer differs in a
special token, one whose vocabulary differs, one padded (302 tokens, a 320-wide head) that trains
and leaves with its tokenizer, and one whose head is narrower than the store's vocabulary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner, Result

from softcache.cli import main
from softcache.store import LogitStore
from tests.helpers import ROOT, one_line_error
from tests.helpers import hf_specs as data
from tests.helpers.word_tokenizers import SPECIALS, make_tokenizer, save_tokenizer, words

DATASET = "tests.helpers.hf_specs:ragged_dataset"
VOCAB_WORDS = words(data.VOCAB - len(SPECIALS))  # ids 0..299, as the data's


@pytest.fixture(scope="module")
def transformers() -> ModuleType:
    return pytest.importorskip("transformers")


def _config(transformers: ModuleType, vocab: int, **overrides: object) -> object:
    values: dict[str, object] = {
        "vocab_size": vocab, "n_positions": 64, "n_embd": 16, "n_layer": 1, "n_head": 2,
        "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False,
    }  # fmt: skip
    values.update(overrides)
    return transformers.GPT2Config(**values)


def _invoke(args: list[str]) -> Result:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # where tests.helpers.* specs import
        return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def dirs(transformers: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tokid")
    teacher = base / "teacher"
    transformers.GPT2LMHeadModel(_config(transformers, data.VOCAB)).save_pretrained(str(teacher))
    save_tokenizer(teacher, VOCAB_WORDS)
    out = {"teacher": teacher}
    students = {
        "eos": (data.VOCAB, {"eos": "<pad>"}, VOCAB_WORDS),
        "range": (data.VOCAB, {}, [*VOCAB_WORDS[:100], "other", *VOCAB_WORDS[101:]]),
        "padded": (320, {"added": ["<|im_start|>", "<|im_end|>"]}, VOCAB_WORDS),
        "narrow": (256, None, VOCAB_WORDS),
    }
    for name, (vocab, tokenizer, vocab_words) in students.items():
        directory = base / name
        _config(transformers, vocab).save_pretrained(str(directory))  # type: ignore[attr-defined]
        if tokenizer is not None:
            save_tokenizer(directory, vocab_words, **tokenizer)
        out[name] = directory
    return out


@pytest.fixture(scope="module")
def store(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokid") / "store.zarr"
    result = _invoke(
        [
            "build", "--lm", "--teacher", f"hf:{dirs['teacher']}", "--dataset", DATASET,
            "--output", str(out), "--encoding", "topk", "--top-k", "8", "--batch-size", "8",
            "--shard-rows", "128", "--device", "cpu", "-q",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _train(store: Path, student: Path, out: Path, *extra: str) -> Result:
    return _invoke(
        [
            "train", "--lm", "--store", str(store), "--student", f"hf-init:{student}",
            "--dataset", DATASET, "--epochs", "1", "--batch-size", "8", "--max-steps", "2",
            "--output", str(out), "--device", "cpu", "-q", *extra,
        ]
    )  # fmt: skip


def test_the_store_records_the_teachers_tokenizer(store: Path) -> None:
    identity = LogitStore.open(str(store)).meta.tokenizer_identity
    assert identity is not None
    assert (identity.size, identity.ids, identity.logit_width) == (300, 300, 300)
    assert identity.special_tokens["eos_token"] == ("<eos>", 2)
    assert len(identity.blocks) == 1
    shown = _invoke(["info", str(store)])
    assert shown.exit_code == 0, shown.output
    assert f"300 tokens, vocabulary sha256 {identity.vocab_sha256[:16]}..." in shown.output


def test_build_refuses_a_tokenizer_with_more_ids_than_the_teachers_logits(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    """--tokenizer DIR names the teacher's tokenizer: one of 302 ids is not a 300-logit
    teacher's."""
    result = _invoke(
        [
            "build", "--lm", "--teacher", f"hf:{dirs['teacher']}", "--dataset", DATASET,
            "--output", str(tmp_path / "s.zarr"), "--encoding", "topk", "--top-k", "8",
            "--device", "cpu", "-q", "--tokenizer", str(dirs["padded"]),
        ]
    )  # fmt: skip
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    # (transformers' weight-loading bar may precede the one-line error)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: the tokenizer in ") and (
        f"{dirs['padded']} has ids up to 301 but the teacher returns 300 logits per token" in last
    ), last


def test_a_differing_special_token_is_refused(
    store: Path, dirs: dict[str, Path], tmp_path: Path
) -> None:
    line = one_line_error(
        _train(store, dirs["eos"], tmp_path / "run"),
        f"the student's tokenizer ({dirs['eos']}) differs from the teacher's",
        "special token eos_token is '<eos>' (id 2) in the store's tokenizer but '<pad>' (id 1) "
        "here",
    )
    assert "vocabulary:" not in line
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_differing_vocabulary_is_refused(
    store: Path, dirs: dict[str, Path], tmp_path: Path
) -> None:
    one_line_error(
        _train(store, dirs["range"], tmp_path / "run"),
        "vocabulary: the tokens of ids 0..299 differ (the first block of 4,096 ids that does)",
    )


def test_the_same_refusal_for_an_explicit_tokenizer(
    store: Path, dirs: dict[str, Path], tmp_path: Path
) -> None:
    """--tokenizer DIR names the student's tokenizer for a student of any spec."""
    one_line_error(
        _train(store, dirs["padded"], tmp_path / "run", "--tokenizer", str(dirs["eos"])),
        "special token eos_token",
    )


def test_a_padded_student_trains_and_leaves_with_its_tokenizer(
    store: Path,
    dirs: dict[str, Path],
    tmp_path: Path,
    transformers: ModuleType,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="softcache"):
        result = _train(store, dirs["padded"], out)
    assert result.exit_code == 0, result.output
    allowed = [r.getMessage() for r in caplog.records if "tokenizer check" in r.getMessage()]
    assert len(allowed) == 1 and "ids 300..301 exist only in the student's tokenizer" in allowed[0]
    assert "allowed" in allowed[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "student"))
    assert model.config.vocab_size == 320
    saved = transformers.AutoTokenizer.from_pretrained(str(out / "student"), local_files_only=True)
    original = make_tokenizer(VOCAB_WORDS, added=["<|im_start|>", "<|im_end|>"])
    assert saved.get_vocab() == original.get_vocab()
    assert saved.special_tokens_map == original.special_tokens_map


def test_a_student_narrower_than_the_store_is_refused(
    store: Path, dirs: dict[str, Path], tmp_path: Path
) -> None:
    one_line_error(
        _train(store, dirs["narrow"], tmp_path / "run"),
        "the student's logits are 256 wide but the store's soft labels index token ids up to 299",
    )


# ---- the Hugging Face Trainer path --------------------------------------------------------------


def test_the_trainer_checks_and_saves_its_processing_class(
    store: Path,
    dirs: dict[str, Path],
    tmp_path: Path,
    transformers: ModuleType,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("accelerate")
    from softcache.errors import TokenizerMismatchError
    from softcache.runtime.hf import load_tokenizer
    from softcache.trainer.hf import DistillDataset, DistillTrainer

    with pytest.raises(TokenizerMismatchError, match="special token eos_token"):
        DistillDataset(data.ragged_dataset(), str(store), tokenizer=load_tokenizer(dirs["eos"]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=1,
        use_cpu=True, report_to=[], save_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip
    narrow = transformers.AutoModelForCausalLM.from_config(_config(transformers, 256))
    with pytest.raises(TokenizerMismatchError, match="logits are 256 wide"):
        DistillTrainer(
            model=narrow, args=args, train_dataset=DistillDataset(data.ragged_dataset(), str(store))
        )
    tokenizer = load_tokenizer(dirs["padded"])
    model = transformers.AutoModelForCausalLM.from_config(_config(transformers, 320))
    with caplog.at_level(logging.INFO, logger="softcache"):
        trainer = DistillTrainer(
            model=model, args=args, processing_class=tokenizer,
            train_dataset=DistillDataset(data.ragged_dataset(), str(store)),
        )  # fmt: skip
    assert any("ids 300..301 exist only" in r.getMessage() for r in caplog.records)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "student"))
    assert saved.get_vocab() == tokenizer.get_vocab()
    assert (
        transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "student")
        ).config.vocab_size
        == 320
    )
