"""Stores in object storage: a real S3-compatible server (moto, in server mode) on localhost.

The server is a separate process listening on 127.0.0.1; the client side is the real s3fs/zarr
stack. To "restart" the server in the middle of a build, the build talks to it through a small TCP
proxy that the test stops (dropping every connection and refusing new ones) and starts again: to
the client that is a server going away and coming back with its data, which is what a restarted
S3 endpoint looks like (moto keeps its objects in memory, so killing moto itself would also lose
the data, which no real object store does).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from softcache.builder import build
from softcache.config import BuildConfig
from softcache.store import LogitStore

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "softcache-test"
SPECS = "tests.helpers.specs"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class TcpProxy:
    """Forward 127.0.0.1:listen_port to 127.0.0.1:target_port until stopped."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self._sockets: list[socket.socket] = []
        self._server: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.listen_port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def stop(self) -> None:
        """Close the listener and every open connection, as a crashed server would."""
        with self._lock:
            if self._server is not None:
                self._server.close()
                self._server = None
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def moto_server() -> Iterator[dict]:
    """A moto S3 server on localhost with one bucket; yields its endpoint and a filesystem."""
    port = _free_port()
    env = {**os.environ, **CREDENTIALS}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        _wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        yield {"endpoint": endpoint, "port": port, "fs": fs, "env": env}
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def s3() -> Iterator[dict]:
    """A moto S3 server on localhost with one bucket (`moto_server`)."""
    with moto_server() as server:
        yield server


def _cli(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "softcache.cli", *args],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=check,
    )


def _build_args(output: str, endpoint: str, dataset: str = "dataset") -> list[str]:
    return [
        "build", "--teacher", f"{SPECS}:teacher", "--dataset", f"{SPECS}:{dataset}",
        "--output", output, "--shard-rows", "32", "--batch-size", "16", "--device", "cpu",
        "--storage-option", f"endpoint_url={endpoint}", "--quiet",
    ]  # fmt: skip


def _local_build(path: Path) -> LogitStore:
    """The same build as `_build_args`, uninterrupted, to a local folder."""
    config = BuildConfig(
        teacher=f"{SPECS}:teacher",
        dataset=f"{SPECS}:dataset",
        output=str(path),
        shard_rows=32,
        batch_size=16,
        device="cpu",
    )
    build(config, progress=False)
    return LogitStore.open(str(path))


def _snapshot(fs, prefix: str) -> dict[str, tuple[int, str]]:
    fs.invalidate_cache()
    return {
        path: (info["size"], info.get("ETag", ""))
        for path, info in fs.find(prefix, detail=True).items()
    }


def _assert_same_arrays(a: LogitStore, b: LogitStore) -> None:
    assert a.array_names == b.array_names
    for name in a.array_names:
        x, y = a.array(name)[:], b.array(name)[:]
        assert x.dtype == y.dtype and np.array_equal(x, y), name  # exact, floats included


