"""`softcache info` and `softcache ls` on real stores: what they report, checked against the files
on disk; and that neither they nor `verify` ever write to a store."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import zarr
from click.testing import CliRunner, Result

from softcache.cli import main
from softcache.store import ATTR_KEY, FORMAT_VERSION
from tests.conftest import spec
from tests.helpers import NEWER, READABLE, cli

N, C, SHARDS = 300, 10, 5
TEACHER_PARAMS = 64 * C + C  # specs:teacher is one Linear(64, 10)
DATA_ARRAYS = {"dense": ["logits"], "topk": ["topk_values", "topk_indices", "lse"]}


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _table(output: str) -> dict[str, str]:
    """`info`'s two columns (labels may hold single spaces; columns are two or more apart)."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in output.splitlines())


def _bytes_on_disk(store: Path) -> int:
    """Every file under the store's array folders (chunks and array metadata), counted here."""
    return sum(
        p.stat().st_size for d in store.iterdir() if d.is_dir() for p in d.rglob("*") if p.is_file()
    )


def _fingerprint(store: Path) -> str:
    """sha256 over the stored little-endian uint64 sample hashes, recomputed with numpy."""
    hashes = zarr.open_group(str(store), mode="r")["sample_hash"][:]
    return hashlib.sha256(hashes.astype("<u8").tobytes()).hexdigest()


def _make_partial(source: Path, dest: Path, done: int) -> Path:
    """A copy with `complete` unset, no fingerprint, and only the first `done` shards recorded:
    the state of a build killed after `done` shards."""
    shutil.copytree(source, dest)
    group = zarr.open_group(str(dest), mode="r+")
    meta = dict(group.attrs[ATTR_KEY])
    group.attrs[ATTR_KEY] = {
        **meta,
        "complete": False,
        "dataset": {**meta["dataset"], "fingerprint": None},
    }
    group["shard_done"][done:] = 0
    return dest


