"""Distillation losses: per-row (dense and top-k, `rows`) and per-token (top-k with its residual
bin and the sampled estimator, `tokens`). Pure torch, computed in float32; where numba is
installed, the CPU top-k row loss runs as one compiled pass instead (`topk_kernel`)."""

from softcache.losses.rows import hard_loss, kd_loss_dense, kd_loss_topk, topk_teacher_probs
from softcache.losses.sparse import sparse_cross_entropy
from softcache.losses.targets import (
    TeacherTargets,
    dense_targets,
    for_batch,
    kd_loss_targets,
    topk_rows,
    topk_targets,
)
from softcache.losses.tokens import dense_kl, kl_terms, sampled_ce, sampled_kl, topk_residual_kl

__all__ = [
    "TeacherTargets",
    "dense_kl",
    "dense_targets",
    "for_batch",
    "hard_loss",
    "kd_loss_dense",
    "kd_loss_targets",
    "kd_loss_topk",
    "kl_terms",
    "sampled_ce",
    "sampled_kl",
    "sparse_cross_entropy",
    "topk_residual_kl",
    "topk_rows",
    "topk_targets",
    "topk_teacher_probs",
]
