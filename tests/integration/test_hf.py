"""Hugging Face `transformers` causal LMs as teachers (`hf:DIR`) and students (`hf-init:DIR`).

The models are tiny GPT-2 configs made here and written with `save_pretrained` into tmp_path:
nothing is downloaded and no tokenizer is needed. The data is `tests.helpers.hf_specs`. Tests
that need `transformers` skip without it (the dev setup installs it: the `hf` extra); the ones
about its absence run everywhere.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from softcache.cli import main
from softcache.errors import SpecError
from softcache.runtime.specs import instantiate, load_callable
from softcache.store import LogitStore, decode_token_rows
from tests.helpers import ROOT
from tests.helpers import hf_specs as data

DATASET = "tests.helpers.hf_specs:ragged_dataset"
TOP_K = 8
# The teacher's output head is scaled up so its distributions are peaked: most rows' top-1 then
# stands clear of the runner-up by far more than float16 log-probabilities resolve.
HEAD_SCALE = 100.0
# Stored log-probabilities are float16: within 2^-11 of the truth relative to their size.
FP16_TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}


@pytest.fixture(scope="module")
def transformers() -> ModuleType:
    return pytest.importorskip("transformers")


def _gpt2_config(transformers: ModuleType, **overrides: object) -> object:
    values: dict[str, object] = {
        "vocab_size": data.VOCAB,
        "n_positions": 64,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "bos_token_id": 0,  # GPT-2's defaults (50256) lie outside this vocabulary
        "eos_token_id": 0,
        "tie_word_embeddings": False,
    }
    values.update(overrides)
    return transformers.GPT2Config(**values)


def _save_teacher(transformers: ModuleType, directory: Path, **config: object) -> Path:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt2_config(transformers, **config))
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def teacher_dir(transformers: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_teacher(transformers, tmp_path_factory.mktemp("hf") / "teacher")


@pytest.fixture(scope="module")
def student_dir(transformers: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config only (no weights): all `hf-init:` needs."""
    directory = tmp_path_factory.mktemp("hf") / "student"
    _gpt2_config(transformers, n_layer=1, tie_word_embeddings=True).save_pretrained(str(directory))  # type: ignore[attr-defined]
    return directory


