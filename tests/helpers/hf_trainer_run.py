"""One `DistillTrainer` run, launched by `tests/integration/test_hf_trainer.py` under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/hf_trainer_run.py \
        STORE STUDENT_CONFIG_DIR OUTPUT ALPHA

Trains a fresh GPT-2 of STUDENT_CONFIG_DIR's config (seed 0, the same on every rank) for a few
steps from STORE with `tests.helpers.hf_specs:ragged_dataset`, saves it with `save_model`
(`save_pretrained`) into OUTPUT/student, and (rank 0) writes OUTPUT/fixed.json: the trained
model's loss through `DistillTrainer.compute_loss` on a fixed batch (`FIXED`), in eval mode, with
the world size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

from softcache.trainer.hf import DistillCollator, DistillDataset, DistillTrainer
from tests.helpers import hf_specs

FIXED = [1, 2, 3, 4, 13, 20]  # both item formats, a one-token and an empty sample
STEPS = 4


def main() -> None:
    store, student_dir, output, alpha = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(student_dir)
    model = transformers.AutoModelForCausalLM.from_config(config)
    dataset = DistillDataset(hf_specs.ragged_dataset(), store, cache_shards=2)
    args = transformers.TrainingArguments(
        output_dir=str(output / "trainer"),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-3,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = DistillTrainer(model=model, args=args, train_dataset=dataset, alpha=float(alpha))
    assert args.remove_unused_columns is False
    trainer.train()
    trainer.save_model(str(output / "student"))
    if trainer.is_world_process_zero():
        batch = DistillCollator()([dataset[i] for i in FIXED])
        trainer.model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        record = {
            "loss": float(loss),
            "world_size": trainer.args.world_size,
            "log": trainer.state.log_history,
        }
        (output / "fixed.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
