"""`softcache fidelity` and `softcache plot` on real stores and runs.

The fidelity figures are checked against values computed here by hand: numpy over the raw Zarr
arrays (read with plain `zarr.open_group`, not softcache's readers) and the test teacher run by
torch, with the formulas of the module docstring written out again.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner, Result

from softcache.builder import build
from softcache.cli import main
from softcache.config import BuildConfig
from tests.conftest import SMALL, spec
from tests.helpers import specs
from tests.helpers import token_specs as ts

TOKEN_SPECS = "tests.helpers.token_specs"


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _json(*args: str) -> dict[str, Any]:
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-row sum of p log(p / q) with 0 log 0 = 0, in float64."""
    out = np.zeros(p.shape[0])
    for r in range(p.shape[0]):
        for c in range(p.shape[1]):
            if p[r, c] > 0:
                out[r] += p[r, c] * (math.log(p[r, c]) - math.log(q[r, c]))
    return out


def _ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence >= lo) & ((confidence < hi) if b < bins - 1 else (confidence <= hi))
        if inside.any():
            gap = correct[inside].mean() - confidence[inside].mean()
            total += inside.sum() / len(confidence) * abs(gap)
    return total


def _stored_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.fixture
def stores(in_root: Path, tmp_path: Path) -> dict[str, Path]:
    """A dense float32 store and a top-3 float32 store (T = 1, 2) of the 300 test samples."""
    out = {}
    for name, extra in {
        "dense": {"dtype": "float32"},
        "top3": {"encoding": "topk", "top_k": 3, "dtype": "float32", "temperatures": (1.0, 2.0)},
    }.items():
        path = tmp_path / f"{name}.zarr"
        build(
            BuildConfig(
                teacher=spec("teacher"), dataset=spec("dataset"), output=str(path), **SMALL, **extra
            ),
            progress=False,
        )
        out[name] = path
    return out


def test_top_k_figures_match_a_hand_computation(stores: dict[str, Path]) -> None:
    dense = zarr.open_group(str(stores["dense"]), mode="r")
    top = zarr.open_group(str(stores["top3"]), mode="r")
    logits = np.asarray(dense["logits"][:], dtype=np.float64)
    values = np.asarray(top["topk_values"][:], dtype=np.float64)
    ids = np.asarray(top["topk_indices"][:], dtype=np.int64)
    lse = np.asarray(top["lse"][:], dtype=np.float64)
    labels = specs.labels().numpy()
    n, c = logits.shape
    for temperature, column in ((1.0, 0), (2.0, 1)):
        p = _softmax(logits / temperature)
        kept = np.exp(values / temperature - lse[:, column : column + 1])
        tail = 1.0 - kept.sum(axis=1)
        q = np.repeat((tail / (c - 3))[:, None], c, axis=1)
        for r in range(n):
            q[r, ids[r]] = kept[r]
        kl = _kl(p, q)
        got = _json(
            "fidelity",
            str(stores["top3"]),
            "--reference",
            str(stores["dense"]),
            "--dataset",
            spec("dataset"),
            "--temperature",
            str(temperature),
        )
        assert got["rows"] == n and got["reference"] == f"dense store {stores['dense']}"
        assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4, abs=1e-7)
        for q_ in (50, 90, 99):
            want = np.percentile(kl, q_)
            assert got["kl_percentiles"][f"p{q_}"] == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert got["agreement"] == pytest.approx(np.mean(q.argmax(1) == p.argmax(1)))
        mass = np.array([p[r, ids[r]].sum() for r in range(n)])
        assert got["kept_mass"] == pytest.approx(mass.mean(), rel=1e-5)
        ece = _ece(q.max(1), q.argmax(1) == labels)
        assert got["ece"] == pytest.approx(ece, abs=1e-5)
        assert got["ece_reference"] == pytest.approx(
            _ece(p.max(1), p.argmax(1) == labels), abs=1e-5
        )
        assert got["labelled"] == n
        assert got["bytes_per_unit"] > got["data_bytes_per_unit"] > 0
        assert got["data_bytes_per_unit"] == pytest.approx(
            _stored_bytes(stores["top3"]) / n, rel=0.05
        )
    assert got["kl_mean"] > 1e-4  # a top-3 of 10 classes loses something worth measuring


