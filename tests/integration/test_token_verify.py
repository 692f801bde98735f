"""`softcache info`, `ls` and `verify` on per-token stores (format_version 3), and docs/FORMAT.md's
decoding recipes, proven on real stores.

The stores are built through the CLI from `tests.helpers.token_verify_specs` (40 ragged sequences,
3 of them empty, in a 300-token vocabulary; 592 tokens, so shards of 64 tokens make 10 shards, the
last one short). Damage is done to copies, directly on the files or through plain zarr, as a bad
disk, a failed copy or a stray write would leave them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner, Result

from softcache.cli import main
from softcache.store import ATTR_KEY, TOKENS_FORMAT_VERSION, LogitStore, decode_token_rows
from tests.helpers import token_verify_specs as ts

ROOT = Path(__file__).resolve().parents[2]
SPECS = "tests.helpers.token_verify_specs"
SHARD, CHUNK = 64, 16
NUM_TOKENS = sum(len(s) for s in ts.sequences())
SHARDS = -(-NUM_TOKENS // SHARD)

# name -> extra build options
KINDS: dict[str, list[str]] = {
    "topk": ["--encoding", "topk", "--top-k", "8", "--value-bits", "7"],
    "coarse": ["--encoding", "topk", "--top-k", "16", "--value-bits", "2", "--id-coding", "plain"],
    "float16": ["--encoding", "topk", "--top-k", "8"],
    "full": ["--encoding", "topk", "--top-k", str(ts.VOCAB)],  # k = V: no tail, L = 0
    "sampled": ["--encoding", "sampled", "--draws", "12"],
    "sampled_plain": ["--encoding", "sampled", "--draws", "12", "--id-coding", "plain"],
}
TOPK_ARRAYS = ["token_ids", "token_residual", "token_values"]
SAMPLED_ARRAYS = ["token_counts", "token_entropy", "token_ids"]


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _verify(*args: str) -> Result:
    return _run("verify", *args, "-q")


@pytest.fixture(scope="module")
def token_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Read-only token stores shared by this module, one per `KINDS` entry."""
    base = tmp_path_factory.mktemp("token_stores")
    stores = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        for name, extra in KINDS.items():
            out = base / f"{name}.zarr"
            args = ["build", "--lm", "--teacher", f"{SPECS}:teacher"]
            args += ["--dataset", f"{SPECS}:dataset", "-o", str(out), "--shard-rows", str(SHARD)]
            args += ["--chunk-rows", str(CHUNK), "--batch-size", "8", "--device", "cpu", "-q"]
            result = _run(*args, *extra)
            assert result.exit_code == 0, result.output
            stores[name] = out
    yield stores


def _copy(store: Path, tmp_path: Path) -> Path:
    out = tmp_path / store.name
    shutil.copytree(store, out)
    return out


def _offsets(store: Path) -> np.ndarray:
    return zarr.open_group(str(store), mode="r")["offsets"][:]


def _rewritten(lines: list[str], key: str) -> list[str]:
    """`lines` without the one that names `key`, an object rewritten through zarr (a valid
    checksum, so only the manifest tells), which must be there exactly once."""
    named = [line for line in lines if line.startswith(f"object {key} does not match the manifest")]
    assert len(named) == 1, lines
    return [line for line in lines if line not in named]


def _fail_lines(store: Path, *args: str) -> list[str]:
    """`verify`'s FAIL lines (it must fail, with nothing on stdout and no traceback)."""
    result = _verify(str(store), *args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert all(line.startswith("FAIL  ") for line in lines), lines
    return [line.removeprefix("FAIL  ") for line in lines]


def _samples_of(store: Path, start: int, stop: int) -> str:
    """``samples a..b``: the samples owning the first and last token of rows [start, stop)."""
    offsets = _offsets(store)
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop - 1, side="right")) - 1
    return f"samples {first}..{last}"


# ---- info and ls --------------------------------------------------------------------------------


def _bytes_on_disk(store: Path) -> int:
    return sum(
        p.stat().st_size for d in store.iterdir() if d.is_dir() for p in d.rglob("*") if p.is_file()
    )


