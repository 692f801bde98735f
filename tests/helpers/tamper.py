"""Stores with tampered metadata, and every reader run over them under a memory limit.

Shared by the property test (`tests/integration/test_tamper.py`) and the tamper table
(`scripts/tamper_table.py`):

- `build_stores(root)`: one store of each kind (dense, top-k, views, token top-k, token sampled);
- `mutate(doc, ...)`: one change to a parsed `zarr.json` (replace, delete or add a value);
- `run_readers(store, kind, work, digest)`: every reader in this process (`info`, `ls`, `verify`,
  `train`, `train --expect-digest`, `merge`, `softcache.open_store`), each as a `ReaderOutcome`;
- `Worker`: a subprocess that sets `RLIMIT_AS` and then runs `run_readers` for each job it is
  sent, so the readers' imports are paid once (a crashed worker is restarted);
- `run_one(...)`: one reader in a fresh subprocess under the limit, with its peak RSS.

Run as `python -m tests.helpers.tamper serve LIMIT_BYTES` (the worker) or `python -m
tests.helpers.tamper one LIMIT_BYTES READER STORE KIND WORK DIGEST` (one reader, JSON out).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The address space a reader may use: the imports (torch, zarr, dask) take about 1 GiB of it;
# a reader that tried to allocate what tampered metadata claims would fail far above.
MEMORY_LIMIT = 4 << 30

_ROWS = ["--teacher", "tests.helpers.specs:teacher", "--dataset", "tests.helpers.specs:dataset"]
_TOKENS = [
    "--lm",
    "--teacher", "tests.helpers.token_specs:causal_teacher",
    "--dataset", "tests.helpers.token_specs:ragged_dataset",
    "--shard-rows", "16", "--batch-size", "3",
]  # fmt: skip
KINDS: dict[str, list[str]] = {
    "dense": [*_ROWS, "--shard-rows", "64", "--batch-size", "24"],
    "topk": [
        *_ROWS, "--shard-rows", "64", "--batch-size", "24",
        "--encoding", "topk", "--top-k", "5", "--dtype", "float32",
    ],
    "views": [
        "--teacher", "tests.helpers.specs:conv_teacher", "--dataset", "tests.helpers.specs:dataset",
        "--shard-rows", "64", "--batch-size", "24", "--views", "4",
        "--augment", "crop(size=8,scale=0.5:1);flip", "--augment-seed", "7",
    ],
    "tokens-topk": [*_TOKENS, "--encoding", "topk", "--top-k", "8", "--value-bits", "7"],
    "tokens-sampled": [*_TOKENS, "--encoding", "sampled", "--draws", "12"],
}  # fmt: skip
READERS = ("info", "ls", "verify", "train", "train-pinned", "merge", "open_store")


def build_stores(root: Path) -> dict[str, Path]:
    """One complete store of each kind under `root` (built in this process)."""
    from click.testing import CliRunner

    from softcache.cli import main

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        stores = {}
        for kind, args in KINDS.items():
            out = root / f"{kind}.zarr"
            result = CliRunner().invoke(main, ["build", *args, "--output", str(out), "-q"])
            assert result.exit_code == 0, result.output
            stores[kind] = out
        return stores
    finally:
        os.chdir(cwd)


def metadata_files(store: Path) -> list[str]:
    """Every zarr.json of a store (group, arrays, manifest), relative to it."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("zarr.json"))


# ---- mutations ------------------------------------------------------------------------------------