def _make_newer(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    group = zarr.open_group(str(dest), mode="r+")
    group.attrs[ATTR_KEY] = {**group.attrs[ATTR_KEY], "format_version": NEWER}
    return dest


# ---- info ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "k", "dtype", "row_bytes", "temperatures"),
    [
        ("dense", None, "float16", C * 2, []),
        # top-5 float32 values, uint16 indices, float32 lse at 3 temperatures
        ("topk", 5, "float32", 5 * 4 + 5 * 2 + 3 * 4, [1.0, 2.0, 4.0]),
    ],
)
def test_info_json_matches_the_store_on_disk(built_stores, kind, k, dtype, row_bytes, temperatures):
    store = built_stores[kind]
    result = _run("info", str(store), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["location"] == str(store)
    assert info["complete"] is True
    assert (info["shards_done"], info["shards_total"]) == (SHARDS, SHARDS)
    assert (info["encoding"], info["k"], info["value_dtype"]) == (kind, k, dtype)
    assert (info["num_samples"], info["num_classes"], info["views"]) == (N, C, 1)
    assert info["temperatures"] == temperatures
    assert info["format_version"] == FORMAT_VERSION
    assert info["layout"] == "rows"
    assert "num_tokens" not in info and "token_codec" not in info  # per-token stores only
    assert info["teacher"]["spec"] == spec("teacher")
    assert info["teacher"]["num_parameters"] == TEACHER_PARAMS
    assert re.fullmatch(r"[0-9a-f]{64}", info["teacher"]["state_dict_sha256"])
    assert info["dataset"] == {
        "spec": spec("dataset"),
        "num_samples": N,
        "fingerprint": _fingerprint(store),
    }
    stored = _bytes_on_disk(store)
    assert info["bytes_stored"] == stored
    assert info["bytes_per_sample"] == pytest.approx(stored / N) and stored / N > 0
    logical = N * (row_bytes + 8)  # + the uint64 sample hash
    assert info["compression_ratio"] == pytest.approx(logical / stored)
    assert info["created"] and info["softcache_version"]


def test_info_table(built_stores):
    store = built_stores["topk"]
    result = _run("info", str(store))
    assert result.exit_code == 0, result.output
    rows = _table(result.stdout)
    info = json.loads(_run("info", str(store), "--json").stdout)
    assert rows["store"] == str(store)
    assert rows["status"] == "complete"
    assert rows["teacher"] == f"{spec('teacher')} ({TEACHER_PARAMS} parameters)"
    assert rows["dataset"] == f"{spec('dataset')} (300 samples)"
    assert rows["fingerprint"] == _fingerprint(store)
    assert rows["encoding"] == "topk (k=5), float32, 10 classes"
    assert rows["temperatures"] == "1, 2, 4"
    assert rows["samples"] == "300 x 1 view(s), shards of 64 rows"
    assert rows["bytes on disk"] == (
        f"{info['bytes_stored']:,} ({info['bytes_stored'] / N:,.1f} B/sample)"
    )
    assert rows["compression"] == f"{info['compression_ratio']:.2f}x"
    assert rows["format"] == f"version {FORMAT_VERSION}"
    assert (
        rows["digest"]
        == f"{info['digest']} ({info['manifest']['objects']} objects in its manifest)"
    )
    assert list(rows) == [  # the rows of a row store (per-token stores show others)
        "store",
        "status",
        "digest",
        "teacher",
        "teacher sha256",
        "teacher source",
        "dataset source",
        "packages",
        "dataset",
        "fingerprint",
        "encoding",
        "temperatures",
        "samples",
        "augmentation",
        "bytes on disk",
        "compression",
        "created",
        "format",
    ]


def test_info_on_a_partial_store_says_how_far_it_got(built_stores, tmp_path):
    store = _make_partial(built_stores["dense"], tmp_path / "partial.zarr", done=3)
    result = _run("info", str(store))
    assert result.exit_code == 0, result.output
    rows = _table(result.stdout)
    assert rows["status"] == f"INCOMPLETE: 3 of {SHARDS} shards written"
    assert rows["fingerprint"] == "-"
    info = json.loads(_run("info", str(store), "--json").stdout)
    assert (info["complete"], info["shards_done"], info["shards_total"]) == (False, 3, SHARDS)


def test_info_refuses_a_newer_format_in_one_line(built_stores, tmp_path):
    store = _make_newer(built_stores["dense"], tmp_path / "newer.zarr")
    result = _run("info", str(store))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: store {store} uses store format_version {NEWER}, but softcache "
        f"{_version()} reads only versions {READABLE}; upgrade softcache to a release that "
        f"supports format_version {NEWER}"
    ]


def _version() -> str:
    from softcache import __version__

    return __version__


def test_info_on_a_missing_store_is_one_line(tmp_path):
    result = _run("info", str(tmp_path / "nope.zarr"))
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: store {tmp_path / 'nope.zarr'} does not exist"


# ---- ls ------------------------------------------------------------------------------------------


@pytest.fixture
def shelf(built_stores, tmp_path) -> dict[str, Path]:
    """A folder of stores (dense, top-k, a partial build, a newer format, a zip archive) mixed with
    things that are not stores (a folder of notes, a Zarr group without softcache metadata, a file)."""
    root = tmp_path / "shelf"
    root.mkdir()
    stores = {
        "dense": root / "dense.zarr",
        "topk": root / "topk.zarr",
        "partial": root / "partial.zarr",
        "newer": root / "newer.zarr",
        "zip": root / "dense-copy.zip",
    }
    shutil.copytree(built_stores["dense"], stores["dense"])
    shutil.copytree(built_stores["topk"], stores["topk"])
    _make_partial(built_stores["dense"], stores["partial"], done=2)
    _make_newer(built_stores["dense"], stores["newer"])
    with zipfile.ZipFile(stores["zip"], "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(built_stores["dense"].rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(built_stores["dense"]).as_posix())
    (root / "notes").mkdir()
    (root / "notes" / "README.md").write_text("not a store\n")
    zarr.open_group(str(root / "foreign.zarr"), mode="w").create_array("x", shape=(3,), dtype="i4")
    (root / "listing.txt").write_text("a file\n")
    return stores


def test_ls_lists_every_store_and_skips_the_rest(shelf):
    root = shelf["dense"].parent
    result = _run("ls", str(root))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines] == sorted(str(p) for p in shelf.values())
    by_name = {Path(line.split("  ")[0]).name: line for line in lines}
    assert by_name["dense.zarr"] == (
        f"{shelf['dense']}  dense float16  300 samples  10 classes  "
        f"{_bytes_on_disk(shelf['dense']) / N:,.1f} B/sample  complete  "
        f"teacher={spec('teacher')}  dataset={spec('dataset')}"
    )
    assert "  topk-5 float32  300 samples  " in by_name["topk.zarr"]
    assert "  partial 2/5  " in by_name["partial.zarr"]
    assert by_name["newer.zarr"].startswith(f"{shelf['newer']}  ERROR: ")
    assert f"format_version {NEWER}" in by_name["newer.zarr"]
    assert "  dense float16  300 samples  " in by_name["dense-copy.zip"]
    assert "  complete  " in by_name["dense-copy.zip"]