@pytest.mark.parametrize(
    ("kind", "encoding", "width", "ids", "value_bits", "row_bytes"),
    [
        # Elias-Fano: L = floor(log2(300 / 8)) = 5, 8 * 6 + (299 >> 5) + 1 = 58 bits = 8 B; 8
        # uint8 sqrt codes; a uint8 log code
        ("topk", "topk", 8, "elias_fano", 7, 8 + 8 + 1),
        # L = 4: 12 * 5 + (299 >> 4) + 1 = 79 bits = 10 B; 12 uint8 counts; a float16 entropy
        ("sampled", "sampled", 12, "elias_fano", 0, 10 + 12 + 2),
        # 16 uint16 ids, 16 uint8 codes, a uint8 log code
        ("coarse", "topk", 16, "plain", 2, 32 + 16 + 1),
    ],
)
def test_info_json_describes_the_token_store(
    token_stores, kind, encoding, width, ids, value_bits, row_bytes
):
    store = token_stores[kind]
    result = _run("info", str(store), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format_version"] == TOKENS_FORMAT_VERSION
    assert info["layout"] == "tokens"
    assert info["complete"] is True
    assert (info["shards_done"], info["shards_total"]) == (SHARDS, SHARDS)
    assert (info["num_samples"], info["num_tokens"]) == (ts.NUM_SEQUENCES, NUM_TOKENS)
    assert info["tokens_per_sample"] == pytest.approx(NUM_TOKENS / ts.NUM_SEQUENCES)
    codec = info["token_codec"]
    assert (codec["encoding"], codec["width"], codec["vocab_size"]) == (encoding, width, ts.VOCAB)
    assert (codec["ids"], codec["value_bits"], codec["temperature"]) == (ids, value_bits, 1.0)
    assert info["bytes_per_token_raw"] == row_bytes
    stored = _bytes_on_disk(store)
    assert info["bytes_stored"] == stored
    assert info["bytes_per_token"] == pytest.approx(stored / NUM_TOKENS)
    assert info["compression_ratio"] == pytest.approx(NUM_TOKENS * row_bytes / stored)


def _table(output: str) -> dict[str, str]:
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in output.splitlines())


@pytest.mark.parametrize(
    ("kind", "encoding"),
    [
        ("topk", "topk (k=8, 7-bit sqrt values, 8-bit log residual (floor -16), ids elias_fano)"),
        ("float16", "topk (k=8, float16 log-probabilities, ids elias_fano)"),
        ("sampled", "sampled (12 draws, ids elias_fano)"),
        ("sampled_plain", "sampled (12 draws, ids plain)"),
    ],
)
def test_info_table_shows_the_token_fields(token_stores, kind, encoding):
    store = token_stores[kind]
    result = _run("info", str(store))
    assert result.exit_code == 0, result.output
    rows = _table(result.stdout)
    info = json.loads(_run("info", str(store), "--json").stdout)
    assert rows["layout"] == "tokens (one row per token)"
    assert rows["encoding"] == encoding
    assert rows["vocabulary"] == f"{ts.VOCAB} tokens"
    assert rows["temperature"] == "1"
    assert rows["samples"] == (
        f"{ts.NUM_SEQUENCES} ({NUM_TOKENS} tokens, {NUM_TOKENS / ts.NUM_SEQUENCES:.1f} per "
        f"sample), shards of {SHARD} tokens"
    )
    assert rows["bytes on disk"] == (
        f"{info['bytes_stored']:,} ({info['bytes_stored'] / NUM_TOKENS:,.1f} B/token, "
        f"{info['bytes_per_token_raw']} B/token uncompressed)"
    )
    assert rows["format"] == f"version {TOKENS_FORMAT_VERSION}"
    assert "augmentation" not in rows  # row-store lines that mean nothing here


def test_ls_line_of_token_stores(token_stores, tmp_path):
    root = tmp_path / "shelf"
    root.mkdir()
    for kind in ("topk", "sampled"):
        shutil.copytree(token_stores[kind], root / f"{kind}.zarr")
    result = _run("ls", str(root))
    assert result.exit_code == 0, result.output
    lines = {Path(line.split("  ")[0]).name: line for line in result.stdout.splitlines()}
    for kind, what in (("topk", "topk-8 sqrt7"), ("sampled", "sampled-12 counts")):
        per_token = _bytes_on_disk(root / f"{kind}.zarr") / NUM_TOKENS
        assert lines[f"{kind}.zarr"] == (
            f"{root / f'{kind}.zarr'}  tokens {what}  {ts.NUM_SEQUENCES} samples  "
            f"{NUM_TOKENS} tokens  {ts.VOCAB} vocab  {per_token:,.1f} B/token  complete  "
            f"teacher={SPECS}:teacher  dataset={SPECS}:dataset"
        )


