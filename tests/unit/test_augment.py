"""Tests for softcache.data.augment: seeding, crop boxes, bit-exact replay, view policies, spec strings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from softcache.data.augment import (
    VIEW_POLICIES,
    Compose,
    HorizontalFlip,
    Identity,
    RandomResizedCrop,
    apply_batch,
    choose_views,
    describe,
    from_description,
    parse_augment,
    sample_params,
    view_generator,
)
from softcache.data.hashing import hash_rows
from softcache.errors import SpecError

FEW = settings(max_examples=40, deadline=None)
SPEC = "crop(size=24,scale=0.35:1);flip"


def _image(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 255
    return x.to(dtype)


# ---- seeding -----------------------------------------------------------------------------------


def test_view_generator_depends_on_seed_sample_and_view_only():
    draw = lambda s, i, v: view_generator(s, i, v).random(4)  # noqa: E731
    assert np.array_equal(draw(3, 10, 1), draw(3, 10, 1))
    others = [draw(4, 10, 1), draw(3, 11, 1), draw(3, 10, 0), draw(3, 10, 2)]
    assert all(not np.array_equal(draw(3, 10, 1), o) for o in others)
    # Not the stream of a shorter seed list (SeedSequence pads with zeros): [seed, i, 0] != [seed, i].
    assert not np.array_equal(draw(3, 10, 0), np.random.default_rng([3, 10]).random(4))
    with pytest.raises(ValueError, match="sample must be >= 0"):
        view_generator(0, -1, 0)


@FEW
@given(
    seed=st.integers(0, 2**40),
    indices=st.lists(st.integers(0, 10**9), min_size=1, max_size=8, unique=True),
    views=st.integers(1, 4),
)
def test_sample_params_are_per_row_and_independent_of_the_batch(seed, indices, views):
    aug = parse_augment(SPEC)
    params = sample_params(aug, seed, indices, views, (3, 40, 30))
    assert params.shape == (len(indices), views, 5) and params.dtype == np.float64
    # Each row is reproducible alone, in any order and batch.
    for j in np.random.default_rng(seed).permutation(len(indices)):
        alone = sample_params(aug, seed, [indices[j]], views, (3, 40, 30))[0]
        assert np.array_equal(alone, params[j])
        assert np.array_equal(
            aug.sample(view_generator(seed, indices[j], 0), (3, 40, 30)), alone[0]
        )


def test_views_of_a_sample_differ():
    params = sample_params(RandomResizedCrop(16), 0, np.arange(50), 4, (3, 64, 64))
    distinct = [len({tuple(p) for p in row}) for row in params]
    assert np.mean(distinct) > 3.9


def test_sample_params_rejects_a_bad_user_augmentation():
    class Bad(Identity):
        param_names = ("a", "b")

        def sample(self, generator, shape):
            return np.array([1.0, np.nan])

    with pytest.raises(SpecError, match="2 finite numbers"):
        sample_params(Bad(), 0, [0], 1, (3, 8, 8))


# ---- RandomResizedCrop -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 400),
    width=st.integers(1, 400),
    scale=st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted),
    ratio=st.tuples(st.floats(0.1, 10.0), st.floats(0.1, 10.0)).map(sorted),
    seed=st.integers(0, 2**32),
)
def test_crop_boxes_are_inside_the_image_and_within_bounds(height, width, scale, ratio, seed):
    crop = RandomResizedCrop(8, scale=scale, ratio=ratio)
    box = crop.sample(np.random.default_rng(seed), (3, height, width))
    assert box.dtype == np.float64 and box.shape == (4,)
    top, left, h, w = (int(v) for v in box)
    assert np.array_equal(box, [top, left, h, w])
    assert h >= 1 and w >= 1 and top >= 0 and left >= 0
    assert top + h <= height and left + w <= width
    if np.array_equal(box, crop.fallback(height, width)):
        return
    # A drawn box: some area fraction in `scale` and aspect ratio in `ratio` round to (h, w).
    area, eps = height * width, 1e-9
    assert (w - 0.5) * (h - 0.5) <= scale[1] * area + eps
    assert (w + 0.5) * (h + 0.5) >= scale[0] * area - eps
    assert (w - 0.5) / (h + 0.5) <= ratio[1] + eps
    assert (w + 0.5) / max(h - 0.5, 1e-12) >= ratio[0] - eps


def test_crop_falls_back_to_a_centre_crop_with_the_ratio_clamped():
    crop = RandomResizedCrop(8, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    box = crop.sample(np.random.default_rng(0), (3, 10, 100))  # no square box covers 90%
    assert box.tolist() == [0.0, 45.0, 10.0, 10.0]
    tall = RandomResizedCrop(8, scale=(0.9, 1.0), ratio=(1.0, 2.0))
    assert tall.fallback(100, 10).tolist() == [45.0, 0.0, 10.0, 10.0]
    assert RandomResizedCrop(8, ratio=(0.5, 2.0)).fallback(20, 30).tolist() == [
        0.0,
        0.0,
        20.0,
        30.0,
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.uint8])
def test_crop_matches_interpolate_up_to_rounding(dtype):
    crop = RandomResizedCrop((24, 20))
    x = _image((3, 50, 40), dtype=dtype)
    box = [5, 3, 31, 17]
    out = crop.apply(x, np.array(box, dtype=np.float64))
    assert out.shape == (3, 24, 20) and out.dtype == dtype
    patch = x[:, 5:36, 3:20].double()[None]
    ref = F.interpolate(patch, size=(24, 20), mode="bilinear", align_corners=False)[0]
    tolerance = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2.0, torch.uint8: 1.0}
    assert (out.double() - ref).abs().max() <= tolerance[dtype]


def test_crop_of_the_output_size_is_the_patch_itself():
    x = _image((3, 30, 30))
    out = RandomResizedCrop(16).apply(x, torch.tensor([4.0, 7.0, 16.0, 16.0]))
    assert torch.equal(out, x[:, 4:20, 7:23])


def test_crop_apply_is_bit_exact_across_calls_and_thread_counts():
    crop = RandomResizedCrop(224)
    x = _image((3, 300, 260))
    box = np.array([10, 5, 280, 190], dtype=np.float64)  # F.interpolate differs across threads here
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            outs.extend([crop.apply(x, box), crop.apply(x, box)])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_replay_is_bit_exact_in_a_fresh_process_on_generic_cpu_code():
    """A new process, one thread, and ATen's non-vectorised kernels hash the same views."""
    script = textwrap.dedent(
        f"""
        import json, numpy as np, torch
        from softcache.data.augment import apply_batch, parse_augment, sample_params
        from softcache.data.hashing import hash_rows
        torch.set_num_threads(1)
        aug = parse_augment({SPEC!r})
        x = (torch.rand((6, 3, 50, 37), generator=torch.Generator().manual_seed(0)) * 255)
        params = sample_params(aug, 7, np.arange(6), 3, (3, 50, 37))[:, 2]
        print(json.dumps([params.tolist(), hash_rows(apply_batch(aug, x, params)).tolist()]))
        """
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    params, hashes = json.loads(done.stdout)
    aug = parse_augment(SPEC)
    ours = sample_params(aug, 7, np.arange(6), 3, (3, 50, 37))[:, 2]
    assert ours.tolist() == params
    x = _image((6, 3, 50, 37))
    assert (
        hash_rows(torch.stack([aug.apply(xi, p) for xi, p in zip(x, ours, strict=True)])).tolist()
        == hashes
    )


@pytest.mark.parametrize(
    ("box", "match"),
    [([0, 0, 10, 10.5], "integers"), ([25, 0, 10, 10], "not inside"), ([0, 0, 0, 5], "not inside")],
)
def test_crop_rejects_boxes_that_do_not_fit(box, match):
    with pytest.raises(ValueError, match=match):
        RandomResizedCrop(8).apply(_image((3, 30, 30)), np.array(box, dtype=np.float64))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": (8, 8, 8)},
        {"size": 8, "scale": (0.5, 0.1)},
        {"size": 8, "ratio": (0, 1)},
    ],
)
def test_crop_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        RandomResizedCrop(**kwargs)


