"""Tamper evidence and identity: the manifest, the digest, pinned reads; and the provenance, zip
archives and deep listings another team relies on.

A CRC-32C catches accidents, not edits: these tests rewrite a chunk *with* a valid checksum and
show that `verify` names it by its digest, that `train --expect-digest` refuses it, and that
stores written before manifests still read (and `verify` says they have none).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner, Result

import softcache
from softcache.cli import main
from softcache.errors import StoreFormatError, TamperedStoreError
from softcache.store import ATTR_KEY, LogitStore
from softcache.store.manifest import MANIFEST_KEY
from tests.conftest import spec
from tests.helpers import one_line_error


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def _digest(store: Path) -> str:
    return "sha256:" + hashlib.sha256((store / "zarr.json").read_bytes()).hexdigest()


def _rewrite_shard(store: Path, array: str = "logits", rows: slice = slice(128, 192)) -> None:
    """Change one shard's values through zarr: a new object with a valid CRC-32C."""
    arr = zarr.open_array(str(store / array), mode="r+")
    values = arr[rows]
    values[:, 0] += 1
    arr[rows] = values


def _train(store: Path, out: Path, *extra: str) -> Result:
    return _run(
        "train", "--store", str(store), "--student", spec("teacher"), "--dataset",
        spec("dataset"), "--epochs", "1", "--device", "cpu", "-q", "--output", str(out),
        *extra,
    )  # fmt: skip


# ---- the manifest ---------------------------------------------------------------------------------