def _state(root: Path) -> dict[str, tuple[bytes | None, int]]:
    entries = [root, *sorted(root.rglob("*"))]
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in entries
    }


def test_info_verify_and_ls_never_write_a_token_store(token_stores, tmp_path, in_root):
    store = shutil.copytree(token_stores["sampled"], tmp_path / "sampled.zarr")
    before = _state(tmp_path)
    for args in (["info"], ["info", "--json"], ["verify", "-q"], ["verify", "-q", "--json"]):
        assert _run(*args, str(store)).exit_code == 0
    assert _verify(str(store), "--dataset", f"{SPECS}:dataset").exit_code == 0
    assert _verify(str(store), "--dataset", f"{SPECS}:changed_dataset").exit_code == 1
    assert _run("ls", str(tmp_path)).exit_code == 0
    assert _state(tmp_path) == before


# ---- verify: good stores ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_good_token_store_passes_and_matches_its_dataset(token_stores, in_root, kind):
    store = token_stores[kind]
    result = _verify(str(store))
    assert result.exit_code == 0, result.output
    digest = LogitStore.open(store).digest
    objects = LogitStore.open(store).meta.manifest["objects"]
    assert result.stdout.strip() == (
        f"OK  {store}: {SHARDS} shards of 6 arrays verified, {objects} objects match digest {digest}"
    )
    result = _verify(str(store), "--dataset", f"{SPECS}:dataset")
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith(f", {ts.NUM_SEQUENCES} samples match {SPECS}:dataset")


def test_good_token_store_json_report(token_stores, in_root):
    result = _verify(str(token_stores["sampled"]), "--json", "--dataset", f"{SPECS}:dataset")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["checked"]["format_version"] == TOKENS_FORMAT_VERSION
    assert report["checked"]["shards"] == SHARDS
    assert report["checked"]["arrays"] == sorted(
        [*SAMPLED_ARRAYS, "offsets", "sample_hash", "shard_done"]
    )
    assert report["checked"]["dataset"] == {
        "spec": f"{SPECS}:dataset",
        "num_samples": ts.NUM_SEQUENCES,
        "num_tokens": NUM_TOKENS,
    }


# ---- verify: damaged token arrays ---------------------------------------------------------------


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _write(name: str, index: Any, value: Any) -> Callable[[Path], None]:
    """Write through zarr itself: the chunk stays valid, its content is wrong."""

    def damage(store: Path) -> None:
        zarr.open_group(str(store), mode="r+")[name][index] = value

    return damage


# (store kind, array, shard, file to damage (None: the store), damage, text after the `where`)
SHARD_DAMAGE = {
    "flipped-byte-ids": (
        "topk",
        "token_ids",
        2,
        "token_ids/c/2/0",
        _flip_middle_byte,
        "cannot be read",
    ),
    "flipped-byte-residual": (
        "topk",
        "token_residual",
        3,
        "token_residual/c/3",
        _flip_middle_byte,
        "cannot be read",
    ),
    "flipped-byte-counts": (
        "sampled",
        "token_counts",
        9,
        "token_counts/c/9/0",
        _flip_middle_byte,
        "cannot be read",
    ),
    "deleted-values-shard": (
        "float16",
        "token_values",
        4,
        "token_values/c/4/0",
        os.remove,
        "object token_values/c/4/0 is missing",
    ),
    "nan-value": (
        "float16",
        "token_values",
        1,
        None,
        _write("token_values", (70, 3), np.float16("nan")),
        "holds NaN or +inf log-probabilities",
    ),
    "inf-entropy": (
        "sampled",
        "token_entropy",
        5,
        None,
        _write("token_entropy", 330, np.float16("inf")),
        "holds non-finite values",
    ),
    "wrong-counts": (
        "sampled",
        "token_counts",
        6,
        None,
        _write("token_counts", (400, 0), 200),
        "1 row(s) whose counts do not add up to the 12 draws",
    ),
}