# ---- HorizontalFlip, Identity, Compose ---------------------------------------------------------


def test_flip_zero_is_identity_and_one_mirrors():
    flip, x = HorizontalFlip(), _image((3, 5, 7))
    assert torch.equal(flip.apply(x, np.array([0.0])), x)
    assert torch.equal(flip.apply(x, torch.tensor([1.0])), x[..., torch.arange(6, -1, -1)])
    with pytest.raises(ValueError, match=r"0\.0 or 1\.0"):
        flip.apply(x, np.array([0.5]))


def test_flip_probability():
    draws = sample_params(HorizontalFlip(0.25), 0, np.arange(4000), 1, (3, 4, 4)).ravel()
    assert set(np.unique(draws)) <= {0.0, 1.0}
    assert abs(draws.mean() - 0.25) < 0.03
    assert sample_params(HorizontalFlip(0.0), 0, np.arange(50), 2, (3, 4, 4)).sum() == 0
    assert sample_params(HorizontalFlip(1.0), 0, np.arange(50), 2, (3, 4, 4)).min() == 1


def test_identity_has_no_parameters_and_returns_the_input():
    aug, x = parse_augment("identity"), _image((2, 3, 8, 8))
    assert isinstance(aug, Identity) and aug.param_names == ()
    params = sample_params(aug, 0, np.arange(5), 1, (3, 8, 8))
    assert params.shape == (5, 1, 0)
    first = x[0]
    assert aug.apply(first, params[0, 0]) is first
    assert torch.equal(apply_batch(aug, x, params[:2, 0]), x)
    assert choose_views("random", 1, np.arange(10), 3, 5).tolist() == [0] * 10