def test_ls_json(shelf):
    result = _run("ls", str(shelf["dense"].parent), "--json")
    assert result.exit_code == 0, result.output
    entries = {Path(e["location"]).name: e for e in json.loads(result.stdout)}
    assert sorted(entries) == sorted(p.name for p in shelf.values())
    assert entries["dense.zarr"]["complete"] is True
    assert entries["dense.zarr"]["num_samples"] == N
    assert entries["topk.zarr"]["k"] == 5
    assert entries["partial.zarr"]["complete"] is False
    assert entries["partial.zarr"]["shards_done"] == 2
    assert set(entries["newer.zarr"]) == {"location", "error"}
    assert f"format_version {NEWER}" in entries["newer.zarr"]["error"]


def test_ls_lists_a_damaged_store_with_its_error(built_stores, tmp_path):
    root = tmp_path / "shelf"
    root.mkdir()
    shutil.copytree(built_stores["topk"], root / "damaged.zarr")
    shutil.rmtree(root / "damaged.zarr" / "lse")
    result = _run("ls", str(root))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{root / 'damaged.zarr'}  ERROR: ")
    assert "missing array(s) lse" in result.stdout


def test_ls_of_a_store_itself_lists_it(built_stores):
    result = _run("ls", str(built_stores["dense"]))
    assert result.exit_code == 0, result.output
    assert [line.split("  ")[0] for line in result.stdout.splitlines()] == [
        str(built_stores["dense"])
    ]


def test_ls_of_a_folder_without_stores(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _run("ls", str(tmp_path / "empty"))
    assert result.exit_code == 0
    assert result.stdout == f"no softcache stores under {tmp_path / 'empty'}\n"


def test_ls_of_a_missing_folder_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = cli("ls", str(missing))  # a real process: its exit status and streams
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == f"Error: {missing} is not a folder\n"


# ---- read-only ------------------------------------------------------------------------------------


def _state(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file's bytes and every entry's mtime (ns) under root, root included: a file created
    and deleted again would still change its folder's mtime."""
    entries = [root, *sorted(root.rglob("*"))]
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in entries
    }


def test_info_verify_and_ls_never_write(built_stores, tmp_path, in_root):
    stores = [
        shutil.copytree(built_stores["dense"], tmp_path / "dense.zarr"),
        shutil.copytree(built_stores["topk"], tmp_path / "topk.zarr"),
        _make_partial(built_stores["dense"], tmp_path / "partial.zarr", done=3),
    ]
    before = _state(tmp_path)
    for store in stores:
        for args in (["info"], ["info", "--json"], ["verify", "-q"], ["verify", "-q", "--json"]):
            _run(*args, str(store))
        _run("verify", "-q", "--dataset", spec("dataset"), str(store))
    _run("ls", str(tmp_path))
    _run("ls", str(tmp_path), "--json")
    # The partial store fails verify; the complete ones pass: both paths ran.
    assert _run("verify", "-q", str(stores[2])).exit_code == 1
    assert _run("verify", "-q", str(stores[0])).exit_code == 0
    assert _state(tmp_path) == before