@pytest.mark.parametrize("case", list(SHARD_DAMAGE))
def test_token_shard_damage_is_named_with_array_shard_and_samples(token_stores, tmp_path, case):
    kind, name, shard, target, damage, fragment = SHARD_DAMAGE[case]
    store = _copy(token_stores[kind], tmp_path)
    damage(store / target if target else store)
    start, stop = shard * SHARD, min((shard + 1) * SHARD, NUM_TOKENS)
    lines = _fail_lines(store)
    if target is None:  # written through zarr: the manifest names the object, once
        arr = zarr.open_array(str(store / name), mode="r")
        lines = _rewritten(lines, f"{name}/c/{shard}" + ("/0" if arr.ndim == 2 else ""))
    assert len(lines) == 1, lines  # exactly the damage, nothing else flagged
    where = (
        f"array {name}, shard {shard} (tokens {start}..{stop - 1} of "
        f"{_samples_of(store, start, stop)}): "
    )
    assert lines[0].startswith(where + fragment), lines[0]
    if case.startswith("flipped"):
        assert "checksum" in lines[0]


def test_k_equal_v_residual_of_minus_inf_is_not_damage(token_stores):
    """k = V leaves no tail: the float16 residual is -inf (probability 0), which is valid."""
    residual = zarr.open_group(str(token_stores["full"]), mode="r")["token_residual"][:]
    assert np.isneginf(residual).all()
    assert _verify(str(token_stores["full"])).exit_code == 0


# ---- verify: damaged per-sample arrays ----------------------------------------------------------


def test_flipped_byte_in_offsets_is_reported(token_stores, tmp_path):
    store = _copy(token_stores["topk"], tmp_path)
    _flip_middle_byte(store / "offsets/c/0")
    lines = _fail_lines(store)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"array offsets, chunk 0 (entries 0..{ts.NUM_SEQUENCES}): cannot be read"
    )
    assert "checksum" in lines[0]


def test_deleted_offsets_chunk_is_reported(token_stores, tmp_path, in_root):
    store = _copy(token_stores["sampled"], tmp_path)
    os.remove(store / "offsets/c/0")
    lines = _fail_lines(store, "--dataset", f"{SPECS}:dataset")
    # Without offsets there are no lengths to compare; the hashes still match.
    assert lines == [
        f"array offsets, chunk 0 (entries 0..{ts.NUM_SEQUENCES}): object offsets/c/0 is missing"
    ]


@pytest.mark.parametrize(
    ("index", "value", "found"),
    [
        (7, 10_000, "1 decreasing step(s)"),  # a bad value inside: offsets no longer rise
        (-1, NUM_TOKENS + 5, f"got 0 .. {NUM_TOKENS + 5}"),  # the end is not num_tokens
    ],
)
def test_invalid_offsets_are_reported_not_a_crash(token_stores, tmp_path, index, value, found):
    store = _copy(token_stores["topk"], tmp_path)
    _write("offsets", index, value)(store)
    lines = _rewritten(_fail_lines(store), "offsets/c/0")
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"array offsets: offsets must rise from 0 to num_tokens = {NUM_TOKENS}"
    )
    assert found in lines[0]
    assert "restore the store from a good copy or rebuild it" in lines[0]
    # The shards themselves are fine, and named by tokens only (no trusted sample index).
    assert "shard" not in lines[0]