def test_compose_parameter_layout():
    crop, flip = RandomResizedCrop(8), HorizontalFlip()
    aug = Compose(Compose(crop, flip), Identity(), HorizontalFlip(1.0))
    assert aug.parts == (crop, flip, aug.parts[2], aug.parts[3])  # flattened
    assert aug.param_names == (
        "crop.top",
        "crop.left",
        "crop.height",
        "crop.width",
        "flip.flip",
        "flip_1.flip",
    )
    params = aug.sample(np.random.default_rng(1), (3, 20, 20))
    assert params.shape == (6,) and params[5] == 1.0
    generator = np.random.default_rng(1)  # the parts draw from one generator in turn
    assert np.array_equal(params[:4], crop.sample(generator, (3, 20, 20)))
    assert np.array_equal(params[4:5], flip.sample(generator, (3, 8, 8)))
    assert [p.tolist() for p in aug.split(params)] == [
        params[:4].tolist(),
        params[4:5].tolist(),
        [],
        params[5:].tolist(),
    ]
    x = _image((3, 20, 20))
    expected = flip.apply(crop.apply(x, params[:4]), params[4:5]).flip(-1)
    assert torch.equal(aug.apply(x, params), expected)
    assert aug.output_shape((3, 20, 20)) == (3, 8, 8)


@FEW
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    batch=st.integers(0, 5),
    seed=st.integers(0, 2**32),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.uint8]),
)
def test_batch_apply_equals_per_sample_apply_bitwise(height, width, batch, seed, dtype):
    aug = parse_augment("crop(size=7:5,scale=0.2:1);flip")
    x = _image((batch, 2, height, width), seed=seed, dtype=dtype)
    params = sample_params(aug, seed, np.arange(batch), 2, (2, height, width))[:, 1]
    out = apply_batch(aug, x, params)
    assert out.shape == (batch, 2, 7, 5) and out.dtype == dtype
    for i in range(batch):
        assert torch.equal(out[i], aug.apply(x[i], params[i]))
        assert torch.equal(out[i], aug.apply(x[i], torch.from_numpy(params[i])))