def json_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) to a value inside `doc`, the root excluded."""
    out = []
    if isinstance(doc, dict):
        items: Any = doc.items()
    elif isinstance(doc, list):
        items = enumerate(doc)
    else:
        return out
    for key, value in items:
        out.append((*prefix, key))
        out.extend(json_paths(value, (*prefix, key)))
    return out


def mutate(doc: Any, path: tuple, op: str, value: Any) -> Any:
    """A copy of `doc` with the value at `path` replaced by `value` (`replace`), removed
    (`delete`), or with `value` added under a new key `"x_tamper"` of the object there (`add`)."""
    doc = copy.deepcopy(doc)
    parent: Any = doc
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "add":
        target = parent[last]
        if isinstance(target, dict):
            target["x_tamper"] = value
        elif isinstance(target, list):
            target.append(value)
        else:
            parent[last] = [target, value]
    else:
        raise ValueError(op)
    return doc


def describe_mutation(file: str, path: tuple, op: str, value: Any) -> str:
    where = file + "".join(f"[{k!r}]" for k in path)
    shown = json.dumps(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{where} {op}" + (f" {shown}" if op != "delete" else "")


# ---- readers --------------------------------------------------------------------------------------


@dataclass
class ReaderOutcome:
    """What one reader did: its exit code, whether a traceback escaped, its last line."""

    reader: str
    exit_code: int
    traceback: bool
    lines: int
    message: str
    peak_rss: int = 0  # bytes; filled in by `run_one`

    @property
    def clean(self) -> bool:
        """Exit 0, or exit 1 with a message, and no traceback."""
        return self.exit_code in (0, 1) and not self.traceback


def _train_args(kind: str, store: Path, work: Path) -> list[str]:
    common = ["--epochs", "1", "--device", "cpu", "-q", "--overwrite", "--output", str(work)]
    if kind.startswith("tokens"):
        return [
            "train", "--lm", "--store", str(store),
            "--student", "tests.helpers.lm_train_specs:causal_student",
            "--dataset", "tests.helpers.token_specs:ragged_dataset", "--batch-size", "4",
            *common,
        ]  # fmt: skip
    return [
        "train", "--store", str(store), "--student", "tests.helpers.specs:teacher",
        "--dataset", "tests.helpers.specs:dataset", *common,
    ]  # fmt: skip


def reader_args(reader: str, store: Path, kind: str, work: Path, digest: str) -> list[str]:
    """The command line of a CLI reader."""
    if reader == "info":
        return ["info", str(store)]
    if reader == "ls":
        return ["ls", str(store.parent)]
    if reader == "verify":
        return ["verify", "-q", str(store)]
    if reader == "train":
        return _train_args(kind, store, work / "train")
    if reader == "train-pinned":
        return [*_train_args(kind, store, work / "pinned"), "--expect-digest", digest]
    if reader == "merge":
        return ["merge", "-q", str(store), str(store), "--output", str(work / "merged.zarr")]
    raise ValueError(reader)


def run_reader(reader: str, store: Path, kind: str, work: Path, digest: str) -> ReaderOutcome:
    """One reader, in this process."""
    if reader == "open_store":
        import softcache
        from softcache.errors import SoftcacheError

        try:
            softcache.open_store(str(store))
            return ReaderOutcome(reader, 0, False, 0, "")
        except SoftcacheError as exc:
            text = str(exc)
            return ReaderOutcome(reader, 1, False, len(text.splitlines()), text)
        except BaseException as exc:  # what the test is looking for
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            return ReaderOutcome(reader, 2, True, len(text.splitlines()), text)
    from click.testing import CliRunner

    from softcache.cli import main

    work.mkdir(parents=True, exist_ok=True)
    result = CliRunner().invoke(main, reader_args(reader, store, kind, work, digest))
    output = result.output
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    if escaped:
        exc = result.exception
        output += "".join(traceback.format_exception_only(type(exc), exc))
    lines = [line for line in output.splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    if reader == "verify" and result.exit_code == 1:
        message = next((line for line in lines if line.startswith("FAIL")), message)
    return ReaderOutcome(
        reader,
        result.exit_code,
        escaped or "Traceback (most recent call last)" in output,
        len(lines),
        message,
    )


def run_readers(store: Path, kind: str, work: Path, digest: str) -> list[ReaderOutcome]:
    """Every reader over one store, in this process, from the repository root; each outcome
    with the process's peak RSS during that reader (Linux: the peak is reset before each)."""
    os.chdir(ROOT)
    outcomes = []
    for reader in READERS:
        _reset_peak()
        outcome = run_reader(reader, store, kind, work / reader, digest)
        outcome.peak_rss = _peak()
        outcomes.append(outcome)
    return outcomes


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux, `clear_refs` 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak() -> int:
    """This process's peak RSS in bytes since the last `_reset_peak` (0 where unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---- subprocesses under a memory limit ------------------------------------------------------------


def _limit(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _warm() -> None:
    """Import what the readers import, so each job pays only for its own work."""
    import softcache.cli
    import softcache.tools.info
    import softcache.tools.merge
    import softcache.tools.verify
    import softcache.trainer  # noqa: F401


class Worker:
    """A subprocess under `RLIMIT_AS` that runs `run_readers` for each job sent to it."""

    def __init__(self, limit: int = MEMORY_LIMIT) -> None:
        self.limit = limit
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.helpers.tamper", "serve", str(self.limit)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        return self.proc

    def run(self, store: Path, kind: str, work: Path, digest: str) -> list[ReaderOutcome]:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        job = {"store": str(store), "kind": kind, "work": str(work), "digest": digest}
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:  # the worker died: that is a finding, reported as such
            code = proc.wait()
            self.proc = None
            return [ReaderOutcome("worker", code, True, 1, f"worker died with status {code}")]
        return [ReaderOutcome(**o) for o in json.loads(line)]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.proc = None


def serve(limit: int) -> None:
    _limit(limit)
    _warm()
    for line in sys.stdin:
        job = json.loads(line)
        outcomes = run_readers(Path(job["store"]), job["kind"], Path(job["work"]), job["digest"])
        sys.stdout.write(json.dumps([asdict(o) for o in outcomes]) + "\n")
        sys.stdout.flush()


def run_one(
    reader: str, store: Path, kind: str, work: Path, digest: str, limit: int = MEMORY_LIMIT
) -> ReaderOutcome:
    """One reader in a fresh subprocess under `RLIMIT_AS`, with its peak RSS (`wait4`)."""
    args = [sys.executable, "-m", "tests.helpers.tamper", "one", str(limit), reader, str(store)]
    proc = subprocess.Popen(
        [*args, kind, str(work), digest],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    try:
        outcome = ReaderOutcome(**json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError):
        return ReaderOutcome(
            reader, proc.returncode, True, 1, f"died: status {proc.returncode}", peak
        )
    outcome.peak_rss = peak
    return outcome


def _one(argv: list[str]) -> None:
    limit, reader, store, kind, work, digest = argv
    _limit(int(limit))
    os.chdir(ROOT)
    outcome = run_reader(reader, Path(store), kind, Path(work), digest)
    sys.stdout.write("\n" + json.dumps(asdict(outcome)) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "one":
        _one(sys.argv[2:])
    else:
        raise SystemExit(
            f"usage: {sys.argv[0]} serve LIMIT | one LIMIT READER STORE KIND WORK DIGEST"
        )


# ---- the named mutations of the tamper table ------------------------------------------------------

_ATTR = ("attributes", "softcache")


@dataclass(frozen=True)
class Named:
    """One mutation of the table: `value` written at `path` of `file` (`op` as in `mutate`), or,
    with `op = "raw"`, the file's bytes replaced by `value` (bytes)."""

    name: str
    kind: str
    file: str
    path: tuple
    op: str
    value: Any = None


