"""`softcache train`: students from a store (offline KD) or baselines (online KD, hard labels).

`loop` is the one training loop; `rows` and `tokens` are its layouts; `stream` is the one prefetch
engine (with `row_labels` and `token_labels`, what each layout reads); `plan`, `checkpoint` and
`ddp` hold the epoch order, the checkpoints and torchrun; `distill` is the API for a training loop
of your own.
"""

from softcache.trainer.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