# ---- choose_views ------------------------------------------------------------------------------


@FEW
@given(
    views=st.integers(1, 7),
    first_epoch=st.integers(0, 10**6),
    indices=st.lists(st.integers(0, 2**40), max_size=20),
)
def test_cycle_shows_each_view_once_in_any_v_consecutive_epochs(views, first_epoch, indices):
    rows = np.array(indices, dtype=np.int64)
    seen = np.stack([choose_views("cycle", views, rows, 0, first_epoch + e) for e in range(views)])
    assert seen.dtype == np.int64
    assert np.array_equal(np.sort(seen, axis=0), np.repeat(np.arange(views)[:, None], len(rows), 1))


@FEW
@given(
    views=st.integers(1, 9),
    seed=st.integers(0, 2**63),
    epoch=st.integers(0, 10**6),
    indices=st.lists(st.integers(0, 2**62), min_size=1, max_size=30),
    data=st.data(),
)
def test_random_view_depends_on_seed_epoch_and_sample_only(views, seed, epoch, indices, data):
    rows = np.array(indices, dtype=np.int64)
    chosen = choose_views("random", views, rows, seed, epoch)
    assert chosen.dtype == np.int64 and ((chosen >= 0) & (chosen < views)).all()
    subset = data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=len(rows)))
    assert np.array_equal(choose_views("random", views, rows[subset], seed, epoch), chosen[subset])


def test_random_views_are_roughly_uniform_and_change_with_epoch_and_seed():
    rows = np.arange(40_000)
    chosen = choose_views("random", 4, rows, 0, 0)
    counts = np.bincount(chosen, minlength=4)
    assert np.abs(counts - 10_000).max() < 400  # 4 standard deviations
    # Independent across epochs: a sample keeps its view with probability 1/4.
    assert abs((chosen == choose_views("random", 4, rows, 0, 1)).mean() - 0.25) < 0.02
    assert abs((chosen == choose_views("random", 4, rows, 1, 0)).mean() - 0.25) < 0.02


def test_choose_views_errors():
    with pytest.raises(ValueError, match="cycle, random"):
        choose_views("round-robin", 4, np.arange(3), 0, 0)
    with pytest.raises(ValueError, match="num_views must be >= 1"):
        choose_views("cycle", 0, np.arange(3), 0, 0)
    with pytest.raises(ValueError, match="integers"):
        choose_views("cycle", 2, np.array([0.5]), 0, 0)
    assert VIEW_POLICIES == ("cycle", "random")


# ---- spec strings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "names"),
    [
        ("crop(size=32)", RandomResizedCrop, ("top", "left", "height", "width")),
        (" flip ( p = 0.3 ) ", HorizontalFlip, ("flip",)),
        ("flip()", HorizontalFlip, ("flip",)),
        ("identity", Identity, ()),
        ("crop(size=32:24,ratio=1:2) ; flip", Compose, None),
    ],
)
def test_parse_augment_grammar(spec, kind, names):
    aug = parse_augment(spec)
    assert isinstance(aug, kind)
    if names is not None:
        assert aug.param_names == names


def test_parse_augment_arguments():
    crop = parse_augment("crop(size=32:24,scale=0.35:1,ratio=1:2)")
    assert isinstance(crop, RandomResizedCrop)
    assert (crop.size, crop.scale, crop.ratio) == ((32, 24), (0.35, 1.0), (1.0, 2.0))
    assert describe(crop) == {
        "name": "crop",
        "param_names": ["top", "left", "height", "width"],
        "arguments": {"size": [32, 24], "scale": [0.35, 1.0], "ratio": [1.0, 2.0]},
        "spec": "crop(size=32:24,scale=0.35:1.0,ratio=1.0:2.0)",
    }


@FEW
@given(
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    scale=st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted),
    ratio=st.tuples(st.floats(0.2, 5.0), st.floats(0.2, 5.0)).map(sorted),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