def test_dense_store_against_the_teacher_and_alone(stores: dict[str, Path]) -> None:
    with torch.no_grad():
        p = torch.softmax(specs.teacher()(specs.inputs()).double(), dim=1).numpy()
    stored = np.asarray(zarr.open_group(str(stores["dense"]), mode="r")["logits"][:], np.float64)
    got = _json(
        "fidelity",
        str(stores["dense"]),
        "--teacher",
        spec("teacher"),
        "--dataset",
        spec("dataset"),
        "--rows",
        "100",
        "--seed",
        "3",
    )
    rows = np.sort(np.random.default_rng(3).choice(300, size=100, replace=False))
    kl = _kl(p[rows], _softmax(stored[rows]))
    assert got["rows"] == 100 and got["reference"] == "the teacher"
    assert got["kl_mean"] == pytest.approx(kl.mean(), abs=1e-6)  # float32 store: ~0
    assert got["agreement"] == 1.0 and got["kept_mass"] == pytest.approx(1.0)
    alone = _json("fidelity", str(stores["dense"]))
    assert alone["reference"] == "the store itself"
    assert alone["kl_mean"] == pytest.approx(0.0, abs=1e-9) and alone["ece"] is None


def test_token_stores_against_the_teacher(in_root: Path, tmp_path: Path) -> None:
    teacher, dataset = ts.causal_teacher(), ts.ragged_dataset()
    with torch.no_grad():
        full = []
        for ids, _ in (dataset[i] for i in range(len(dataset))):
            if len(ids):
                full.append(teacher(ids[None])[0].double())
        p = torch.softmax(torch.cat(full), dim=1).numpy()
    labels = np.concatenate([dataset[i][1].numpy() for i in range(len(dataset))])
    for encoding, extra in (("topk", ("--top-k", "8")), ("sampled", ("--draws", "16"))):
        out = tmp_path / f"{encoding}.zarr"
        built = _run(
            "build", "--lm", "--teacher", f"{TOKEN_SPECS}:causal_teacher",
            "--dataset", f"{TOKEN_SPECS}:ragged_dataset", "--output", str(out),
            "--encoding", encoding, *extra, "--shard-rows", "64", "--device", "cpu", "--quiet",
        )  # fmt: skip
        assert built.exit_code == 0, built.output
        got = _json(
            "fidelity", str(out), "--teacher", f"{TOKEN_SPECS}:causal_teacher",
            "--dataset", f"{TOKEN_SPECS}:ragged_dataset",
        )  # fmt: skip
        assert got["layout"] == "tokens" and got["unit"] == "token"
        assert got["rows"] == len(p)  # fewer tokens than --rows: all of them
        group = zarr.open_group(str(out), mode="r")
        assert got["bytes_per_unit"] > 0
        if encoding == "sampled":
            assert got["kl_mean"] is None  # undrawn ids: infinite
            assert 0 < got["kept_mass"] <= 1
            continue
        # Top-8 rows, decoded by the store's own codec (its ids are Elias-Fano coded), rebuilt
        # here: kept bins renormalised, the residual spread over the V - 8 others.
        from softcache.store import LogitStore, decode_token_rows

        store = LogitStore.open(out)
        rows = decode_token_rows(store.read_rows(0, store.meta.num_rows), store.meta)
        vals = rows["values"].double().numpy()
        resid = rows["residual"].double().numpy()
        idx = rows["indices"].numpy()
        bins = np.exp(np.concatenate([vals, resid[:, None]], axis=1))
        bins /= bins.sum(axis=1, keepdims=True)
        q = np.repeat((bins[:, -1] / (ts.VOCAB - 8))[:, None], ts.VOCAB, axis=1)
        for r in range(len(q)):
            q[r, idx[r]] = bins[r, :-1]
        kl = _kl(p, q)
        assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-3)
        assert got["agreement"] == pytest.approx(np.mean(q.argmax(1) == p.argmax(1)))
        mass = np.array([p[r, idx[r]].sum() for r in range(len(p))])
        assert got["kept_mass"] == pytest.approx(mass.mean(), rel=1e-4)
        have = labels >= 0
        ece = _ece(q.max(1)[have], q.argmax(1)[have] == labels[have])
        assert got["ece"] == pytest.approx(ece, abs=1e-4)
        assert "token_ids" in group