def _invoke(args: list[str]) -> Result:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # where tests.helpers.* specs import
        return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def hf_store(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "store.zarr"
    result = _invoke(
        [
            "build", "--lm", "--teacher", f"hf:{teacher_dir}", "--dataset", DATASET,
            "--output", str(out), "--encoding", "topk", "--top-k", str(TOP_K),
            "--batch-size", "5", "--shard-rows", "64", "--device", "cpu", "-q",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _reference_logits(transformers: ModuleType, teacher_dir: Path) -> Iterator[torch.Tensor]:
    """Each sample's (n_i, V) logits from transformers itself: unpadded, one sample at a time."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    for ids in data.sequences():
        if len(ids) == 0:
            yield torch.empty(0, data.VOCAB)
            continue
        with torch.no_grad():
            yield model(ids.unsqueeze(0)).logits[0].float()


# ---- build --lm with an hf: teacher -----------------------------------------------------------


def test_build_rows_are_the_hf_models_own_predictions(
    transformers: ModuleType, teacher_dir: Path, hf_store: Path
) -> None:
    store = LogitStore.open(hf_store)
    meta = store.meta
    lengths = data.lengths()
    assert meta.tokens and meta.complete
    assert meta.num_tokens == int(lengths.sum())
    assert meta.num_samples == data.NUM_SEQUENCES
    assert meta.num_classes == data.VOCAB
    assert meta.teacher["spec"] == f"hf:{teacher_dir}"
    offsets = store.offsets()
    np.testing.assert_array_equal(np.diff(offsets), lengths)

    reference = torch.cat(list(_reference_logits(transformers, teacher_dir)))
    assert reference.shape == (meta.num_tokens, data.VOCAB)
    expected = reference.argmax(dim=1)
    top1 = torch.from_numpy(store.top1())
    # Where two logits tie to within float16's resolution, the store may keep either as its top 1;
    # the scaled head makes those rows rare.
    runner_up_gap = reference.topk(2, dim=1).values.diff(dim=1).neg().squeeze(1)
    clear = runner_up_gap > 0.01
    assert clear.float().mean() > 0.95
    assert torch.equal(top1[clear], expected[clear])
    best = reference.gather(1, top1.unsqueeze(1)).squeeze(1)
    assert bool((best >= reference.max(dim=1).values - 0.01).all())

    decoded = decode_token_rows(store.read_rows(0, meta.num_rows), meta)
    log_p = torch.log_softmax(reference, dim=1)
    torch.testing.assert_close(
        decoded["values"], log_p.gather(1, decoded["indices"]), **FP16_TOLERANCE
    )


def test_teacher_metadata_counts_the_hf_models_parameters(
    transformers: ModuleType, teacher_dir: Path, hf_store: Path
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    meta = LogitStore.open(hf_store).meta
    assert meta.teacher["num_parameters"] == sum(p.numel() for p in model.parameters())


# ---- train --lm with an hf-init: student --------------------------------------------------------


@pytest.mark.parametrize("mode", ["offline", "online", "hard"])
def test_train_an_hf_init_student(
    mode: str,
    transformers: ModuleType,
    teacher_dir: Path,
    student_dir: Path,
    hf_store: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    args = [
        "train", "--lm", "--store", str(hf_store), "--student", f"hf-init:{student_dir}",
        "--dataset", DATASET, "--mode", mode, "--epochs", "1", "--batch-size", "8",
        "--output", str(out), "--device", "cpu", "-q",
    ]  # fmt: skip
    if mode == "online":
        args += ["--teacher", f"hf:{teacher_dir}"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_loss"]) == 1
    assert math.isfinite(metrics["train_loss"][0])
    # The student also leaves as a save_pretrained folder, holding the trained weights.
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out / "student"))
    trained = torch.load(out / "student.pt")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, trained[name]), name


# ---- loading: dtypes, fresh models, errors ------------------------------------------------------


def test_hf_init_is_a_fresh_model_of_the_config(
    transformers: ModuleType, teacher_dir: Path
) -> None:
    teacher = instantiate(f"hf:{teacher_dir}", "teacher")
    torch.manual_seed(1)
    fresh = instantiate(f"hf-init:{teacher_dir}", "student")
    torch.manual_seed(1)
    again = instantiate(f"hf-init:{teacher_dir}", "student")
    assert type(fresh) is type(teacher)
    assert fresh.config.n_layer == teacher.config.n_layer
    head = teacher.state_dict()["lm_head.weight"]
    assert not torch.equal(fresh.state_dict()["lm_head.weight"], head)
    for name, value in fresh.state_dict().items():  # seeded by torch's generator
        assert torch.equal(value, again.state_dict()[name]), name


def test_dtypes(transformers: ModuleType, tmp_path: Path) -> None:
    from softcache.runtime.hf import load_causal_lm

    directory = _save_teacher(transformers, tmp_path / "bf16")
    model = load_causal_lm(directory)
    assert next(model.parameters()).dtype == torch.float32
    model.to(torch.bfloat16).save_pretrained(str(directory))
    # Pretrained weights load as saved; a fresh model is float32 (it is trained) unless asked.
    assert next(load_causal_lm(directory).parameters()).dtype == torch.bfloat16
    assert next(load_causal_lm(directory, pretrained=False).parameters()).dtype == torch.float32
    as_float = load_causal_lm(directory, dtype="float32")
    assert next(as_float.parameters()).dtype == torch.float32
    fresh_bf16 = load_causal_lm(directory, pretrained=False, dtype=torch.bfloat16)
    assert next(fresh_bf16.parameters()).dtype == torch.bfloat16
    with pytest.raises(SpecError, match="dtype 'int8' is not one of"):
        load_causal_lm(directory, dtype="int8")


def test_a_directory_without_config_json(transformers: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(
        SpecError, match=r"no config\.json; give a directory written by save_pretrained"
    ):
        instantiate(f"hf:{tmp_path}", "teacher")
    with pytest.raises(SpecError, match="is not a directory"):
        instantiate(f"hf-init:{tmp_path / 'missing'}", "student")


def test_hf_spec_without_weights_points_to_hf_init(
    transformers: ModuleType, student_dir: Path
) -> None:
    hint = re.escape(f"for a fresh model of its config use 'hf-init:{student_dir}'")
    with pytest.raises(SpecError, match=f"holds no weights: {hint}"):
        instantiate(f"hf:{student_dir}", "teacher")


def test_build_error_is_one_line(transformers: ModuleType, tmp_path: Path) -> None:
    result = _invoke(
        [
            "build", "--lm", "--teacher", f"hf:{tmp_path}", "--dataset", DATASET,
            "--output", str(tmp_path / "s.zarr"), "--encoding", "topk", "--device", "cpu", "-q",
        ]
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert "no config.json" in result.output


# ---- without transformers -------------------------------------------------------------------------


def test_empty_directory_is_refused() -> None:
    with pytest.raises(SpecError, match="names no directory"):
        load_callable("hf:")
    with pytest.raises(SpecError, match="names no directory"):
        load_callable("hf-init:")


def test_missing_transformers_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(SpecError, match=r"pip install 'softcache\[hf\]'"):
        instantiate(f"hf:{tmp_path}", "teacher")


def test_hf_specs_import_transformers_only_when_instantiated() -> None:
    code = (
        "import sys, softcache.cli, softcache.runtime.specs as s\n"
        "s.load_callable('hf:some/dir'); s.load_callable('hf-init:some/dir')\n"
        "print('transformers' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