def test_describe_then_parse_rebuilds_the_same_views(size, scale, ratio, p, seed):
    aug = Compose(RandomResizedCrop(size, scale=scale, ratio=ratio), HorizontalFlip(p))
    description = json.loads(json.dumps(describe(aug)))  # as stored in the metadata
    again = from_description(description)
    assert describe(again) == description
    assert parse_augment(description["spec"]).param_names == aug.param_names
    params = sample_params(aug, seed, np.arange(3), 2, (1, 15, 13))
    assert np.array_equal(sample_params(again, seed, np.arange(3), 2, (1, 15, 13)), params)
    x = _image((3, 1, 15, 13), seed=seed)
    assert torch.equal(apply_batch(again, x, params[:, 1]), apply_batch(aug, x, params[:, 1]))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty"),
        ("crop(size=32);;flip", "empty item"),
        ("crop(size=32", "unclosed"),
        ("crop(size=32))", "unmatched"),
        ("rotate(deg=10)", "unknown augmentation 'rotate'.*crop, flip, identity"),
        ("crop", "needs size"),
        ("crop(scale=0.5:1)", "needs size"),
        ("crop(size=32,zoom=2)", "unknown argument 'zoom'.*size, scale, ratio"),
        ("crop(size=32,size=16)", "twice"),
        ("crop(size=32.5)", "size=32.5"),
        ("crop(size=32,scale=0.5)", "pair"),
        ("crop(size=32,scale=1:0.5)", "0 < lo <= hi"),
        ("flip(p=2)", r"\[0, 1\]"),
        ("flip(p=nan)", "finite"),
        ("flip(0.5)", "key=value"),
        ("crop(size=32) flip", "cannot parse"),
        ("no_such_module_xyz:make", "cannot import"),
    ],
)
def test_parse_augment_errors_say_what_is_wrong(spec, match):
    with pytest.raises(SpecError, match=match):
        parse_augment(spec)


USER_AUGMENTATION = """
import numpy as np
import torch


class Shift:
    param_names = ("dx",)

    def sample(self, generator, shape):
        return np.array([float(generator.integers(0, shape[-1]))])

    def apply(self, x, params):
        return torch.roll(x, int(params[0]), dims=-1)

    def output_shape(self, shape):
        return shape


def make():
    return Shift()


def not_an_augmentation():
    return 42
"""


def test_user_augmentation_from_a_module_spec(tmp_path):
    path = tmp_path / "user_aug.py"
    path.write_text(USER_AUGMENTATION)
    spec = f"crop(size=6);{path}:make;flip"
    aug = parse_augment(spec)
    assert aug.param_names[4:] == ("make.dx", "flip.flip")
    description = describe(aug)
    assert description["spec"].split(";")[1] == f"{path}:make"
    again = from_description(json.loads(json.dumps(description)))
    params = sample_params(aug, 0, np.arange(4), 2, (3, 10, 10))
    assert np.array_equal(sample_params(again, 0, np.arange(4), 2, (3, 10, 10)), params)
    x = _image((4, 3, 10, 10))
    out = apply_batch(again, x, params[:, 0])
    assert torch.equal(out[1], aug.apply(x[1], params[1, 0]))
    with pytest.raises(SpecError, match="not an Augmentation"):
        parse_augment(f"{path}:not_an_augmentation")
    changed = {**description, "param_names": [*description["param_names"], "extra"]}
    with pytest.raises(SpecError, match="rebuild the store"):
        from_description(changed)


def test_describe_needs_an_augmentation_it_can_rebuild():
    class Mine(HorizontalFlip):  # may behave differently from what "flip(p=0.5)" rebuilds
        pass

    class Foreign:
        param_names = ()

    for aug in (Mine(), Foreign(), Compose(RandomResizedCrop(8), Mine())):
        with pytest.raises(SpecError, match="module:callable"):
            describe(aug)  # type: ignore[arg-type]