def test_sweep_prints_a_frontier_and_draws_it(stores: dict[str, Path], tmp_path: Path) -> None:
    png = tmp_path / "figs" / "frontier.png"
    got = _json(
        "fidelity", str(stores["top3"]), "--reference", str(stores["dense"]),
        "--sweep", "--max-kl", "0.001", "--plot", str(png),
    )  # fmt: skip
    sweep = got["sweep"]
    assert png.is_file() and png.stat().st_size > 1000 and got["plot"] == str(png)
    cands = {c["label"]: c for c in sweep["candidates"]}
    front = [cands[label] for label in sweep["frontier"]]
    assert [c["bytes_per_unit"] for c in front] == sorted(c["bytes_per_unit"] for c in front)
    assert all(a["kl_mean"] > b["kl_mean"] for a, b in itertools.pairwise(front))
    # The sweep re-encodes the same rows: its top-3 float16 is the measured store up to rounding.
    assert cands["top-3 float16"]["kl_mean"] == pytest.approx(got["kl_mean"], rel=0.05)
    assert cands["dense float16"]["kl_mean"] < 1e-5
    rec = cands[sweep["recommended"]]
    assert rec["kl_mean"] <= 0.001
    assert all(
        c["bytes_per_unit"] >= rec["bytes_per_unit"]
        for c in cands.values()
        if c["kl_mean"] is not None and c["kl_mean"] <= 0.001
    )
    text = _run("fidelity", str(stores["top3"]), "--reference", str(stores["dense"]), "--sweep")
    assert text.exit_code == 0 and "frontier" in text.output
    assert "recommended (smallest with mean KL <= 0.01): " in text.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ((), ("top-k store", "--reference")),
        (("--temperature", "3"), ("temperatures 1, 2", "not 3")),
        (("--teacher", spec("teacher")), ("--dataset",)),
        (("--reference", "TOP"), ("dense row store",)),
        (("--sweep", "--plot", "x.png", "--reference", "DENSE"), ()),
    ],
)
def test_refusals_are_one_line(
    stores: dict[str, Path], args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    args = tuple(
        {"TOP": str(stores["top3"]), "DENSE": str(stores["dense"])}.get(a, a) for a in args
    )
    if "--plot" in args:  # --plot without --sweep is refused; here both are given: it works
        args = tuple(a for a in args if a != "--sweep")
        fragments = ("--sweep",)
    result = _run("fidelity", str(stores["top3"]), *args)
    assert result.exit_code != 0
    assert all(f in result.output for f in fragments), result.output


def test_plot_draws_training_curves(make_store: Any, tmp_path: Path) -> None:
    store, _ = make_store()
    runs = []
    for mode in ("offline", "hard"):
        out = tmp_path / mode
        result = _run(
            "train", "--student", "pipelines.digits.models:student", "--dataset", spec("dataset"),
            "--store", str(store), "--mode", mode, "--epochs", "2", "--output", str(out),
            "--eval-dataset", spec("dataset"), "--quiet",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs.append(str(out))
    png = tmp_path / "curves.png"
    result = _run("plot", *runs, "-o", str(png), "--title", "two runs")
    assert result.exit_code == 0, result.output
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = _run("plot", str(tmp_path / "nothing"), "-o", str(png))
    assert missing.exit_code == 1 and "metrics.json" in missing.output