def test_offsets_of_the_wrong_shape_are_one_layout_problem(token_stores, tmp_path):
    store = _copy(token_stores["topk"], tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    good = group["offsets"][:]
    del group["offsets"]
    group.create_array("offsets", data=good[:-1])
    lines = _fail_lines(store)
    # Refused by the metadata checks every reader runs, before any data is read.
    assert lines == [
        f"store {store}: offsets/zarr.json: shape is [{ts.NUM_SEQUENCES}]; expected "
        f"[{ts.NUM_SEQUENCES + 1}] (per sample, from the softcache attribute)"
    ]


def test_shifted_offsets_are_caught_against_the_dataset(token_stores, tmp_path, in_root):
    """A boundary moved by one token is still a valid index: the fingerprint and the dataset's
    lengths tell."""
    store = _copy(token_stores["topk"], tmp_path)
    offsets = _offsets(store)
    _write("offsets", 3, offsets[3] + 1)(store)
    fingerprint_line = (
        "sample_hash and offsets do not reproduce the recorded dataset fingerprint: they were "
        "altered after the build"
    )
    # offsets are in the fingerprint
    assert _rewritten(_fail_lines(store), "offsets/c/0") == [fingerprint_line]
    lengths = np.diff(offsets)
    lines = _rewritten(_fail_lines(store, "--dataset", f"{SPECS}:dataset"), "offsets/c/0")
    assert lines == [
        fingerprint_line,
        f"2 dataset sample(s) differ in length from the store: indices 2 ({lengths[2]} tokens, "
        f"stored {lengths[2] + 1}), 3 ({lengths[3]} tokens, stored {lengths[3] - 1}); the dataset "
        "was reordered or changed since the build",
    ]


def test_flipped_byte_in_sample_hash_is_reported(token_stores, tmp_path):
    store = _copy(token_stores["topk"], tmp_path)
    _flip_middle_byte(store / "sample_hash/c/0")
    lines = _fail_lines(store)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"array sample_hash, chunk 0 (samples 0..{ts.NUM_SEQUENCES - 1}): cannot be read"
    )


def test_altered_sample_hash_breaks_the_fingerprint(token_stores, tmp_path):
    store = _copy(token_stores["sampled"], tmp_path)
    _write("sample_hash", 5, 12345)(store)
    assert _rewritten(_fail_lines(store), "sample_hash/c/0") == [
        "sample_hash and offsets do not reproduce the recorded dataset fingerprint: they were "
        "altered after the build"
    ]


def test_missing_offsets_array_is_one_line(token_stores, tmp_path):
    store = _copy(token_stores["topk"], tmp_path)
    shutil.rmtree(store / "offsets")
    lines = _fail_lines(store)
    assert len(lines) == 1 and "missing array(s) offsets" in lines[0], lines


def test_unfinished_token_store_names_the_unwritten_shard(token_stores, tmp_path):
    store = _copy(token_stores["topk"], tmp_path)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs[ATTR_KEY] = {**group.attrs[ATTR_KEY], "complete": False}
    group["shard_done"][3] = 0
    assert _fail_lines(store) == [
        f"build incomplete: {SHARDS - 1} of {SHARDS} shards written (complete is unset)",
        f"shard 3 (tokens 192..255 of {_samples_of(store, 192, 256)}) is not recorded as written "
        "in shard_done",
    ]


# ---- verify: the wrong dataset ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_changed_tokens_are_named(token_stores, in_root, kind):
    lines = _fail_lines(token_stores[kind], "--dataset", f"{SPECS}:changed_dataset")
    assert lines == [
        f"1 dataset sample(s) do not match the store (other tokens): indices {ts.CHANGED_SAMPLE}; "
        "the dataset was reordered or changed since the build"
    ]


def test_changed_lengths_are_named_with_both_lengths(token_stores, in_root):
    lengths = [len(s) for s in ts.sequences()]
    a, b = ts.LONGER_SAMPLE, ts.SHORTER_SAMPLE
    lines = _fail_lines(token_stores["topk"], "--dataset", f"{SPECS}:length_changed_dataset")
    # The same total: only the per-sample lengths differ. Each is reported once, by length.
    assert lines == [
        f"2 dataset sample(s) differ in length from the store: indices {a} ({lengths[a] + 1} "
        f"tokens, stored {lengths[a]}), {b} ({lengths[b] - 1} tokens, stored {lengths[b]}); the "
        "dataset was reordered or changed since the build"
    ]


def test_dataset_with_fewer_samples(token_stores, in_root):
    assert _fail_lines(token_stores["sampled"], "--dataset", f"{SPECS}:short_dataset") == [
        f"dataset {SPECS}:short_dataset has {ts.NUM_SEQUENCES - 1} samples but the store holds "
        f"{ts.NUM_SEQUENCES}"
    ]