def test_a_built_store_records_every_object_in_its_manifest(built_stores):
    store = built_stores["topk"]
    group = json.loads((store / "zarr.json").read_text())["attributes"][ATTR_KEY]
    data = (store / MANIFEST_KEY).read_bytes()
    assert group["complete"] is True
    assert group["manifest"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert group["manifest"]["size"] == len(data)
    objects = json.loads(data)["attributes"]["softcache_manifest"]["objects"]
    files = {
        str(p.relative_to(store)): p.read_bytes()
        for p in store.rglob("*")
        if p.is_file() and p.relative_to(store).as_posix() not in ("zarr.json", MANIFEST_KEY)
    }
    assert sorted(objects) == sorted(files)  # every object, and nothing else
    for key, body in files.items():
        assert objects[key] == {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    assert group["manifest"]["objects"] == len(files)
    assert group["manifest"]["bytes"] == sum(map(len, files.values()))
    # Plain zarr sees one more (empty) group, and reads the arrays as before.
    assert sorted(zarr.open_group(str(store), mode="r").group_keys()) == ["manifest"]


def test_info_shows_the_digest_and_verify_checks_it(built_stores):
    store = built_stores["dense"]
    info = json.loads(_run("info", str(store), "--json").stdout)
    assert info["digest"] == _digest(store)
    table = _run("info", str(store)).stdout
    assert f"digest          {_digest(store)} (" in table
    result = _run("verify", "-q", str(store), "--expect-digest", _digest(store))
    assert result.exit_code == 0, result.output
    assert f"objects match digest {_digest(store)}" in result.output


def test_a_chunk_rewritten_with_a_valid_crc_is_named_by_verify_and_refused_when_pinned(
    built_stores, tmp_path, in_root
):
    pinned = _digest(built_stores["dense"])
    store = _copy(built_stores["dense"], tmp_path / "edited.zarr")
    _rewrite_shard(store)
    # The checksums hold: a reader without a pin reads the edited values.
    assert zarr.open_array(str(store / "logits"), mode="r")[128:192].shape == (64, 10)
    assert _digest(store) == pinned  # zarr.json untouched: the chunk is caught by the manifest
    result = _run("verify", "-q", str(store))
    assert result.exit_code == 1
    assert "FAIL  object logits/c/2/0 does not match the manifest" in result.output
    assert "changed after the build" in result.output
    line = one_line_error(_train(store, tmp_path / "run", "--expect-digest", pinned))
    assert "object logits/c/2/0 does not match the manifest (sha256 differs)" in line
    with pytest.raises(TamperedStoreError, match=r"logits/c/2/0 does not match"):
        softcache.open_store(str(store), expect_digest=pinned).read("logits")
    # Unpinned, training reads it (the CRC-32C holds): why a consumer pins.
    assert _train(store, tmp_path / "free").exit_code == 0


def test_a_pinned_store_trains_and_another_digest_is_refused(built_stores, tmp_path, in_root):
    store = built_stores["dense"]
    assert _train(store, tmp_path / "ok", "--expect-digest", _digest(store)).exit_code == 0
    other = _digest(built_stores["topk"])
    line = one_line_error(_train(store, tmp_path / "no", "--expect-digest", other))
    assert f"has digest {_digest(store)}, not the pinned {other}" in line
    with pytest.raises(TamperedStoreError, match="not the pinned"):
        softcache.open_store(str(store), expect_digest=other)
    bare = softcache.open_store(str(store), expect_digest=_digest(store).removeprefix("sha256:"))
    assert bare.digest == _digest(store)
    with pytest.raises(StoreFormatError, match="is not a store digest"):
        softcache.open_store(str(store), expect_digest="sha256:beef")
    one_line_error(_train(store, tmp_path / "bad", "--expect-digest", "beef"), "not a store digest")


def test_edits_of_metadata_and_manifest_are_caught(built_stores, tmp_path):
    pinned = _digest(built_stores["topk"])
    edited = _copy(built_stores["topk"], tmp_path / "attr.zarr")
    group = zarr.open_group(str(edited), mode="r+")
    group.attrs[ATTR_KEY] = {**group.attrs[ATTR_KEY], "temperatures": [1.0, 2.0, 5.0]}
    with pytest.raises(TamperedStoreError, match="not the pinned"):
        LogitStore.open(edited, expect_digest=pinned)
    manifest = _copy(built_stores["topk"], tmp_path / "manifest.zarr")
    (manifest / MANIFEST_KEY).write_bytes((manifest / MANIFEST_KEY).read_bytes() + b" ")
    result = _run("verify", "-q", str(manifest))
    assert result.exit_code == 1
    assert f"{MANIFEST_KEY} differs from the manifest the store records" in result.output


def test_added_and_missing_objects_are_named(built_stores, tmp_path):
    store = _copy(built_stores["dense"], tmp_path / "s.zarr")
    (store / "sample_hash" / "c" / "1").unlink()
    (store / "logits" / "c" / "9").mkdir()
    (store / "logits" / "c" / "9" / "0").write_bytes(b"extra")
    (store / "logits" / "c" / "0" / "0.partial").write_bytes(b"a killed write's leftover")
    result = _run("verify", "-q", str(store))
    assert result.exit_code == 1
    # Named once, by the shard check (the manifest check skips what is already reported).
    assert (
        "FAIL  array sample_hash, shard 1 (rows 64..127): object sample_hash/c/1 is missing"
        in result.output
    )
    assert "(the manifest lists it)" not in result.output
    assert "FAIL  object logits/c/9/0 is not in the manifest" in result.output
    assert "0.partial" not in result.output


def _strip_manifest(store: Path) -> None:
    """What a store written before manifests looks like."""
    group = zarr.open_group(str(store), mode="r+")
    meta = dict(group.attrs[ATTR_KEY])
    del meta["manifest"], meta["provenance"]
    group.attrs[ATTR_KEY] = meta
    shutil.rmtree(store / "manifest")


def test_a_store_without_a_manifest_reads_and_verify_says_so(built_stores, tmp_path, in_root):
    store = _copy(built_stores["dense"], tmp_path / "old.zarr")
    _strip_manifest(store)
    info = _run("info", str(store))
    assert info.exit_code == 0, info.output
    assert (
        "digest          - (no manifest: written before softcache recorded digests)" in info.stdout
    )
    assert json.loads(_run("info", str(store), "--json").stdout)["digest"] is None
    result = _run("verify", "-q", str(store))
    assert result.exit_code == 0, result.output
    assert "NOTE  the store has no manifest" in result.output
    assert _train(store, tmp_path / "run").exit_code == 0
    with pytest.raises(TamperedStoreError, match=r"has no manifest \(it predates manifests\)"):
        softcache.open_store(str(store), expect_digest=_digest(built_stores["dense"]))


def test_merge_writes_a_manifest_and_records_its_sources(built_stores, tmp_path):
    out = tmp_path / "merged.zarr"
    sources = [str(built_stores["dense"]), str(built_stores["topk"])]
    assert _run("merge", "-q", *sources, "--output", str(out)).exit_code == 0
    assert _run("verify", "-q", str(out)).exit_code == 0
    merged = LogitStore.open(out)
    assert merged.digest == _digest(out)
    assert [s["digest"] for s in merged.meta.provenance["sources"]] == [
        _digest(Path(s)) for s in sources
    ]


def test_mark_complete_reads_back_only_what_this_process_did_not_write(built_stores, tmp_path):
    """A resumed build hashes the shards an earlier process wrote; its manifest is the one an
    uninterrupted build writes (the resume tests compare the files)."""
    store = LogitStore.open(built_stores["dense"])
    out = tmp_path / "copy.zarr"
    copy = LogitStore.create(out, store.meta)
    for shard in range(store.meta.num_shards):
        start, stop = store.shard_bounds(shard)
        copy.write_shard(shard, store.read_rows(start, stop))
    resumed = LogitStore.open(out, mode="r+", require_complete=False)  # nothing recorded
    resumed.mark_complete(store.meta.dataset["fingerprint"])
    want = (built_stores["dense"] / MANIFEST_KEY).read_bytes()
    assert (out / MANIFEST_KEY).read_bytes() == want


# ---- zip archives as people make them ----------------------------------------------------------------


def _zip_folder(store: Path, archive: Path) -> None:
    """`zip -r archive store` run from the store's parent: one top-level folder, with folder
    entries (the zip tool's own output when it is installed)."""
    if shutil.which("zip"):
        subprocess.run(["zip", "-qr", str(archive), store.name], cwd=store.parent, check=True)
        return
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(store.rglob("*")):
            name = path.relative_to(store.parent).as_posix() + ("/" if path.is_dir() else "")
            zf.write(path, name)


def test_a_zip_of_the_store_folder_reads(built_stores, tmp_path, in_root):
    source = _copy(built_stores["topk"], tmp_path / "teacher.zarr")
    archive = tmp_path / "teacher.zip"
    _zip_folder(source, archive)
    names = zipfile.ZipFile(archive).namelist()
    assert "teacher.zarr/zarr.json" in names and "zarr.json" not in names
    info = json.loads(_run("info", str(archive), "--json").stdout)
    assert info["complete"] is True and info["digest"] == _digest(source)
    result = _run("verify", "-q", str(archive), "--expect-digest", _digest(source))
    assert result.exit_code == 0, result.output
    store = softcache.open_store(str(archive), expect_digest=_digest(source))
    np.testing.assert_array_equal(
        store.read("topk_values"), LogitStore.open(source).read("topk_values")
    )
    assert _train(archive, tmp_path / "run", "--expect-digest", _digest(source)).exit_code == 0


def test_a_zip_with_two_folders_is_not_a_store(built_stores, tmp_path):
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("a", "b"):
            for path in sorted(built_stores["dense"].rglob("*")):
                if path.is_file():
                    zf.write(path, f"{name}/{path.relative_to(built_stores['dense']).as_posix()}")
    one_line_error(_run("info", str(archive)), "does not exist or is not a Zarr group")


# ---- provenance ------------------------------------------------------------------------------------


def test_provenance_resolves_the_specs_and_records_package_versions(built_stores):
    info = json.loads(_run("info", str(built_stores["dense"]), "--json").stdout)
    prov = info["provenance"]
    specs_file = Path(__file__).resolve().parents[1] / "helpers" / "specs.py"
    for what, name in (("teacher", "teacher"), ("dataset", "dataset")):
        assert prov[what]["module"] == "tests.helpers.specs"
        assert prov[what]["name"] == name
        assert prov[what]["file"] == str(specs_file)
        assert prov[what]["sha256"] == hashlib.sha256(specs_file.read_bytes()).hexdigest()
    import numpy
    import torch

    assert prov["packages"]["torch"] == torch.__version__
    assert prov["packages"]["numpy"] == numpy.__version__
    assert prov["packages"]["zarr"] == zarr.__version__
    assert prov["packages"]["softcache"] == softcache.__version__
    rows = _run("info", str(built_stores["dense"])).stdout
    assert "teacher source  module tests.helpers.specs, file " in rows
    assert f"torch {torch.__version__}" in rows


def test_provenance_of_a_file_spec(make_store, tmp_path):
    source = Path(__file__).resolve().parents[1] / "helpers" / "specs.py"
    copy = tmp_path / "my_kd.py"
    copy.write_text(source.read_text())
    path, _ = make_store(teacher=f"{copy}:teacher")
    prov = LogitStore.open(path).meta.provenance
    assert prov["teacher"] == {
        "file": str(copy.resolve()),
        "sha256": hashlib.sha256(copy.read_bytes()).hexdigest(),
        "name": "teacher",
    }


# ---- ls at any depth ------------------------------------------------------------------------------


def test_ls_finds_stores_at_any_depth_without_reading_data(built_stores, tmp_path):
    root = tmp_path / "bucket"
    two = _copy(built_stores["dense"], root / "team-a" / "teacher.zarr")
    three = _copy(built_stores["topk"], root / "team-b" / "2026" / "teacher.zarr")
    damaged = _copy(built_stores["dense"], root / "team-b" / "broken.zarr")
    (damaged / "logits" / "zarr.json").write_text("{")
    (root / "team-a" / "notes.txt").write_text("not a store")
    # Data objects that cannot be read: ls must not need them.
    for chunk in [p for p in (two / "logits" / "c").rglob("*") if p.is_file()]:
        chunk.write_bytes(b"not a chunk")
    result = _run("ls", str(root))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines] == [str(two), str(three), str(damaged)]
    assert "  dense float16  300 samples  " in lines[0] and "  complete  " in lines[0]
    assert "  topk-5 float32  " in lines[1]
    assert lines[2].startswith(
        f"{damaged}  ERROR: store {damaged}: logits/zarr.json is not valid JSON"
    )
    shallow = _run("ls", str(root), "--max-depth", "2").stdout.splitlines()
    assert [line.split("  ")[0] for line in shallow] == [str(two), str(damaged)]
    assert _run("ls", str(root), "--max-depth", "1").stdout == f"no softcache stores under {root}\n"
