"""`softcache merge`: an ensemble of two different teachers over one dataset, checked against the
weighted mean of the sources' probabilities computed here with numpy from the sources' stored logits.

Error bound used throughout. The merged store keeps `log p` (p the mixture, computed in float64),
cast to float32 and then rounded to float16. Double rounding to float16 moves a value x by at most
(2^-11 + 2^-24)|x| where x is normal, and by at most 2^-25 in float16's subnormal range (|x| < 2^-14,
the top class's log p can be that close to 0). So each stored logit is off by at most

    eps_j = (2^-11 + 2^-24) |log p_j| + 2^-25.

softmax renormalises the rounded row: log softmax(M)_i = log p_i + d_i - log(sum_j p_j e^(d_j)) with
|d_j| <= eps_j, and by Jensen |log(sum_j p_j e^(d_j))| <= log(sum_j p_j e^(eps_j)). Hence

    |log softmax(M)_i - log p_i| <= eps_i + log(sum_j p_j e^(eps_j)),

a bound in log space, i.e. on the relative error of each probability. It is tight (the observed error
reaches about 90 % of it) and the wrong weights break it on almost every row (checked below).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner, Result

from softcache.builder import build
from softcache.cli import main
from softcache.config import BuildConfig, TrainConfig
from softcache.store import ATTR_KEY, LogitStore
from softcache.trainer import train
from tests.conftest import ROOT, SMALL, spec
from tests.helpers import snapshot

SHARE = "tests.helpers.share_specs"
TEACHER_A = spec("teacher")
TEACHER_B = f"{SHARE}:second_teacher"
STUDENT = "pipelines.digits.models:student"
N = 300


def _merge(*args: str) -> Result:
    return CliRunner().invoke(main, ["merge", *args, "-q"])


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Read-only source stores: two teachers over `specs:dataset` (dense float16), the first teacher
    over the same samples in another order, and a top-k store without a T = 1 normaliser."""
    base = tmp_path_factory.mktemp("sources")
    configs = {
        "a": {"teacher": TEACHER_A},
        "b": {"teacher": TEACHER_B},
        "swapped": {"teacher": TEACHER_A, "dataset": f"{SHARE}:swapped_dataset"},
        "topk_no_t1": {
            "teacher": TEACHER_B,
            "encoding": "topk",
            "top_k": 3,
            "temperatures": (2.0, 4.0),
        },
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.delenv("SOFTCACHE_TEST_N", raising=False)
        out = {}
        for name, extra in configs.items():
            path = base / f"{name}.zarr"
            values = {"dataset": spec("dataset"), **SMALL, "dtype": "float16", **extra}
            build(BuildConfig(output=str(path), **values), progress=False)
            out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def merged(sources: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Read-only merged stores of sources a and b: dense 3:1, top-3 3:1, dense with equal weights."""
    base = tmp_path_factory.mktemp("merged")
    runs = {
        "dense": ["--weights", "3,1"],
        "topk": ["--weights", "3,1", "--encoding", "topk", "--top-k", "3"],
        "equal": [],
    }
    out = {}
    for name, extra in runs.items():
        path = str(base / f"{name}.zarr")
        result = _merge(sources["a"], sources["b"], "--output", path, *extra)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0].split() == ["store", path]
        out[name] = path
    return out


# ---- reference values ---------------------------------------------------------------------------


def _array(path: str, name: str) -> np.ndarray:
    return zarr.open_group(path, mode="r")[name][:]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _mixture(sources: dict[str, str], wa: float, wb: float) -> np.ndarray:
    """(N, C) float64: wa softmax(A) + wb softmax(B), from the sources' stored float16 logits."""
    pa = _softmax(_array(sources["a"], "logits").astype(np.float64))
    pb = _softmax(_array(sources["b"], "logits").astype(np.float64))
    return wa * pa + wb * pb


def _eps(log_p: np.ndarray) -> np.ndarray:
    """Largest change of a stored log-probability by its float32 -> float16 rounding."""
    return (2.0**-11 + 2.0**-24) * np.abs(log_p) + 2.0**-25


def _within_fp16(stored_logits: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(N, C) bool: softmax of the stored row is within the module docstring's bound of p."""
    z = stored_logits.astype(np.float64)
    log_q = z - z.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    log_p = np.log(p)
    eps = _eps(log_p)
    bound = eps + np.log((p * np.exp(eps)).sum(axis=1, keepdims=True))
    return np.abs(log_q - log_p) <= bound + 1e-12  # 1e-12: float64 evaluation here


# ---- the merged probabilities ---------------------------------------------------------------------


def test_sources_are_different_teachers(sources):
    pa = _mixture(sources, 1.0, 0.0)
    pb = _mixture(sources, 0.0, 1.0)
    # Otherwise every weighting would pass the tests below.
    assert (pa.argmax(axis=1) != pb.argmax(axis=1)).mean() > 0.5
    assert np.abs(pa - pb).max(axis=1).min() > 0.05


def test_dense_merge_is_the_weighted_mean_of_probabilities(sources, merged):
    stored = _array(merged["dense"], "logits")
    assert stored.dtype == np.float16 and stored.shape == (N, 10)
    ok = _within_fp16(stored, _mixture(sources, 0.75, 0.25))
    assert ok.all(), f"{(~ok).sum()} entries outside the fp16 bound, first at {np.argwhere(~ok)[0]}"
    # The check discriminates: the mirrored weights (1:3) fail it on almost every row.
    assert (~_within_fp16(stored, _mixture(sources, 0.25, 0.75))).any(axis=1).mean() > 0.9


def test_default_weights_are_equal(sources, merged):
    ok = _within_fp16(_array(merged["equal"], "logits"), _mixture(sources, 0.5, 0.5))
    assert ok.all(), f"{(~ok).sum()} entries outside the fp16 bound"
    info = LogitStore.open(merged["equal"]).meta.teacher
    assert [m["weight"] for m in info["members"]] == [0.5, 0.5]


def test_topk_merge_keeps_the_mixtures_top_probabilities(sources, merged):
    store = LogitStore.open(merged["topk"])
    meta = store.meta
    assert (meta.encoding, meta.k, meta.temperatures) == ("topk", 3, (1.0, 2.0, 4.0))
    values = _array(merged["topk"], "topk_values").astype(np.float64)
    indices = _array(merged["topk"], "topk_indices").astype(np.int64)
    lse = _array(merged["topk"], "lse").astype(np.float64)
    log_p = np.log(_mixture(sources, 0.75, 0.25))

    # The merged row is log p, already normalised: its T = 1 log-sum-exp is log 1 = 0, up to the
    # float32 arithmetic it is computed in (C = 10 terms, each rounded to 2^-24).
    lse1 = lse[:, meta.temperatures.index(1.0)]
    assert np.abs(lse1).max() <= 2.0**-19
    # Other temperatures: logsumexp(log p / T), float32 against float64 here.
    for t in (2.0, 4.0):
        want = np.log(np.exp(log_p / t).sum(axis=1))
        np.testing.assert_allclose(lse[:, meta.temperatures.index(t)], want, atol=2.0**-16)

    # Kept probabilities exp(v - lse_1) are the mixture's at the stored indices: each value is one
    # float16 rounding of log p, plus the normaliser's float32 error.
    at_indices = np.take_along_axis(log_p, indices, axis=1)
    kept = values - lse1[:, None]
    assert (np.abs(kept - at_indices) <= _eps(at_indices) + np.abs(lse1)[:, None] + 1e-12).all()

    # The stored indices hold the 3 largest probabilities, in descending order. Ties: the merge
    # ranks float32 log p, so classes closer than float32 rounding may come in either order; their
    # probabilities still match, and indices must match exactly wherever the ranking is clear.
    ranked = np.sort(log_p, axis=1)[:, ::-1]
    np.testing.assert_allclose(at_indices, ranked[:, :3], rtol=1e-6, atol=1e-6)
    clear = (np.diff(ranked[:, :4], axis=1) < -1e-5).all(axis=1)
    assert clear.mean() > 0.9
    order = np.argsort(-log_p, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(indices[clear], order[clear])


def test_merged_store_records_its_sources_and_dataset(sources, merged):
    meta = LogitStore.open(merged["dense"]).meta
    assert meta.complete
    assert meta.build_config["merge"]["sources"] == [sources["a"], sources["b"]]
    assert meta.build_config["merge"]["weights"] == [0.75, 0.25]
    a = LogitStore.open(sources["a"]).meta
    assert meta.dataset == a.dataset  # spec, size and fingerprint of the shared dataset
    np.testing.assert_array_equal(
        _array(merged["dense"], "sample_hash"), _array(sources["a"], "sample_hash")
    )


def test_merged_store_passes_verify(merged, in_root):
    for name in ("dense", "topk"):
        result = CliRunner().invoke(
            main, ["verify", merged[name], "--dataset", spec("dataset"), "-q"]
        )
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"OK  {merged[name]}: 5 shards")


def test_info_shows_the_ensemble_teacher(sources, merged):
    result = CliRunner().invoke(main, ["info", merged["dense"]])
    assert result.exit_code == 0, result.output
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines())
    assert rows["teacher"] == f"ensemble({TEACHER_A}, {TEACHER_B}) (1,300 parameters)"
    assert rows["status"] == "complete"

    result = CliRunner().invoke(main, ["info", merged["dense"], "--json"])
    teacher = json.loads(result.stdout)["teacher"]
    assert [(m["store"], m["spec"], m["weight"]) for m in teacher["members"]] == [
        (sources["a"], TEACHER_A, 0.75),
        (sources["b"], TEACHER_B, 0.25),
    ]
    shas = [
        LogitStore.open(s).meta.teacher["state_dict_sha256"] for s in (sources["a"], sources["b"])
    ]
    assert [m["state_dict_sha256"] for m in teacher["members"]] == shas
    assert shas[0] != shas[1]


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_student_trains_from_the_merged_store(sources, merged, in_root, tmp_path, kind):
    def run(store: str, out: str):
        config = TrainConfig(
            mode="offline",
            store=store,
            student=STUDENT,
            dataset=spec("dataset"),
            epochs=1,
            device="cpu",
            output=str(tmp_path / out),
        )
        return train(config, progress=False).metrics

    metrics = run(merged[kind], "merged")
    assert len(metrics["train_loss"]) == 1 and np.isfinite(metrics["train_loss"][0])
    assert (tmp_path / "merged" / "metrics.json").is_file()
    # Same seed, same data order, other targets: the first step's loss shows the merged store's
    # soft labels were the ones trained on.
    assert metrics["first_step_loss"] != run(sources["a"], "a")["first_step_loss"]


# ---- refusals ------------------------------------------------------------------------------------


def _refused(result: Result, output: Path) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and "Traceback" not in result.output
    assert not output.exists()
    return lines[0]


def test_stores_of_different_datasets_are_refused(sources, tmp_path):
    out = tmp_path / "m.zarr"
    line = _refused(_merge(sources["a"], sources["swapped"], "--output", str(out)), out)
    assert f"{sources['swapped']} was built from another dataset than {sources['a']}" in line
    for name in ("a", "swapped"):
        fp = LogitStore.open(sources[name]).meta.dataset["fingerprint"]
        assert fp in line


@pytest.mark.parametrize(
    ("weights", "got"),
    [("1,2,3", "[1.0, 2.0, 3.0]"), ("1", "[1.0]"), ("1,-1", "[1.0, -1.0]"), ("0,0", "[0.0, 0.0]")],
)
def test_bad_weights_are_refused(sources, tmp_path, weights, got):
    out = tmp_path / "m.zarr"
    line = _refused(
        _merge(sources["a"], sources["b"], "--output", str(out), "--weights", weights), out
    )
    assert line == f"Error: --weights needs 2 non-negative numbers with a positive sum, got {got}"


def test_non_numeric_weights_are_a_usage_error(sources, tmp_path):
    out = tmp_path / "m.zarr"
    result = _merge(sources["a"], sources["b"], "--output", str(out), "--weights", "1,x")
    assert result.exit_code == 2
    assert "expected comma-separated numbers" in result.output
    assert not out.exists()


def test_topk_source_without_t1_normaliser_is_refused(sources, tmp_path):
    out = tmp_path / "m.zarr"
    line = _refused(_merge(sources["a"], sources["topk_no_t1"], "--output", str(out)), out)
    assert f"{sources['topk_no_t1']} is top-k without a normaliser at T = 1" in line


def test_other_refusals(sources, tmp_path):
    out = tmp_path / "m.zarr"
    line = _refused(_merge(sources["a"], "--output", str(out)), out)
    assert line == "Error: merge needs at least two source stores"
    line = _refused(
        _merge(sources["a"], sources["b"], "-o", str(out), "--encoding", "topk", "--top-k", "11"),
        out,
    )
    assert line == "Error: --top-k 11 exceeds the 10 classes"


def test_incomplete_source_is_refused(sources, tmp_path):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(sources["a"], partial)
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs[ATTR_KEY] = {**group.attrs[ATTR_KEY], "complete": False}
    out = tmp_path / "m.zarr"
    line = _refused(_merge(str(partial), sources["b"], "--output", str(out)), out)
    assert line.startswith(f"Error: store {partial} is incomplete (5 of 5 shards written)")


def test_existing_merged_store_is_not_overwritten(sources, merged):
    before = snapshot(Path(merged["dense"]))
    result = _merge(sources["a"], sources["b"], "--output", merged["dense"], "--weights", "1,1")
    assert result.exit_code == 1
    assert "already a complete store; pass --overwrite" in result.output
    assert snapshot(Path(merged["dense"])) == before
