"""The byte-level LM pipeline: corpus, splits, items, padding, causal models (no teacher training)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from pipelines.textlm import data, models

L = data.WINDOW


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return data.corpus()


def test_corpus_is_deterministic(corpus: data.Corpus) -> None:
    again = data.corpus.__wrapped__()  # a fresh read, bypassing the cache
    assert again.files == corpus.files
    assert again.data == corpus.data
    assert again.sha256 == corpus.sha256 == hashlib.sha256(corpus.data).hexdigest()
    assert data.fingerprint() == corpus.sha256
    assert list(corpus.files) == sorted(corpus.files)
    assert 2_000_000 <= len(corpus.data) <= 4_000_000
    assert len(corpus.data) == sum(corpus.sizes) + len(corpus.files)  # one FILE_SEP per file


def test_corpus_excludes_tests_and_generated_dirs(corpus: data.Corpus) -> None:
    for rel in corpus.files:
        assert rel.endswith(".py")
        assert not data.EXCLUDED_DIRS.intersection(Path(rel).parts[:-1]), rel
    assert bytes([data.FILE_SEP]) not in b"".join(
        (corpus.root / rel).read_bytes() for rel in corpus.files
    )


def test_select_files_on_a_fake_stdlib(tmp_path: Path) -> None:
    for rel in ("a.py", "pkg/b.py", "pkg/c.txt", "test/t.py", "pkg/tests/u.py", "encodings/e.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x = 1\n" * 10)
    assert data.select_files(tmp_path) == ["a.py", "pkg/b.py"]
    one = data.select_files(tmp_path, budget=1)
    assert len(one) == 1 and one == data.select_files(tmp_path, budget=1)


def test_manifest_records_files_and_fingerprint(corpus: data.Corpus) -> None:
    m = data.manifest()
    assert m["sha256"] == corpus.sha256 and m["bytes"] == len(corpus.data)
    assert [f["path"] for f in m["files"]] == list(corpus.files)
    assert {f["split"] for f in m["files"]} == {"train", "test"}


def test_split_is_disjoint_by_file(corpus: data.Corpus) -> None:
    test_files = [f for f in corpus.files if data.is_test_file(f)]
    train_files = [f for f in corpus.files if not data.is_test_file(f)]
    assert test_files and train_files
    assert 0.03 < len(test_files) / len(corpus.files) < 0.25
    sizes = dict(zip(corpus.files, corpus.sizes, strict=True))
    for split, files in (("train", train_files), ("test", test_files)):
        stream = data.stream(split)
        assert len(stream) == sum(sizes[f] + 1 for f in files)
        expected = b"".join((corpus.root / f).read_bytes() + b"\0" for f in files)
        assert stream.numpy().tobytes() == expected


@pytest.mark.parametrize("factory", [data.train_set, data.test_set])
def test_window_items(factory) -> None:
    ds = factory()
    stream = data.stream(ds.split)
    assert 0 < len(ds) <= data.MAX_TRAIN_WINDOWS or ds.split == "test"
    assert (ds.starts % L == 0).all() and (ds.lengths == L).all()
    assert len(set(ds.starts.tolist())) == len(ds)  # non-overlapping windows
    for i in (0, len(ds) // 2, len(ds) - 1):
        x, y = ds[i]
        assert x.shape == y.shape == (L,)
        assert x.dtype == y.dtype == torch.int64
        assert int(x.min()) >= 0 and int(x.max()) < data.VOCAB
        assert torch.equal(y[:-1], x[1:])  # labels are the inputs shifted by one
        s = int(ds.starts[i])
        assert torch.equal(x, stream[s : s + L].long())
        assert torch.equal(y, stream[s + 1 : s + L + 1].long())  # the last label is the next byte


def test_train_windows_are_capped_and_spread() -> None:
    ds = data.train_set()
    every = data.windows("train")
    assert len(ds) == data.MAX_TRAIN_WINDOWS < len(every)
    assert int(ds.starts[0]) == 0
    assert int(ds.starts[-1]) > 0.9 * int(every.starts[-1])  # reaches the end of the split
    assert (torch.diff(torch.from_numpy(ds.starts)) > 0).all()


def test_ragged_items_tile_the_stream_and_cut_at_blank_lines() -> None:
    stream = data.stream("train")
    starts, lengths = data.blocks(stream)
    assert starts[0] == 0 and (starts[1:] == starts[:-1] + lengths[:-1]).all()
    assert starts[-1] + lengths[-1] == len(stream) - 1
    assert lengths.min() >= 1 and lengths.max() == L and lengths.min() < L
    raw = stream.numpy().tobytes()
    for s, n in zip(starts[:200], lengths[:200], strict=True):
        block = raw[s : s + n]
        assert b"\n\n" not in block[:-1] and b"\0" not in block[:-1]  # cut after either

    ds = data.ragged_train_set()
    assert len(ds) == data.MAX_TRAIN_WINDOWS
    for i in (0, 1, len(ds) - 1):
        x, y = ds[i]
        s, n = int(ds.starts[i]), int(ds.lengths[i])
        assert x.shape == y.shape == (n,) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, stream[s + 1 : s + n + 1].long())


def test_pad_collate() -> None:
    items = [
        (torch.tensor([5, 6, 7]), torch.tensor([6, 7, 8])),
        (torch.tensor([9]), torch.tensor([10])),
    ]
    x, y, mask = data.pad_collate(items)
    assert x.shape == y.shape == mask.shape == (2, 3)
    assert x.dtype == y.dtype == torch.int64 and mask.dtype == torch.bool
    assert x.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert y.tolist() == [[6, 7, 8], [10, -100, -100]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match="at least one"):
        data.pad_collate([])


@pytest.mark.parametrize("factory", [models.untrained_teacher, models.student])
def test_models_are_causal_with_the_right_shape(factory) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randint(0, data.VOCAB, (3, 40))
    with torch.inference_mode():
        logits = model(x)
        assert logits.shape == (3, 40, data.VOCAB) and logits.dtype == torch.float32
        for j in (0, 17, 39):
            changed = x.clone()
            changed[:, j:] = (changed[:, j:] + 1) % data.VOCAB
            other = model(changed)
            assert torch.allclose(other[:, :j], logits[:, :j], atol=1e-5)
            assert not torch.allclose(other[:, j], logits[:, j])


def test_right_padding_leaves_real_positions_unchanged() -> None:
    torch.manual_seed(0)
    model = models.student().eval()
    short = (torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4]))
    long = (torch.arange(10), torch.arange(1, 11))
    x, _, mask = data.pad_collate([short, long])
    with torch.inference_mode():
        padded = model(x)[0][mask[0]]
        alone = model(short[0][None])[0]
    assert torch.allclose(padded, alone, atol=1e-5)


def test_student_is_much_smaller_than_the_teacher() -> None:
    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert 8 <= count(models.untrained_teacher()) / count(models.student()) <= 10


def test_too_long_input_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        models.student()(torch.zeros(1, models.MAX_LEN + 1, dtype=torch.int64))


def test_missing_teacher_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "TEACHER_CHECKPOINT", tmp_path / "teacher.pt")
    with pytest.raises(FileNotFoundError, match=r"python -m pipelines\.textlm\.prepare"):
        models.teacher()


def test_teacher_loads_a_saved_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    saved = models.untrained_teacher()
    torch.save(saved.state_dict(), path)
    monkeypatch.setattr(models, "TEACHER_CHECKPOINT", path)
    loaded = models.teacher()
    assert not loaded.training
    x = torch.randint(0, data.VOCAB, (2, 16))
    with torch.inference_mode():
        assert torch.equal(loaded(x), saved.eval()(x))
