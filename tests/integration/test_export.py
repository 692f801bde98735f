"""The axolotl export (`softcache.tools.export`), read back with `datasets.load_from_disk`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import softcache
from softcache.errors import ConfigError, DatasetMismatchError
from softcache.store import decode_token_rows
from softcache.tools.export import export_axolotl
from tests.helpers import ROOT
from tests.helpers import token_specs as data

datasets = pytest.importorskip("datasets")


def _build(out: Path, encoding: str, **extra: int) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        softcache.build(
            softcache.BuildConfig(
                teacher="tests.helpers.token_specs:causal_teacher",
                dataset="tests.helpers.token_specs:ragged_dataset",
                output=str(out), lm=True, encoding=encoding, shard_rows=16, batch_size=3,
                device="cpu", **extra,
            ),
            progress=False,
        )  # fmt: skip
    return out


def test_axolotl_export_reads_back_as_the_stores_rows(tmp_path: Path) -> None:
    store = softcache.open_store(str(_build(tmp_path / "top8.zarr", "topk", top_k=8)))
    written = export_axolotl(store, data.ragged_dataset(), tmp_path / "axolotl")
    table = datasets.load_from_disk(str(tmp_path / "axolotl"))
    assert written == len(table) == store.meta.num_samples
    offsets = store.offsets()
    rows = decode_token_rows(store.read_rows(0, store.meta.num_rows), store.meta)
    for i, ids in enumerate(data.sequences()):
        item = table[i]
        n = len(ids)
        assert item["input_ids"] == ids.tolist() == item["labels"]
        assert len(item["target_token_ids"]) == len(item["target_logprobs"]) == n
        if n == 0:
            continue
        # axolotl position p is the distribution of token p: softcache row p - 1.
        assert item["target_mask"][0] == [0] * 8 and all(
            m == [1] * 8 for m in item["target_mask"][1:]
        )
        kept = slice(offsets[i], offsets[i + 1] - 1)
        assert item["target_token_ids"][1:] == rows["indices"][kept].tolist()
        values = rows["values"][kept]
        expected = values - torch.logsumexp(values, dim=1, keepdim=True)
        got = np.array(item["target_logprobs"][1:], dtype=np.float32).reshape(-1, 8)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.exp(got).sum(1), 1.0, rtol=1e-5)


def test_axolotl_export_refuses_sampled_stores_and_other_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampled = softcache.open_store(str(_build(tmp_path / "s.zarr", "sampled", draws=6)))
    with pytest.raises(ConfigError, match="top-k token store"):
        export_axolotl(sampled, data.ragged_dataset(), tmp_path / "a")
    topk = softcache.open_store(str(_build(tmp_path / "t.zarr", "topk", top_k=4)))
    monkeypatch.setenv("SOFTCACHE_TEST_LM_VARIANT", "token")
    with pytest.raises(DatasetMismatchError, match=f"sample {data.CHANGED_SAMPLE} "):
        export_axolotl(topk, data.ragged_dataset(), tmp_path / "b")


def test_export_axolotl_on_the_command_line(tmp_path: Path) -> None:
    """`softcache export-axolotl`: the library's export, read back; an earlier export is
    replaced only with --overwrite, and a sampled store is one line of error."""
    from click.testing import CliRunner

    from softcache.cli import main
    from tests.helpers import one_line_error

    path = _build(tmp_path / "top4.zarr", "topk", top_k=4)
    out = tmp_path / "axolotl"
    args = [
        "export-axolotl", str(path), "--dataset", "tests.helpers.token_specs:ragged_dataset",
        "--output", str(out), "--json",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        runner = CliRunner()
        help_text = runner.invoke(main, ["export-axolotl", "--help"]).output
        first = runner.invoke(main, args)
        again = runner.invoke(main, args)
        replaced = runner.invoke(main, [*args, "--overwrite"])
        sampled = _build(tmp_path / "s.zarr", "sampled", draws=6)
        refused = runner.invoke(main, [*args[:1], str(sampled), *args[2:5], str(tmp_path / "s")])
    assert "target_logprobs" in help_text and "load_from_disk" in help_text
    assert first.exit_code == 0, first.output
    assert '"samples": ' in first.output
    one_line_error(again, "already exists; pass --overwrite")
    assert replaced.exit_code == 0, replaced.output
    store = softcache.open_store(str(path))
    table = datasets.load_from_disk(str(out))
    assert len(table) == store.meta.num_samples
    offsets = store.offsets()
    rows = decode_token_rows(store.read_rows(0, store.meta.num_rows), store.meta)
    for i, ids in enumerate(data.sequences()):
        assert table[i]["input_ids"] == ids.tolist()
        if len(ids) > 1:
            kept = slice(offsets[i], offsets[i + 1] - 1)
            assert table[i]["target_token_ids"][1:] == rows["indices"][kept].tolist()
    one_line_error(refused, "top-k token store")