def _attr(name: str, kind: str, key: str, value: Any, op: str = "replace") -> Named:
    return Named(name, kind, "zarr.json", (*_ATTR, key), op, value)


_INNER = ("codecs", 0, "configuration", "codecs")  # a sharded array's inner codec chain


NAMED: list[Named] = [
    # What the issue found: tracebacks.
    _attr("shard_rows 0", "dense", "shard_rows", 0),
    _attr("temperatures a string", "topk", "temperatures", "1,2,4"),
    _attr("views 0", "views", "views", 0),
    Named("data_type float16 -> float32", "dense", "logits/zarr.json", ("data_type",), "replace", "float32"),
    Named("unknown codec (zstd -> lz4hc)", "topk", "topk_values/zarr.json", (*_INNER, 1, "name"), "replace", "lz4hc"),
    # ... attempts to allocate what the metadata claims.
    _attr("num_samples 10^15", "dense", "num_samples", 10**15),
    Named("shape 10^12 rows", "dense", "logits/zarr.json", ("shape", 0), "replace", 10**12),
    _attr("num_tokens 10^13", "tokens-topk", "num_tokens", 10**13),
    # ... silent acceptance.
    _attr('complete "no"', "dense", "complete", "no"),
    _attr("format_version true", "dense", "format_version", True),
    _attr("k negative", "topk", "k", -5),
    _attr("k 50 > stored 5", "topk", "k", 50),
    _attr("temperatures [] (top-k)", "topk", "temperatures", []),
    _attr("num_classes 10^12", "topk", "num_classes", 10**12),
    # More of each kind.
    _attr("chunk_rows 7 (not a divisor)", "dense", "chunk_rows", 7),
    _attr("value_dtype int8", "dense", "value_dtype", "int8"),
    _attr("encoding sparse", "topk", "encoding", "sparse"),
    _attr("layout tokens on a row store", "dense", "layout", "tokens"),
    _attr("augmentation removed (views)", "views", "augmentation", None),
    _attr("views 10^9", "views", "views", 10**9),
    _attr("shard_rows 10^9", "tokens-sampled", "shard_rows", 10**9),
    Named("token_codec.width 0", "tokens-sampled", "zarr.json", (*_ATTR, "token_codec", "width"), "replace", 0),
    Named("token_codec.ef_low_bits 9", "tokens-topk", "zarr.json", (*_ATTR, "token_codec", "ef_low_bits"), "replace", 9),
    Named("token_codec.temperature \"hot\"", "tokens-sampled", "zarr.json", (*_ATTR, "token_codec", "temperature"), "replace", "hot"),
    Named("offsets shape 10^12", "tokens-sampled", "offsets/zarr.json", ("shape", 0), "replace", 10**12),
    Named("shard_done shape 10^12", "topk", "shard_done/zarr.json", ("shape", 0), "replace", 10**12),
    Named("inner chunk_shape [1, 10]", "dense", "logits/zarr.json", ("codecs", 0, "configuration", "chunk_shape"), "replace", [1, 10]),
    Named("crc32c removed", "dense", "logits/zarr.json", (*_INNER, 2), "delete"),
    Named("zstd level 99", "views", "view_params/zarr.json", (*_INNER, 1, "configuration", "level"), "replace", 99),
    Named("index_location start", "tokens-topk", "token_ids/zarr.json", ("codecs", 0, "configuration", "index_location"), "replace", "start"),
    Named("fill_value NaN", "topk", "lse/zarr.json", ("fill_value",), "replace", "NaN"),
    Named("unknown array key", "dense", "sample_hash/zarr.json", ("compressor",), "replace", {"id": "blosc"}),
    Named("array zarr.json removed", "topk", "lse/zarr.json", (), "raw", None),
    Named("group zarr.json truncated", "dense", "zarr.json", (), "raw", b'{"attributes": {"softcache": {"enc'),
    Named("array zarr.json not JSON", "tokens-sampled", "token_counts/zarr.json", (), "raw", b"\xff\xfe garbage"),
    Named("group zarr.json nested 10^5 deep", "topk", "zarr.json", (), "raw", b"[" * 100_000),
    Named("group zarr.json of 20 MB", "dense", "zarr.json", (), "raw", b'{"x": "' + b"a" * (20 << 20) + b'"}'),
    _attr("manifest sha256 changed", "dense", "manifest", {"sha256": "0" * 64, "size": 10, "objects": 1, "bytes": 1}),
    Named("manifest entry changed", "topk", "manifest/zarr.json", ("attributes", "softcache_manifest", "objects", "lse/c/0/0", "sha256"), "replace", "0" * 64),
]  # fmt: skip


def apply_named(store: Path, m: Named) -> None:
    """Apply a named mutation to a store in place."""
    target = store / m.file
    if m.op == "raw":
        if m.value is None:
            target.unlink()
        else:
            target.write_bytes(m.value)
        return
    doc = json.loads(target.read_text())
    target.write_text(json.dumps(mutate(doc, m.path, m.op, m.value), indent=2))
