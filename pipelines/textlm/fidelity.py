"""What each stored LM encoding costs, measured on held-out tokens against the teacher's full rows.

`measure(store, teacher, dataset, student)` reads a per-token store built over `dataset` (real
bytes on disk, decoded by softcache), runs the teacher over the same sequences for its exact
distribution ``p`` and reports, in nats per token (means over the store's tokens):

- ``kl_reconstructed``: ``KL(p || p~)`` for top-k, where ``p~`` is what the cache can rebuild:
  the decoded kept probabilities and residual bin (renormalised), the residual spread uniformly
  over the other ``V - k`` ids. For sampled stores this KL is infinite (undrawn ids get 0), so
  it is None.
- ``kl_bins_quant``: top-k only, the KL between the exact and the decoded ``k + 1``-bin
  distributions: what value quantisation costs the loss's target.
- ``loss_over_kl``: for a reference student ``q``, the cache's KD loss (`topk_residual_kl` or
  `sampled_kl`) over the exact ``KL(p || q)``: top-k is below 1 (the tail's inner term is unseen),
  sampled is 1 in expectation (unbiased); ``loss_se`` is the standard error of that ratio's
  numerator over tokens, relative to the KL.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from softcache.data.sequences import causal_logits, collate_sequences
from softcache.losses import tokens as token_losses
from softcache.store import LogitStore, decode_token_rows
from softcache.tools.fidelity import reconstruct_topk


@torch.inference_mode()
def measure(
    store: LogitStore, teacher: nn.Module, dataset: Any, student: nn.Module, *, batch: int = 64
) -> dict[str, Any]:
    """Fidelity figures of one store (see the module docstring) and its bytes per token."""
    codec = store.meta.codec
    tau = codec.temperature
    decoded = decode_token_rows(store.read_rows(0, store.meta.num_rows), store.meta)
    sums = {"kl_rec": 0.0, "kl_quant": 0.0, "kl_true": 0.0, "loss": 0.0, "loss_sq": 0.0}
    seen = 0
    for b in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(b, min(b + batch, len(dataset)))]
        x = collate_sequences(items)
        mask = x.attention_mask
        t = causal_logits(teacher, x.input_ids, mask)[mask].float()
        s = causal_logits(student, x.input_ids, mask)[mask].float()
        n = t.shape[0]
        rows = {k: v[seen : seen + n] for k, v in decoded.items()}
        log_p = F.log_softmax(t / tau, dim=1)
        log_q = F.log_softmax(s / tau, dim=1)
        kl_true = _kl(log_p, log_q)
        # The caches' own per-token losses, without their tau^2 (as kl_true).
        if codec.encoding == "topk":
            per_token = token_losses.topk_residual_kl(
                s, rows["values"], rows["indices"], rows["residual"], temperature=tau,
                reduction="none",
            ) / tau**2  # fmt: skip
            rec, quant = _topk_reconstruction(log_p, rows)
            sums["kl_rec"] += float(rec.sum())
            sums["kl_quant"] += float(quant.sum())
        else:
            per_token = token_losses.sampled_kl(
                s, rows["ids"], rows["counts"], rows["entropy"], temperature=tau,
                reduction="none",
            ) / tau**2  # fmt: skip
        sums["kl_true"] += float(kl_true.sum())
        sums["loss"] += float(per_token.sum())
        sums["loss_sq"] += float((per_token**2).sum())
        seen += n
    if seen != store.meta.num_rows:
        raise ValueError(f"the dataset has {seen} tokens, the store {store.meta.num_rows}")
    mean_loss, mean_kl = sums["loss"] / seen, sums["kl_true"] / seen
    var = max(sums["loss_sq"] / seen - mean_loss**2, 0.0)
    topk = codec.encoding == "topk"
    return {
        "encoding": codec.encoding,
        "width": codec.width,
        "value_bits": codec.value_bits,
        "bytes_per_token": store.nbytes_stored() / store.meta.num_tokens,
        "kl_reconstructed": sums["kl_rec"] / seen if topk else None,
        "kl_bins_quant": sums["kl_quant"] / seen if topk else None,
        "student_kl": mean_kl,
        "loss_over_kl": mean_loss / mean_kl,
        "loss_se": math.sqrt(var / seen) / mean_kl,
    }


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row sums of ``p (log p - log q)`` with ``0 log 0 = 0``: ``(T,)``."""
    return token_losses.kl_terms(log_p, log_q).sum(dim=1)


def _topk_reconstruction(
    log_p: torch.Tensor, rows: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``KL(p || p~)`` and the ``k + 1``-bin quantisation KL: ``(T,)`` each."""
    ids = rows["indices"]
    # p~ (`softcache fidelity`'s): the kept bins at their ids, the residual spread evenly.
    log_rec = reconstruct_topk(rows["values"], ids, rows["residual"], log_p.shape[1])
    rec = _kl(log_p, log_rec)
    bins = torch.cat([rows["values"], rows["residual"].unsqueeze(1)], dim=1)
    bins = bins - torch.logsumexp(bins, dim=1, keepdim=True)
    kept = log_p.gather(1, ids)
    exact_tail = torch.log1p(-kept.exp().sum(dim=1).clamp(max=1 - 1e-7)).unsqueeze(1)
    exact = torch.cat([kept, exact_tail], dim=1)
    quant = _kl(exact, bins)
    return rec, quant
