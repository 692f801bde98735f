"""The Hugging Face `Trainer` integration (`softcache.trainer.hf`) on a real token store.

A tiny random GPT-2 teacher and student config are written with `save_pretrained` into tmp_path
(nothing is downloaded); the teacher's top-8 store is built by `softcache build --lm`; the student
trains with `DistillTrainer` under `torchrun --nproc_per_node 2` (gloo, CPU) and is saved with
`save_model`. Its KD loss on a fixed batch, through the Trainer's `compute_loss`, must equal
softcache's own loss (`token_kd_loss` over the rows read straight from the store) computed on the
student `from_pretrained` loads back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softcache.errors import DatasetMismatchError
from softcache.store import LogitStore, decode_token_rows
from softcache.trainer.tokens import token_kd_loss
from tests.helpers import ROOT
from tests.helpers import hf_specs as data
from tests.helpers.hf_trainer_run import FIXED

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from softcache.trainer.hf import DistillCollator, DistillDataset  # noqa: E402


def _config(**overrides: object) -> object:
    values: dict[str, object] = {
        "vocab_size": data.VOCAB, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2,
        "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": False,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }  # fmt: skip
    values.update(overrides)
    return transformers.GPT2Config(**values)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("hf_trainer")
    torch.manual_seed(0)
    teacher = transformers.GPT2LMHeadModel(_config())
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)
    teacher.save_pretrained(str(base / "teacher"))
    _config(n_layer=1).save_pretrained(str(base / "student"))  # type: ignore[attr-defined]
    return base / "teacher", base / "student"


@pytest.fixture(scope="module")
def store(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf_trainer") / "store.zarr"
    cmd = [
        sys.executable, "-m", "softcache.cli", "build", "--lm", "--teacher", f"hf:{models[0]}",
        "--dataset", "tests.helpers.hf_specs:ragged_dataset", "--output", str(out),
        "--encoding", "topk", "--top-k", "8", "--shard-rows", "64", "--batch-size", "5",
        "--device", "cpu", "-q",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _softcache_loss(model: torch.nn.Module, store_path: Path) -> float:
    """softcache's own KD loss on FIXED: the rows read straight from the store."""
    store = LogitStore.open(str(store_path))
    offsets = store.offsets()
    seqs = data.sequences()
    rows, fields = [], []
    for i in FIXED:
        ids = seqs[i]
        fields.append(decode_token_rows(store.read_rows(offsets[i], offsets[i + 1]), store.meta))
        if len(ids):
            with torch.no_grad():
                rows.append(model(ids.unsqueeze(0)).logits[0])
    cat = {k: torch.cat([f[k] for f in fields]) for k in fields[0]}
    return float(token_kd_loss(torch.cat(rows), cat, store.meta.codec))


def test_trainer_under_torchrun_matches_softcache_loss_and_saves_a_pretrained_model(
    models: tuple[Path, Path], store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        str(ROOT / "tests" / "helpers" / "hf_trainer_run.py"), str(store), str(models[1]),
        str(out), "0.0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    record = json.loads((out / "fixed.json").read_text())
    assert record["world_size"] == 2
    losses = [entry["loss"] for entry in record["log"] if "loss" in entry]
    assert len(losses) == 4 and all(np.isfinite(losses))
    student = transformers.AutoModelForCausalLM.from_pretrained(str(out / "student")).eval()
    expected = _softcache_loss(student, store)
    assert record["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    fresh = transformers.AutoModelForCausalLM.from_config(student.config).eval()
    assert _softcache_loss(fresh, store) != pytest.approx(expected, rel=1e-3)  # it trained


def test_dataset_items_and_collator_follow_the_store(store: Path) -> None:
    dataset = DistillDataset(data.ragged_dataset(), str(store), cache_shards=1)
    meta = LogitStore.open(str(store)).meta
    batch = DistillCollator(pad_id=5)([dataset[i] for i in FIXED])
    mask = batch["attention_mask"].bool()
    assert int(mask.sum()) == batch["softcache_targets"]["values"].shape[0]
    assert bool((batch["input_ids"][~mask] == 5).all())
    assert bool((batch["labels"][~mask] == -100).all())
    assert bool((batch["labels"][mask] == batch["input_ids"][mask]).all())
    assert meta.codec.encoding == "topk"
    # A shuffled dataset is refused at its first wrong sample.
    seqs = data.sequences()
    swapped = data.RaggedTokens([seqs[2], seqs[1], seqs[0], *seqs[3:]])
    with pytest.raises(DatasetMismatchError, match="sample 0"):
        DistillDataset(swapped, str(store))[0]


def test_distill_mixin_on_trl_sft_trainer(
    models: tuple[Path, Path], store: Path, tmp_path: Path
) -> None:
    """`DistillMixin` first among the bases of TRL's `SFTTrainer`: it trains from the store
    (single process), its loss being softcache's KD loss, and saves a folder that loads."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    from softcache.trainer.hf import DistillMixin
    from tests.helpers.word_tokenizers import SPECIALS, make_tokenizer, words

    class DistillSFTTrainer(DistillMixin, trl.SFTTrainer):  # type: ignore[misc]
        def __init__(self, *args: object, codec: object, alpha: float = 0.0, **kwargs: object):
            self.setup_distillation(kwargs.get("args"), codec, alpha, model=kwargs.get("model"))  # type: ignore[arg-type]
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    tokenizer = make_tokenizer(words(data.VOCAB - len(SPECIALS)))
    dataset = DistillDataset(data.ragged_dataset(), str(store), cache_shards=2, tokenizer=tokenizer)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=3,
        learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
        seed=0, dataloader_num_workers=0, activation_checkpointing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )  # fmt: skip
    table = dataset.hf_dataset()  # TRL takes `datasets` datasets only: the same items
    assert len(table) == len(dataset)
    for i in (1, 2, 5):
        assert torch.equal(table[i]["input_ids"], dataset[i]["input_ids"])
        for key, value in dataset[i]["softcache_targets"].items():
            assert torch.equal(table[i]["softcache_targets"][key], value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(n_layer=1))
    trainer = DistillSFTTrainer(
        model=model, args=args, train_dataset=table, processing_class=tokenizer,
        data_collator=DistillCollator(), codec=dataset.codec,
    )  # fmt: skip
    assert trainer.args.remove_unused_columns is False
    before = _softcache_loss(model.eval(), store)
    model.train()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    batch = DistillCollator()([dataset[i] for i in FIXED])
    trainer.model.eval()
    with torch.no_grad():
        through_trl = float(trainer.compute_loss(trainer.model, batch))
    assert through_trl == pytest.approx(_softcache_loss(trainer.model, store), rel=1e-5, abs=1e-6)
    assert through_trl < before  # it trained
    trainer.save_model(str(tmp_path / "student"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    assert loaded.config.n_layer == 1
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "student")).get_vocab() == (
        tokenizer.get_vocab()
    )