def test_build_info_verify_train_ls_on_s3(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    url = f"s3://{BUCKET}/synthetic.zarr"
    option = ["--storage-option", f"endpoint_url={s3['endpoint']}"]
    done = _cli(*_build_args(url, s3["endpoint"]), env=s3["env"])
    assert "samples" in done.stdout

    info = json.loads(_cli("info", url, "--json", *option, env=s3["env"]).stdout)
    assert info["complete"] and info["num_samples"] == 300 and info["bytes_stored"] > 0

    verified = _cli("verify", url, "--dataset", f"{SPECS}:dataset", *option, env=s3["env"])
    assert verified.stdout.startswith("OK")

    listing = _cli("ls", f"s3://{BUCKET}", *option, env=s3["env"]).stdout
    assert "synthetic.zarr" in listing and "300 samples" in listing

    # The same arrays as a local build of the same config.
    remote = LogitStore.open(url, storage_options={"endpoint_url": s3["endpoint"]})
    _assert_same_arrays(remote, _local_build(tmp_path / "local.zarr"))

    # Training reads the store and never writes to it.
    before = _snapshot(s3["fs"], f"{BUCKET}/synthetic.zarr")
    trained = _cli(
        "train", "--store", url, "--student", "pipelines.digits.models:student", "--dataset", f"{SPECS}:dataset",
        "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--output",
        str(tmp_path / "run"), "--quiet", "--json", *option,
        env=s3["env"],
    )  # fmt: skip
    metrics = json.loads(trained.stdout)
    assert metrics["mode"] == "offline" and len(metrics["train_loss"]) == 1
    assert _snapshot(s3["fs"], f"{BUCKET}/synthetic.zarr") == before


def test_build_resumes_after_the_server_restarts(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    proxy = TcpProxy(_free_port(), s3["port"])
    proxy.start()
    endpoint = f"http://127.0.0.1:{proxy.listen_port}"
    url = f"s3://{BUCKET}/restarted.zarr"
    args = [
        sys.executable, "-m", "softcache.cli",
        *_build_args(url, endpoint, dataset="slow_dataset"),
    ]  # fmt: skip
    env = {**s3["env"], "PYTHONPATH": str(ROOT), "SOFTCACHE_TEST_SLEEP": "0.01"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    fs = s3["fs"]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the build finished before the server went away"
            assert time.monotonic() < deadline, "no shard was recorded in time"
            fs.invalidate_cache()
            done_dir = f"{BUCKET}/restarted.zarr/shard_done/c"
            if fs.exists(done_dir) and len(fs.ls(done_dir)) >= 2:
                break
            time.sleep(0.1)
        proxy.stop()  # the server "goes down": connections drop, new ones are refused
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate()
        assert proc.returncode != 0
        assert "Traceback" not in err, err
    finally:
        proxy.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = LogitStore.open(
        url, require_complete=False, storage_options={"endpoint_url": s3["endpoint"]}
    )
    assert not partial.meta.complete and 0 < partial.done_mask().sum() < partial.meta.num_shards

    proxy.start()  # the server is back, with its data
    try:
        subprocess.run(args, cwd=ROOT, env={**env, "SOFTCACHE_TEST_SLEEP": "0"}, check=True)
    finally:
        proxy.stop()
    finished = LogitStore.open(url, storage_options={"endpoint_url": s3["endpoint"]})
    _assert_same_arrays(finished, _local_build(tmp_path / "uninterrupted.zarr"))


def test_zip_archive_reads_and_trains_read_only(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    folder = tmp_path / "store.zarr"
    build(
        BuildConfig(
            teacher=f"{SPECS}:teacher",
            dataset=f"{SPECS}:dataset",
            output=str(folder),
            shard_rows=64,
            device="cpu",
        ),
        progress=False,
    )
    archive = tmp_path / "store.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    zipped = LogitStore.open(str(archive))
    _assert_same_arrays(zipped, LogitStore.open(str(folder)))
    assert zarr.open_group(zarr.storage.ZipStore(archive, mode="r"), mode="r")[
        "sample_hash"
    ].shape == (300,)
    from click.testing import CliRunner

    from softcache.cli import main

    result = CliRunner().invoke(
        main, ["verify", str(archive), "--dataset", f"{SPECS}:dataset", "-q"]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        main,
        [
            "build",
            "--teacher",
            f"{SPECS}:teacher",
            "--dataset",
            f"{SPECS}:dataset",
            "--output",
            str(archive),
            "--overwrite",
        ],
    )
    assert result.exit_code == 1 and "zip archive" in result.output


def test_lm_store_builds_verifies_and_trains_on_s3(s3, tmp_path, monkeypatch):
    """A per-token store on S3: build --lm, verify against the dataset, train --lm (read only)."""
    monkeypatch.chdir(ROOT)
    url = f"s3://{BUCKET}/lm.zarr"
    option = ["--storage-option", f"endpoint_url={s3['endpoint']}"]
    lm_specs = "tests.helpers.token_specs"
    _cli(
        "build", "--lm", "--teacher", f"{lm_specs}:causal_teacher", "--dataset",
        f"{lm_specs}:ragged_dataset", "--output", url, "--encoding", "sampled", "--draws", "12",
        "--shard-rows", "64", "--device", "cpu", "--quiet", *option,
        env=s3["env"],
    )  # fmt: skip
    verified = _cli(
        "verify", url, "--dataset", f"{lm_specs}:ragged_dataset", *option, env=s3["env"]
    )
    assert verified.stdout.startswith("OK")
    remote = LogitStore.open(url, storage_options={"endpoint_url": s3["endpoint"]})
    assert remote.meta.tokens and remote.meta.num_tokens > 0

    before = _snapshot(s3["fs"], f"{BUCKET}/lm.zarr")
    trained = _cli(
        "train", "--lm", "--store", url, "--student", "tests.helpers.lm_train_specs:causal_student",
        "--dataset", f"{lm_specs}:ragged_dataset", "--epochs", "1", "--batch-size", "8",
        "--device", "cpu", "--output", str(tmp_path / "run"), "--quiet", "--json", *option,
        env=s3["env"],
    )  # fmt: skip
    metrics = json.loads(trained.stdout)
    assert metrics["mode"] == "offline" and metrics["steps"] > 0
    assert _snapshot(s3["fs"], f"{BUCKET}/lm.zarr") == before


def test_ls_finds_stores_two_and_three_folders_deep_in_a_bucket(s3, tmp_path):
    """Teams lay out a shared bucket as `team/.../store.zarr`: ls finds them at any depth, lists
    a damaged one with its error, stops at --max-depth, and reads metadata only."""
    local = _local_build(tmp_path / "local.zarr")
    fs = s3["fs"]
    prefix = f"{BUCKET}/shelf"
    two = f"{prefix}/team-a/teacher.zarr"
    three = f"{prefix}/team-b/2026/teacher.zarr"
    broken = f"{prefix}/team-b/broken.zarr"
    for key in (two, three, broken):
        fs.put(str(tmp_path / "local.zarr"), key, recursive=True)
    fs.pipe(f"{broken}/logits/zarr.json", b"{")
    fs.pipe(f"{prefix}/team-a/notes.txt", b"not a store")
    # Chunks that do not decode: ls never reads them.
    fs.pipe(f"{two}/logits/c/0/0", b"not a chunk")
    option = ["--storage-option", f"endpoint_url={s3['endpoint']}"]
    lines = _cli("ls", f"s3://{prefix}", *option, env=s3["env"]).stdout.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        f"s3://{two}",
        f"s3://{three}",
        f"s3://{broken}",
    ]
    assert "  dense float16  300 samples  10 classes  " in lines[0]
    assert "  complete  " in lines[1]
    assert lines[2].startswith(
        f"s3://{broken}  ERROR: store s3://{broken}: logits/zarr.json is not valid JSON"
    )
    shallow = _cli("ls", f"s3://{prefix}", "--max-depth", "2", *option, env=s3["env"])
    assert [line.split("  ")[0] for line in shallow.stdout.splitlines()] == [
        f"s3://{two}",
        f"s3://{broken}",
    ]
    entries = json.loads(_cli("ls", f"s3://{prefix}", "--json", *option, env=s3["env"]).stdout)
    assert entries[0]["digest"] == local.digest  # the copy is the store, byte for byte