# ---- docs/FORMAT.md, proven -----------------------------------------------------------------------


def decode_elias_fano(
    rows: np.ndarray, n: np.ndarray, vocab_size: int, width: int, low_bits: int
) -> np.ndarray:
    """docs/FORMAT.md's Elias-Fano decoder, in pure numpy: (T, B) uint8 -> (T, width) int64."""
    L = low_bits
    nbits = width * (L + 1) + ((vocab_size - 1) >> L) + 1
    bits = np.unpackbits(rows, axis=1, bitorder="little")[:, :nbits].astype(np.int64)
    weights = np.left_shift(1, np.arange(L, dtype=np.int64))
    out = np.zeros((rows.shape[0], width), dtype=np.int64)
    for t in range(rows.shape[0]):
        k = int(n[t])
        low = bits[t, : k * L].reshape(k, L) @ weights
        ones = np.flatnonzero(bits[t, k * L :])[:k]
        ids = ((ones - np.arange(k)) << L) | low
        out[t, :k] = ids
        out[t, k:] = ids[-1] if k else 0
    return out


def _doc_decoder() -> Callable[..., np.ndarray]:
    """The `decode_elias_fano` snippet of docs/FORMAT.md, executed as written."""
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    [snippet] = [b for b in blocks if "def decode_elias_fano" in b]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/FORMAT.md", "exec"), namespace)
    return namespace["decode_elias_fano"]


def _doc_reader(store: Path) -> dict[str, Any]:
    """The plain-zarr reader snippet of docs/FORMAT.md, run on `store`: its variables."""
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    [snippet] = [b for b in blocks if '"lm-teacher.zarr"' in b]
    namespace: dict[str, Any] = {"decode_elias_fano": _doc_decoder()}
    code = snippet.replace('"lm-teacher.zarr"', repr(str(store)))
    exec(compile(code, "docs/FORMAT.md", "exec"), namespace)
    return namespace


