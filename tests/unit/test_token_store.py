"""The per-token store (format_version 3) below the build: CSR rows written shard by shard and read
back sample by sample, the row codec (`softcache.store.token_codec`), and token-sequence items.

Property-based where the layout has corners: ragged lengths with empty samples (all but one empty,
too), shards and chunks of any size, both encodings, both id codings, float16 and quantised values.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from softcache.builder.tokens import shard_samples
from softcache.data.sequences import (
    IGNORE_INDEX,
    collate_sequences,
    item_tokens,
    offsets_of,
    scan,
)
from softcache.errors import ConfigError, DatasetFormatError, StoreFormatError
from softcache.store import (
    OFFSETS,
    SAMPLE_HASH,
    SHARD_DONE,
    TOKEN_COUNTS,
    TOKEN_ENTROPY,
    TOKEN_IDS,
    TOKEN_RESIDUAL,
    TOKEN_VALUES,
    TOKENS_FORMAT_VERSION,
    LogitStore,
    StoreMeta,
    check_offsets,
    decode_token_rows,
    token_arrays,
)
from softcache.store import token_coding as tk
from softcache.store.token_codec import MAX_VOCAB, TokenCodec
from softcache.store.tokenizer import TokenizerIdentity
from softcache.store.validate import parse_meta
from tests.helpers import token_specs as ts

FEW = settings(max_examples=25, deadline=None)
SOME = settings(max_examples=40, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(seed: int, rows: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=_gen(seed)) * scale


def _meta(codec: TokenCodec, lengths: np.ndarray, shard_rows: int, chunk_rows: int) -> StoreMeta:
    n = len(lengths)
    return StoreMeta(
        encoding=codec.encoding,
        num_classes=codec.vocab_size,
        k=codec.width,
        num_samples=n,
        value_dtype="float16",
        temperatures=(codec.temperature,),
        shard_rows=shard_rows,
        chunk_rows=chunk_rows,
        teacher={"spec": "m:t", "num_parameters": 1, "state_dict_sha256": "0" * 64},
        dataset={"spec": "m:d", "num_samples": n, "fingerprint": None},
        build_config={"batch_size": 4, "lm": True},
        layout="tokens",
        num_tokens=int(np.sum(lengths)),
        token_codec=codec.to_dict(),
    )


# ---- CSR round trip ------------------------------------------------------------------------------


@st.composite
def ragged_lengths(draw) -> list[int]:
    """Per-sample token counts with at least one token: random (zeros likely), or all zero but one."""
    if draw(st.booleans()):
        n = draw(st.integers(1, 12))
        lengths = [0] * n
        lengths[draw(st.integers(0, n - 1))] = draw(st.integers(1, 30))
        return lengths
    lengths = draw(st.lists(st.one_of(st.just(0), st.integers(0, 9)), min_size=1, max_size=25))
    if sum(lengths) == 0:
        lengths[draw(st.integers(0, len(lengths) - 1))] = draw(st.integers(1, 9))
    return lengths


@st.composite
def codecs(draw) -> TokenCodec:
    encoding = draw(st.sampled_from(("topk", "sampled")))
    vocab = draw(st.sampled_from((2, 37, 300, 70_000)))  # 70_000: plain ids are int32
    width = draw(st.integers(1, min(vocab, 8) if encoding == "topk" else 12))
    return TokenCodec(
        encoding=encoding,
        width=width,
        vocab_size=vocab,
        temperature=draw(st.sampled_from((1.0, 2.0))),
        ids=draw(st.sampled_from(("elias_fano", "plain"))),
        value_bits=draw(st.sampled_from((0, 7))) if encoding == "topk" else 0,
        seed=draw(st.integers(0, 5)),
    )


@FEW
@given(lengths=ragged_lengths(), codec=codecs(), data=st.data())
def test_token_rows_round_trip_sample_by_sample(lengths, codec: TokenCodec, data) -> None:
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    shard_rows = data.draw(st.integers(1, 40), label="shard_rows")
    chunk_rows = data.draw(
        st.sampled_from([d for d in range(1, shard_rows + 1) if shard_rows % d == 0]),
        label="chunk_rows",
    )
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    offsets = offsets_of(lengths)
    hashes = np.arange(len(lengths), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    logits = _logits(seed, total, codec.vocab_size)
    coded = codec.encode(logits, generator=_gen(seed))
    arrays = token_arrays({name: t.numpy() for name, t in coded.items()})

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.zarr"
        meta = _meta(codec, lengths, shard_rows, chunk_rows)
        store = LogitStore.create(path, meta)
        assert store.meta.format_version == TOKENS_FORMAT_VERSION
        assert store.meta.num_rows == total
        assert store.meta.num_shards == -(-total // shard_rows)
        store.write_samples(offsets, hashes)
        # Shards in any order: each is written alone, from its own token slice.
        order = data.draw(st.permutations(range(store.meta.num_shards)), label="shard order")
        for shard in order:
            start, stop = store.shard_bounds(shard)
            store.write_shard(shard, {name: a[start:stop] for name, a in arrays.items()})
        store.mark_complete("fp")

        reopened = LogitStore.open(path)
        assert reopened.meta.tokens and reopened.meta.codec == codec
        assert reopened.done_mask().all()
        assert set(reopened.array_names) == {*arrays, OFFSETS, SAMPLE_HASH, SHARD_DONE}
        got_offsets = reopened.offsets()
        assert got_offsets.dtype == np.int64
        np.testing.assert_array_equal(got_offsets, offsets)
        check_offsets(got_offsets, len(lengths), total)
        np.testing.assert_array_equal(reopened.sample_hashes(), hashes)
        rows = [reopened.read_rows(int(a), int(b)) for a, b in itertools.pairwise(offsets)]

    expected = _expected_rows(codec, logits, seed)
    for i, sample in enumerate(rows):
        a, b = int(offsets[i]), int(offsets[i + 1])
        for name, stored in sample.items():  # the stored bytes are the encoded rows
            assert stored.shape[0] == b - a
            np.testing.assert_array_equal(stored, arrays[name][a:b], err_msg=f"{name} of {i}")
        decoded = decode_token_rows(sample, reopened.meta)
        for name, want in expected.items():
            assert torch.equal(decoded[name], want[a:b]), f"{name} of sample {i}"

    # shard_samples: exactly the samples whose rows overlap the shard (and the empty ones between).
    for shard in range(reopened.meta.num_shards):
        start, stop = reopened.shard_bounds(shard)
        first, last = shard_samples(offsets, start, stop)
        assert offsets[first] <= start < offsets[first + 1]  # first holds row `start`
        assert offsets[last - 1] < stop <= offsets[last]  # last - 1 holds row `stop - 1`
        overlapping = {
            i for i, n in enumerate(lengths) if n and offsets[i] < stop and offsets[i + 1] > start
        }
        assert {i for i in range(first, last) if lengths[i]} == overlapping


def _expected_rows(codec: TokenCodec, logits: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """What decoding must give, computed from the logits without the codec (exact fields only)."""
    tau = codec.temperature
    if codec.encoding == "sampled":
        ids, counts = tk.sample_ids(logits, codec.width, temperature=tau, generator=_gen(seed))
        return {"ids": ids, "counts": counts.to(torch.int32)}
    values, ids, residual = tk.topk_residual(logits, codec.width, temperature=tau)
    values, ids = tk.sort_by_index(values, ids)
    out = {"indices": ids}
    if not codec.value_bits:  # float16 values are exact; codes are checked in test_codec_*
        out |= {"values": values.half().float(), "residual": residual.half().float()}
    return out


def test_an_empty_sample_reads_as_zero_rows(tmp_path: Path) -> None:
    codec = TokenCodec("topk", 3, 50)
    lengths = np.array([0, 4, 0, 0, 2, 0])
    store = LogitStore.create(tmp_path / "t.zarr", _meta(codec, lengths, 4, 2))
    store.write_samples(offsets_of(lengths), np.zeros(6, dtype=np.uint64))
    arrays = token_arrays({k: v.numpy() for k, v in codec.encode(_logits(0, 6, 50)).items()})
    for shard in range(store.meta.num_shards):
        start, stop = store.shard_bounds(shard)
        store.write_shard(shard, {k: v[start:stop] for k, v in arrays.items()})
    rows = store.read_rows(1, 1)
    assert all(v.shape[0] == 0 for v in rows.values())
    decoded = decode_token_rows(rows, store.meta)
    assert decoded["indices"].shape == (0, 3) and decoded["residual"].shape == (0,)


def test_write_samples_refuses_bad_offsets(tmp_path: Path) -> None:
    codec = TokenCodec("sampled", 4, 50)
    lengths = np.array([2, 0, 3])
    store = LogitStore.create(tmp_path / "t.zarr", _meta(codec, lengths, 4, 4))
    hashes = np.zeros(3, dtype=np.uint64)
    for bad in ([0, 2, 2], [1, 3, 3, 5], [0, 3, 2, 5], [0, 2, 2, 6]):
        with pytest.raises(StoreFormatError, match="offsets"):
            store.write_samples(np.array(bad), hashes)
    with pytest.raises(ValueError, match="hashes"):
        store.write_samples(offsets_of(lengths), np.zeros(4, dtype=np.uint64))


def test_array_layout_of_token_stores(tmp_path: Path) -> None:
    lengths = np.array([3, 0, 5])
    topk = TokenCodec("topk", 4, 300, value_bits=7)
    store = LogitStore.create(tmp_path / "a.zarr", _meta(topk, lengths, 4, 2))
    assert store.row_array_names == (TOKEN_IDS, TOKEN_VALUES, TOKEN_RESIDUAL)
    assert store.array(TOKEN_IDS).shape == (8, topk.id_bytes)
    assert store.array(TOKEN_VALUES).dtype == np.uint8
    assert store.array(TOKEN_RESIDUAL).shape == (8,)
    assert store.array(OFFSETS).shape == (4,) and store.array(SAMPLE_HASH).shape == (3,)
    assert store.array(SHARD_DONE).shape == (2,)
    sampled = TokenCodec("sampled", 300, 70_000, ids="plain")
    store = LogitStore.create(tmp_path / "b.zarr", _meta(sampled, lengths, 8, 8))
    assert store.row_array_names == (TOKEN_IDS, TOKEN_COUNTS, TOKEN_ENTROPY)
    assert store.array(TOKEN_IDS).dtype == np.int32 and store.array(TOKEN_IDS).shape == (8, 300)
    assert store.array(TOKEN_COUNTS).dtype == np.uint16  # 300 draws do not fit uint8 counts
    assert store.array(TOKEN_ENTROPY).dtype == np.float16
    with pytest.raises(StoreFormatError, match="no offsets"):
        LogitStore(store._group, _rows_meta(), "x").offsets()


def _rows_meta() -> StoreMeta:
    return StoreMeta("dense", 3, None, 2, "float16", (), 2, 2, {}, {}, {})


# ---- the codec -----------------------------------------------------------------------------------


@SOME
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 400),
    k=st.integers(1, 16),
    value_bits=st.sampled_from((0, 4, 7, 12)),
    ids=st.sampled_from(("elias_fano", "plain")),
    temperature=st.sampled_from((0.5, 1.0, 3.0)),
    scale=st.floats(0.5, 6.0),
)
def test_codec_topk_keeps_the_top_ids_values_and_tail(
    seed, vocab, k, value_bits, ids, temperature, scale
) -> None:
    k = min(k, vocab)
    codec = TokenCodec("topk", k, vocab, temperature=temperature, ids=ids, value_bits=value_bits)
    logits = _logits(seed, 7, vocab, scale)
    coded = codec.encode(logits)
    layout = codec.field_layout()
    assert set(coded) == set(layout)
    for name, (shape, dtype) in layout.items():
        assert tuple(coded[name].shape) == (7, *shape), name
        assert coded[name].numpy().dtype == dtype, name
    # Decoding works from the stored numpy arrays (uint16 included) as from tensors.
    out = codec.decode({name: t.numpy() for name, t in coded.items()})
    assert out["values"].dtype == out["residual"].dtype == torch.float32
    assert out["indices"].dtype == torch.int64 and out["indices"].shape == (7, k)

    log_p = F.log_softmax(logits.double() / temperature, dim=1)
    top = torch.topk(log_p, k, dim=1)
    for row in range(7):
        assert set(out["indices"][row].tolist()) == set(top.indices[row].tolist())
    assert bool((out["indices"][:, 1:] > out["indices"][:, :-1]).all())  # ascending ids
    true_values = log_p.gather(1, out["indices"])  # the values follow the ids
    tail = torch.log1p(-top.values.exp().sum(dim=1).clamp_max(1.0))  # log of the mass left out
    if value_bits == 0:
        torch.testing.assert_close(out["values"].double(), true_values, rtol=1e-3, atol=1e-3)
    else:
        levels = 2**value_bits - 1
        error = ((out["values"].double() / 2).exp() - (true_values / 2).exp()).abs()
        assert float(error.max()) <= 0.5 / levels + 1e-6
    # top1 is a most probable kept id: the teacher's argmax, but for a tie rounding made.
    best = codec.top1(out)
    if value_bits == 0:
        at_best = log_p.gather(1, best[:, None]).squeeze(1)
        assert bool((at_best >= log_p.max(dim=1).values * (1 + 2**-10) - 1e-6).all())
    chosen = out["values"].gather(
        1, (out["indices"] == best[:, None]).long().argmax(1, keepdim=True)
    )
    assert torch.equal(chosen.squeeze(1), out["values"].max(dim=1).values)
    if k == vocab:  # nothing left out
        assert bool((out["residual"] == (-math.inf if not value_bits else -16.0)).all())
        return
    has_tail = tail > -12.0  # below, float16 and the -16 log floor both saturate
    if value_bits == 0:
        torch.testing.assert_close(
            out["residual"].double()[has_tail], tail[has_tail], rtol=2e-3, atol=2e-3
        )
    else:
        step = 16.0 / (2**codec.residual_bits - 1)
        assert bool(((out["residual"].double() - tail).abs()[has_tail] <= step / 2 + 1e-4).all())


@SOME
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 5000),
    draws=st.sampled_from((1, 2, 12, 255, 256, 1000)),
    ids=st.sampled_from(("elias_fano", "plain")),
    temperature=st.sampled_from((0.5, 1.0, 2.0)),
)
def test_codec_sampled_counts_sum_to_the_draws(seed, vocab, draws, ids, temperature) -> None:
    codec = TokenCodec("sampled", draws, vocab, temperature=temperature, ids=ids, seed=seed)
    logits = _logits(seed, 5, vocab)
    coded = codec.encode(logits, generator=_gen(seed))
    assert coded["counts"].dtype == (torch.uint8 if draws <= 255 else torch.uint16)
    out = codec.decode({name: t.numpy() for name, t in coded.items()})
    assert out["counts"].dtype == torch.int32 and out["ids"].dtype == torch.int64
    assert bool((out["counts"].sum(dim=1) == draws).all())
    for row in range(5):
        n = int((out["counts"][row] > 0).sum())
        assert bool((out["counts"][row, :n] > 0).all()), "counts: the unique ids come first"
        assert bool((out["ids"][row, 1:n] > out["ids"][row, : n - 1]).all())  # strictly ascending
        assert bool((out["ids"][row, n:] == out["ids"][row, n - 1]).all())  # padding repeats
    assert bool(((out["ids"] >= 0) & (out["ids"] < vocab)).all())
    # The same generator state draws the same ids; the entropy is the teacher's, in float16.
    ids_again, counts_again = tk.sample_ids(
        logits, draws, temperature=temperature, generator=_gen(seed)
    )
    assert torch.equal(out["ids"], ids_again) and torch.equal(out["counts"], counts_again.int())
    entropy = tk.teacher_entropy(logits, temperature=temperature)
    torch.testing.assert_close(out["entropy"], entropy.half().float())


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.one_of(st.integers(2, 2**18), st.just(2**18), st.just(2**16 + 1)),
    k=st.integers(1, 64),
)
def test_codec_elias_fano_ids_of_large_vocabularies(seed, vocab, k) -> None:
    k = min(k, vocab)
    codec = TokenCodec("topk", k, vocab)
    logits = _logits(seed, 3, vocab)
    coded = codec.encode(logits)
    assert coded["ids"].dtype == torch.uint8 and coded["ids"].shape == (3, codec.id_bytes)
    want = torch.topk(logits, k, dim=1).indices.sort(dim=1).values
    assert torch.equal(codec.decode(coded)["indices"], want)
    plain = TokenCodec("topk", k, vocab, ids="plain")
    assert plain.field_layout()["ids"][1] == np.dtype(np.uint16 if vocab <= 65536 else np.int32)
    assert torch.equal(plain.decode(plain.encode(logits))["indices"], want)


@SOME
@given(
    encoding=st.sampled_from(("topk", "sampled")),
    width=st.integers(1, 300),
    vocab=st.integers(300, MAX_VOCAB),
    temperature=st.floats(0.01, 100.0),
    ids=st.sampled_from(("elias_fano", "plain")),
    value_bits=st.integers(0, 16),
    residual_bits=st.integers(1, 16),
    log_floor=st.floats(-40.0, -1.0),
    seed=st.integers(0, 2**63 - 1),
)
def test_codec_dict_round_trip(
    encoding, width, vocab, temperature, ids, value_bits, residual_bits, log_floor, seed
) -> None:
    value_bits = value_bits if encoding == "topk" else 0  # sampled rows have no values
    codec = TokenCodec(
        encoding, width, vocab, temperature, ids, -1, value_bits, residual_bits, log_floor, seed
    )
    assert codec.ef_low_bits == tk.elias_fano_low_bits(vocab, width)  # derived, then recorded
    data = json.loads(json.dumps(codec.to_dict()))  # as the store attribute keeps it
    assert TokenCodec.from_dict(data) == codec
    assert TokenCodec.from_dict({**data, "added_in_a_later_version": 1}) == codec
    assert codec.bytes_per_token_raw() == sum(
        int(np.prod(shape)) * dtype.itemsize for shape, dtype in codec.field_layout().values()
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoding": "dense"}, "token encoding"),
        ({"ids": "zstd"}, "id coding"),
        ({"vocab_size": 1}, "vocabulary size"),
        ({"vocab_size": MAX_VOCAB + 1}, "vocabulary size"),
        ({"width": 0}, "top-k"),
        ({"width": 51}, "top-k"),  # k > V
        ({"encoding": "sampled", "width": 0}, "draws"),
        ({"encoding": "sampled", "width": 65536}, "draws"),
        ({"value_bits": 17}, "value_bits"),
        ({"value_bits": -1}, "value_bits"),
        ({"residual_bits": 0}, "residual_bits"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"log_floor": 0.0}, "log_floor"),
        ({"log_floor": float("-inf")}, "log_floor"),
        ({"encoding": "sampled", "value_bits": 7}, "value_bits"),
    ],
)
def test_codec_refuses_bad_configs(kwargs: dict, match: str) -> None:
    values = {"encoding": "topk", "width": 4, "vocab_size": 50} | kwargs
    with pytest.raises(ConfigError, match=match):
        TokenCodec(**values)
    with pytest.raises(StoreFormatError, match="malformed token_codec"):
        TokenCodec.from_dict(values)


def test_codec_from_dict_refuses_missing_fields_and_encode_checks_the_shape() -> None:
    with pytest.raises(StoreFormatError, match="malformed token_codec"):
        TokenCodec.from_dict({"encoding": "topk", "width": 4})
    with pytest.raises(ValueError, match=r"\(T, 50\)"):
        TokenCodec("topk", 4, 50).encode(torch.zeros(3, 49))
    with pytest.raises(ValueError, match=r"\(T, 50\)"):
        TokenCodec("topk", 4, 50).encode(torch.zeros(50))


def test_a_store_with_a_malformed_token_codec_is_refused() -> None:
    meta = _meta(TokenCodec("topk", 4, 50), np.array([1, 2]), 2, 2).to_dict()
    meta["format_version"] = TOKENS_FORMAT_VERSION
    with pytest.raises(StoreFormatError, match="malformed token_codec"):
        parse_meta({**meta, "token_codec": {**meta["token_codec"], "width": 0}}, where="s")
    with pytest.raises(StoreFormatError, match="token_codec"):
        parse_meta({**meta, "token_codec": None}, where="s")
    with pytest.raises(StoreFormatError, match="layout"):
        parse_meta({**meta, "layout": "columns"}, where="s")


# ---- items and batches ---------------------------------------------------------------------------


def test_item_tokens_reads_tuples_and_dicts() -> None:
    ids, labels = item_tokens((torch.tensor([5, 6, 7]), torch.tensor([6, 7, -100])))
    assert ids.dtype == labels.dtype == torch.int64
    assert ids.tolist() == [5, 6, 7] and labels.tolist() == [6, 7, -100]
    ids, labels = item_tokens(([1, 2], None))
    assert ids.tolist() == [1, 2] and labels is None
    ids, labels = item_tokens(
        {
            "input_ids": np.array([4, 5, 0, 0], dtype=np.int32),
            "attention_mask": [1, 1, 0, 0],
            "labels": [5, -100, -100, -100],
        }
    )
    assert ids.tolist() == [4, 5] and labels.tolist() == [5, -100]
    ids, labels = item_tokens(
        {"input_ids": torch.tensor([3]), "attention_mask": torch.tensor([True])}
    )
    assert ids.tolist() == [3] and labels is None


@pytest.mark.parametrize(
    "item",
    [
        {"input_ids": [0, 0, 4, 5], "attention_mask": [0, 0, 1, 1]},  # left padding
        {"input_ids": [4, 0, 5], "attention_mask": [1, 0, 1]},  # a hole
        {"input_ids": [4, 5, 6], "attention_mask": [1, 1]},  # the wrong length
    ],
    ids=["left-padded", "hole", "short-mask"],
)
def test_item_tokens_refuses_masks_other_than_right_padding(item: dict) -> None:
    with pytest.raises(DatasetFormatError, match="right"):
        item_tokens(item, 7)
    with pytest.raises(DatasetFormatError, match="dataset item 7"):
        item_tokens(item, 7)


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ({"labels": [1]}, "without 'input_ids'"),
        (torch.tensor([1, 2, 3]), "must be"),
        ((1, 2, 3), "must be"),
        ((torch.tensor([0.5, 1.0]), None), "integer"),
        ((torch.tensor([[1, 2]]), None), "1-D"),
        ((torch.tensor([True, False]), None), "integer"),
        ((torch.tensor([1, 2]), torch.tensor([1])), "differ"),
    ],
)
def test_item_tokens_refuses_malformed_items(item, match: str) -> None:
    with pytest.raises(DatasetFormatError, match=match):
        item_tokens(item)


def test_collate_right_pads_and_keeps_the_row_order() -> None:
    items = [
        (torch.tensor([1, 2, 3]), torch.tensor([2, 3, -100])),
        {"input_ids": torch.tensor([], dtype=torch.int64)},
        {"input_ids": torch.tensor([7, 8, 0, 0]), "attention_mask": torch.tensor([1, 1, 0, 0])},
        ([9], None),
    ]
    batch = collate_sequences(items, pad_id=5)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (4, 3)
    assert batch.lengths.tolist() == [3, 0, 2, 1] and batch.num_tokens == 6
    assert batch.attention_mask.dtype == torch.bool
    assert batch.input_ids.tolist() == [[1, 2, 3], [5, 5, 5], [7, 8, 5], [9, 5, 5]]
    assert batch.labels.tolist()[0] == [2, 3, -100]
    assert bool((batch.labels[1:] == IGNORE_INDEX).all())  # padding, and items without labels
    # The alignment convention: a batch's rows are its real tokens in row-major order.
    assert batch.input_ids[batch.attention_mask].tolist() == [1, 2, 3, 7, 8, 9]
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids)


def test_empty_items_in_any_form() -> None:
    empty_forms = [
        ([], None),
        ([], []),
        (torch.tensor([], dtype=torch.int64), None),
        (np.zeros(0, dtype=np.int32), None),
        {"input_ids": []},
        {"input_ids": [], "attention_mask": []},
        {"input_ids": [0, 0], "attention_mask": [0, 0]},  # all padding
    ]
    for item in empty_forms:
        ids, labels = item_tokens(item)
        assert ids.dtype == torch.int64 and ids.shape == (0,), item
        assert labels is None or labels.shape == (0,)
    _, hashes = scan(empty_forms)
    assert len(set(hashes.tolist())) == 1  # one hash: an empty sample, whatever its form


def test_collate_of_empty_items_has_one_padding_column() -> None:
    batch = collate_sequences([([], None), {"input_ids": []}])
    assert batch.input_ids.shape == (2, 1) and not bool(batch.attention_mask.any())
    assert batch.num_tokens == 0
    assert collate_sequences([]).input_ids.shape == (0, 1)


def test_scan_sees_the_same_tokens_in_every_item_format() -> None:
    lengths, hashes = scan(ts.ragged_dataset())
    np.testing.assert_array_equal(lengths, ts.lengths())
    assert (lengths[list(ts.EMPTY_SAMPLES)] == 0).all() and hashes.dtype == np.uint64
    padded_lengths, padded_hashes = scan(ts.dict_dataset())
    np.testing.assert_array_equal(padded_lengths, lengths)
    np.testing.assert_array_equal(padded_hashes, hashes)  # padding is not part of a sample
    offsets = offsets_of(lengths)
    assert offsets[0] == 0 and offsets[-1] == lengths.sum() and offsets.dtype == np.int64
    # Sample 0 is empty (an all-zero mask is right padding too); sample 1 is the first refused.
    with pytest.raises(DatasetFormatError, match="dataset item 1: attention_mask"):
        scan(ts.left_padded_dataset())


def test_token_spec_variants_change_what_they_say(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ts.sequences()
    i = ts.CHANGED_SAMPLE
    for kind in ("token", "length", "swap"):
        monkeypatch.setenv("SOFTCACHE_TEST_LM_VARIANT", kind)
        changed = ts.sequences()
        differ = [j for j in range(len(base)) if not torch.equal(base[j], changed[j])]
        assert differ == ([i, i + 1] if kind == "swap" else [i]), kind
        total = sum(len(s) for s in changed)
        assert total == sum(len(s) for s in base) + (kind == "length"), kind
    assert int(ts.next_token(ts.NEXT_FIXED)) == ts.NEXT_FIXED
    for seq in ts.next_token_sequences():
        assert len(set(seq.tolist())) == len(seq)  # no cycle shorter than a sample


class _Words:
    """The duck-typed tokenizer `TokenizerIdentity.of` reads: 50 words, ids in order."""

    eos_token = "w1"

    def get_vocab(self) -> dict[str, int]:
        return {f"w{i}": i for i in range(50)}

    def __len__(self) -> int:
        return 50

    def convert_tokens_to_ids(self, token: str) -> int:
        return int(token[1:])


def test_a_store_with_a_malformed_tokenizer_is_refused() -> None:
    meta = _meta(TokenCodec("topk", 4, 50), np.array([1, 2]), 2, 2).to_dict()
    meta["format_version"] = TOKENS_FORMAT_VERSION
    good = TokenizerIdentity.of(_Words(), 50).to_dict()
    parsed = parse_meta({**meta, "tokenizer": good}, where="s")
    assert parsed.tokenizer_identity == TokenizerIdentity.of(_Words(), 50)
    assert parse_meta(meta, where="s").tokenizer_identity is None  # optional
    with pytest.raises(StoreFormatError, match=r"s: softcache\.tokenizer\.blocks is"):
        parse_meta({**meta, "tokenizer": {**good, "blocks": []}}, where="s")
    with pytest.raises(StoreFormatError, match=r"softcache\.tokenizer\.logit_width is 64"):
        parse_meta({**meta, "tokenizer": {**good, "logit_width": 64}}, where="s")
    with pytest.raises(StoreFormatError, match=r"softcache\.tokenizer is"):
        parse_meta({**meta, "tokenizer": "gpt2"}, where="s")
