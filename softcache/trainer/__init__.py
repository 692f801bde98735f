"""`softcache train`: students from a store (offline KD) or baselines (online KD, hard labels)."""

from softcache.trainer.rows import TrainResult, train

__all__ = ["TrainResult", "train"]