def _numpy_decode(group: zarr.Group) -> dict[str, np.ndarray]:
    """Every row of a token store, decoded by the recipes of docs/FORMAT.md (numpy and zarr only)."""
    codec = group.attrs["softcache"]["token_codec"]
    width, vocab = codec["width"], codec["vocab_size"]
    raw_ids = group["token_ids"][:]
    out: dict[str, np.ndarray] = {}
    if codec["encoding"] == "sampled":
        counts = group["token_counts"][:].astype(np.int64)
        n = (counts > 0).sum(axis=1)
        out["counts"] = counts
        out["entropy"] = group["token_entropy"][:].astype(np.float32)
    else:
        n = np.full(raw_ids.shape[0], width)
    if codec["ids"] == "elias_fano":
        out["ids"] = decode_elias_fano(raw_ids, n, vocab, width, codec["ef_low_bits"])
        doc = _doc_decoder()(raw_ids, n, vocab, width, codec["ef_low_bits"])
        np.testing.assert_array_equal(doc, out["ids"])  # the page's snippet is this decoder
    else:
        out["ids"] = raw_ids.astype(np.int64)
    if codec["encoding"] == "topk":
        values, residual = group["token_values"][:], group["token_residual"][:]
        if codec["value_bits"]:
            m = 2 ** codec["value_bits"] - 1
            c = values.astype(np.float64)
            out["values"] = np.where(
                c > 0, 2 * np.log(np.maximum(c, 1) / m), np.log(1 / (12 * m * m))
            )
            m_r = 2 ** codec["residual_bits"] - 1
            out["residual"] = residual.astype(np.float64) * codec["log_floor"] / m_r
        else:
            out["values"] = values.astype(np.float64)
            out["residual"] = residual.astype(np.float64)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_format_doc_decoding_matches_softcache(token_stores, kind):
    store = token_stores[kind]
    ours = _numpy_decode(zarr.open_group(str(store), mode="r"))
    opened = LogitStore.open(store)
    theirs = decode_token_rows(opened.read_rows(0, opened.meta.num_rows), opened.meta)
    if opened.meta.encoding == "sampled":
        doc = _doc_reader(store)
        first = slice(0, int(_offsets(store)[1]))
        np.testing.assert_array_equal(doc["ids"], ours["ids"][first])
        np.testing.assert_array_equal(doc["counts"], ours["counts"][first])
        np.testing.assert_array_equal(doc["entropy"], ours["entropy"][first])
        np.testing.assert_array_equal(ours["ids"], theirs["ids"].numpy())
        np.testing.assert_array_equal(ours["counts"], theirs["counts"].numpy())
        np.testing.assert_array_equal(ours["entropy"], theirs["entropy"].numpy())
        # Draws with replacement: counts add up to the draws; unique ids ascending, then padding
        # (count 0) that repeats the last id.
        assert (ours["counts"].sum(axis=1) == opened.meta.codec.width).all()
        for ids, counts in zip(ours["ids"], ours["counts"], strict=True):
            n = int((counts > 0).sum())
            assert (counts[:n] > 0).all() and (counts[n:] == 0).all()
            assert (np.diff(ids[:n]) > 0).all() and (ids[n:] == ids[n - 1]).all()
        return
    doc = _doc_reader(store)  # the page's reader, on sample 0 (not empty)
    first = slice(0, int(_offsets(store)[1]))
    np.testing.assert_array_equal(doc["ids"], ours["ids"][first])
    np.testing.assert_array_equal(doc["log_p"], ours["values"][first])
    np.testing.assert_array_equal(doc["log_tail"], ours["residual"][first])
    np.testing.assert_array_equal(ours["ids"], theirs["indices"].numpy())
    np.testing.assert_allclose(ours["values"], theirs["values"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours["residual"], theirs["residual"].numpy(), rtol=1e-6)
    assert (np.diff(ours["ids"], axis=1) > 0).all()  # ids ascending within a row
    if kind == "coarse":  # 2-bit codes: code 0 occurs, and decodes to p = 1 / (12 m^2)
        codes = zarr.open_group(str(store), mode="r")["token_values"][:]
        assert (codes == 0).any()
        assert np.allclose(np.exp(ours["values"][codes == 0]), 1 / (12 * 3**2))


def test_format_doc_alignment_and_residual(token_stores):
    """Row offsets[i] + j is the teacher's distribution at position j of sample i, and the
    residual is the log of the mass the k kept ids leave."""
    store = token_stores["float16"]
    group = zarr.open_group(str(store), mode="r")
    decoded = _numpy_decode(group)
    offsets = group["offsets"][:]
    teacher = ts.teacher()
    for i, seq in enumerate(ts.sequences()):
        rows = slice(int(offsets[i]), int(offsets[i + 1]))
        assert rows.stop - rows.start == len(seq)
        if not len(seq):
            continue
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(seq.unsqueeze(0))[0].float(), dim=1).numpy()
        top = np.sort(np.argsort(-log_p, axis=1)[:, :8], axis=1)
        np.testing.assert_array_equal(decoded["ids"][rows], top)
        kept = np.take_along_axis(log_p, top, axis=1)
        np.testing.assert_allclose(decoded["values"][rows], kept, atol=1e-2, rtol=1e-3)
        others = log_p.astype(np.float64)
        np.put_along_axis(others, top, -np.inf, axis=1)
        tail = np.logaddexp.reduce(others, axis=1)
        np.testing.assert_allclose(decoded["residual"][rows], tail, atol=1e-2, rtol=1e-3)


def test_format_doc_sample_hash_recipe(token_stores):
    """sample_hash[i] is blake2b-64 of b"torch.int64|(n,)|" + the ids as little-endian int64,
    and the fingerprint is sha256 over the hashes, then b"|offsets|" and the offsets."""
    group = zarr.open_group(str(token_stores["sampled"]), mode="r")
    hashes = []
    for seq in ts.sequences():
        ids = seq.numpy()
        header = f"torch.int64|({len(ids)},)|".encode()
        digest = hashlib.blake2b(header + ids.astype("<i8").tobytes(), digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little"))
    np.testing.assert_array_equal(group["sample_hash"][:], np.array(hashes, dtype=np.uint64))
    digest = hashlib.sha256(np.array(hashes, dtype="<u8").tobytes())
    digest.update(b"|offsets|" + group["offsets"][:].astype("<i8").tobytes())
    assert group.attrs["softcache"]["dataset"]["fingerprint"] == digest.hexdigest()
