"""Augmentations whose every view is stored as numbers and replayed bit for bit.

A cache of one fixed view per sample cannot teach a student that trains on random crops (Beyer et
al., 2022), so a store keeps V views per sample, each with the parameters that recreate it. This
module is the pure part: augmentations, the seeding of their parameters, the choice of view per
epoch, and the spec strings that name an augmentation on the command line and in a store.

The protocol. An `Augmentation` has fixed-width parameters (`param_names`, P of them). `sample`
draws one view's parameters from a numpy generator, as a (P,) float64 vector (float64 holds every
integer below 2**53 exactly, so crop boxes survive, and user augmentations may need floats);
`apply` recreates the view from the input and those parameters, deterministically; `output_shape`
gives the view's shape, which may depend on the input's shape but not on the parameters (views are
stacked into batches). A store keeps the (N, V, P) float64 parameters, not pickles.

Seeding. View v of sample i draws from `view_generator(seed, i, v)`, a generator of its own: the
parameters depend on nothing but those three numbers, not on batch composition, worker count, rank
or where a resumed build restarted, so an interrupted build recreates the views it lost exactly.

Bit-exact replay. The store hashes each view as the teacher saw it, and training checks the
replayed input against that hash. `torch.nn.functional.interpolate` does not allow it: its bilinear
CPU kernel gives different bits with 1 or 2 threads (DataLoader workers run single-threaded) and
on CPUs of different vector widths. `RandomResizedCrop` therefore resizes with the same bilinear
weights (align_corners=False, no antialias) written as a gather and separate multiplies and adds:
each element is then rounded the same way whatever the threads, vector width or batch size (float32
arithmetic for float32 and narrower inputs, float64 for float64; integer inputs are rounded back).
It costs about twice `interpolate` (2.3 against 1.1 ms for a 400 x 300 box to 224 x 224, one core)
and agrees with it to about 1e-7 relative. `apply_batch` crops a whole batch in one pass: 6 ms for
128 CIFAR images with `crop;flip`, against 45 ms sample by sample.

Wrapping your own augmentation, e.g. from torchvision v2: draw the random parameters in `sample`
with the given generator (never from torch's global generator, which the seeding above does not
reach), and apply them in `apply`, typically with `torchvision.transforms.v2.functional`::

    import torchvision.transforms.v2.functional as TF

    class Jitter:
        param_names = ("brightness", "contrast")

        def sample(self, generator, shape):
            return generator.uniform(0.6, 1.4, size=2)

        def apply(self, x, params):
            brightness, contrast = (float(p) for p in params)
            return TF.adjust_contrast(TF.adjust_brightness(x, brightness), contrast)

        def output_shape(self, shape):
            return shape

    def make():  # named on the command line as "mypkg.augs:make", alone or after "crop(size=224);"
        return Jitter()

A torchvision v2 transform object splits the same way: its `make_params(flat_inputs)` (called
`_get_params` before torchvision 0.21) draws a dict from torch's global generator, and its
`transform(x, params)` (`_transform`) applies it. Call `make_params([torch.empty(shape)])` inside
`torch.random.fork_rng()` after `torch.manual_seed(int(generator.integers(2**63)))`, return the
dict's numbers, and rebuild the dict from them in `apply`. Parameters that are not a few numbers
(noise) are stored as a seed, `float(generator.integers(2**53))`, from which `apply` seeds a
`torch.Generator`. Replay is checked bit for bit, so `apply` must give the same bits with any number
of threads (DataLoader workers run one): kernels built on `interpolate` (torchvision's resize) may
not, so compare its output under `torch.set_num_threads(1)` and the default before building.

Mixup and cutmix are not stored views: the student mixes two samples' inputs and mixes their
stored soft labels with the same weight. The teacher never saw the mixed image, so the target is
the mixture of its two predictions, not its prediction on the mixture.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from softcache.errors import SpecError
from softcache.runtime.specs import instantiate

__all__ = [
    "VIEW_POLICIES",
    "Augmentation",
    "Compose",
    "HorizontalFlip",
    "Identity",
    "RandomResizedCrop",
    "apply_batch",
    "choose_views",
    "describe",
    "from_description",
    "parse_augment",
    "sample_params",
    "view_generator",
]

Params = torch.Tensor | np.ndarray


class Augmentation(Protocol):
    """What a store's views are made with; see the module docstring."""

    @property
    def param_names(self) -> tuple[str, ...]:
        """The P parameter names, in the order of `sample`'s vector."""
        ...

    def sample(self, generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Draw one view's parameters for an input of `shape` (C, H, W): (P,) float64."""
        ...

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The view of `x` (C, H, W) with `params` (P,): (C, H', W'), the same bits every call."""
        ...

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape `apply` returns for an input of `shape`."""
        ...


# ---- seeding -----------------------------------------------------------------------------------

# A tag ending every view's seed: SeedSequence pads with zeros, so [seed, i, 0] would draw the same
# stream as [seed, i] (for example an epoch plan's [seed, epoch]); the tag keeps the streams apart.
_VIEW_STREAM = 0x76696577  # "view"


def view_generator(seed: int, sample: int, view: int) -> np.random.Generator:
    """The generator that draws view `view` of sample `sample` (all three integers >= 0).

    It depends on these three numbers alone, so a view's parameters are the same whatever the
    batch, worker, rank or resume point that asks for them.
    """
    entropy = [
        _non_negative(name, v) for name, v in (("seed", seed), ("sample", sample), ("view", view))
    ]
    return np.random.default_rng([*entropy, _VIEW_STREAM])


def sample_params(
    aug: Augmentation,
    seed: int,
    indices: Sequence[int] | np.ndarray,
    views: int,
    shape: tuple[int, ...],
) -> np.ndarray:
    """Every view's parameters for some samples.

    Args:
        aug: the augmentation.
        seed: the build's augmentation seed (>= 0).
        indices: (n,) sample indices (>= 0), in any order.
        views: views per sample (V >= 1).
        shape: one input's shape (C, H, W).

    Returns:
        (n, V, P) float64; `[j, v]` is drawn from `view_generator(seed, indices[j], v)`.

    Raises:
        SpecError: `aug.sample` returned something other than P finite numbers.
    """
    rows = _indices(indices)
    width = len(aug.param_names)
    out = np.empty((len(rows), _positive("views", views), width), dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    for j, sample in enumerate(rows.tolist()):
        for v in range(views):
            params = np.asarray(aug.sample(view_generator(seed, sample, v), shape), np.float64)
            if params.shape != (width,) or not np.isfinite(params).all():
                raise SpecError(
                    f"{type(aug).__name__}.sample returned {params!r}; expected {width} finite "
                    f"numbers, one per name in param_names={aug.param_names}"
                )
            out[j, v] = params
    return out


# ---- choosing a view per epoch -----------------------------------------------------------------

VIEW_POLICIES = ("cycle", "random")


def choose_views(
    policy: str, num_views: int, indices: Sequence[int] | np.ndarray, seed: int, epoch: int
) -> np.ndarray:
    """Which stored view each sample of a batch replays in an epoch.

    `cycle`: view `(epoch + i) % V`. Over any V consecutive epochs each sample sees each of its
    views exactly once; the offset by the sample index makes every epoch use all V view slots
    (a quarter of the samples on each with V = 4) rather than slot `epoch % V` for all, so any
    difference between slots (a user augmentation whose view 0 is the plain image) is spread out.
    The seed is unused.

    `random`: view `splitmix64(seed, epoch, i) % V`, independent draws per (seed, epoch, sample):
    no state, O(batch) work, and a sample's view does not depend on which samples share its
    batch, on the rank, or on where a run resumed.

    Args:
        policy: `cycle` or `random`.
        num_views: V >= 1.
        indices: (B,) sample indices (>= 0).
        seed: the run's seed (>= 0).
        epoch: the epoch (>= 0).

    Returns:
        (B,) int64 view indices in [0, V).

    Raises:
        ValueError: an unknown policy or an out-of-range argument.
    """
    rows = _indices(indices)
    views = _positive("num_views", num_views)
    epoch = _non_negative("epoch", epoch)
    if policy == "cycle":
        return (rows + epoch) % views
    if policy == "random":
        key = _splitmix64(
            _splitmix64(np.array([_non_negative("seed", seed)], np.uint64)) ^ np.uint64(epoch)
        )
        return (_splitmix64(key ^ rows.astype(np.uint64)) % np.uint64(views)).astype(np.int64)
    raise ValueError(f"unknown view policy {policy!r}; choose one of {', '.join(VIEW_POLICIES)}")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele et al., 2014), elementwise on uint64 (wrapping)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# ---- the augmentations -------------------------------------------------------------------------


def apply_batch(aug: Augmentation, inputs: torch.Tensor, params: Params) -> torch.Tensor:
    """Apply `aug` to a batch, each sample with its own parameters.

    Uses the augmentation's own `apply_batch` where it has one (the built-ins do, and equal their
    per-sample `apply` bit for bit), else `apply` sample by sample.

    Args:
        aug: the augmentation.
        inputs: (B, C, H, W) inputs.
        params: (B, P) float64 parameters.

    Returns:
        (B, *aug.output_shape((C, H, W))) views.
    """
    method = getattr(aug, "apply_batch", None)
    if callable(method):
        out: torch.Tensor = method(inputs, params)
        return out
    matrix = _param_matrix(params, inputs.shape[0], len(aug.param_names))
    if inputs.shape[0] == 0:
        return inputs.new_empty((0, *aug.output_shape(tuple(inputs.shape[1:]))))
    return torch.stack([aug.apply(x, p) for x, p in zip(inputs, matrix, strict=True)])


class _Builtin:
    """Shared plumbing: per-sample `apply` is the batch of one, so the two agree by construction."""

    name = ""
    param_names: tuple[str, ...] = ()

    def arguments(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-able."""
        return {}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """The view of one input (C, H, W) with its (P,) parameters."""
        if x.ndim != 3:
            raise ValueError(
                f"{self.name}: expected one (C, H, W) input, got shape {tuple(x.shape)}"
            )
        return self.apply_batch(x[None], _param_matrix(params, 1, len(self.param_names)))[0]

    def apply_batch(self, inputs: torch.Tensor, params: Params) -> torch.Tensor:
        """The views of (B, C, H, W) inputs with their (B, P) parameters."""
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape `apply` returns for an input of `shape`."""
        return tuple(shape)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_spec_of(self)!r})"


class Identity(_Builtin):
    """No augmentation (P = 0): the view is the input itself. Spec: `identity`."""

    name = "identity"

    def sample(self, generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """No parameters: (0,) float64."""
        return np.empty(0, dtype=np.float64)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """`x` itself."""
        return x

    def apply_batch(self, inputs: torch.Tensor, params: Params) -> torch.Tensor:
        """`inputs` themselves."""
        return inputs


class HorizontalFlip(_Builtin):
    """Mirror left-right with probability `p`; parameter `flip` is 0.0 or 1.0. Spec: `flip(p=0.5)`."""

    name = "flip"
    param_names = ("flip",)

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability p must be in [0, 1], got {p}")
        self.p = float(p)

    def arguments(self) -> dict[str, Any]:
        return {"p": self.p}

    def sample(self, generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """(1,) float64: 1.0 with probability p."""
        return np.array([float(generator.random() < self.p)])

    def apply_batch(self, inputs: torch.Tensor, params: Params) -> torch.Tensor:
        flags = _param_matrix(params, inputs.shape[0], 1)[:, 0]
        if not np.isin(flags, (0.0, 1.0)).all():
            raise ValueError(f"flip parameters must be 0.0 or 1.0, got {np.unique(flags)}")
        mask = torch.from_numpy(flags == 1.0).to(inputs.device)
        mask = mask.reshape(-1, *([1] * (inputs.ndim - 1)))
        return torch.where(mask, inputs.flip(-1), inputs)


class RandomResizedCrop(_Builtin):
    """Crop a random box and resize it to `size`, as torchvision's RandomResizedCrop.

    Sampling follows torchvision's `RandomResizedCrop.get_params`: up to 10 draws of an area
    fraction (uniform in `scale`) and an aspect ratio (log-uniform in `ratio`), keeping the first box
    that fits, then a centre crop clamped to `ratio` (at least 1 x 1 here). Parameters are the box:
    (top, left, height, width), integers stored as float64. The resize is bilinear
    (align_corners=False, no antialias), bit-exact: see the module docstring.
    Spec: `crop(size=224,scale=0.08:1,ratio=0.75:1.3333)`.

    Args:
        size: output (height, width), or one int for a square.
        scale: (lo, hi) fraction of the input's area, 0 < lo <= hi.
        ratio: (lo, hi) aspect ratio width / height, 0 < lo <= hi.
    """

    name = "crop"
    param_names = ("top", "left", "height", "width")

    def __init__(
        self,
        size: int | Sequence[int],
        *,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
    ) -> None:
        sizes = (size, size) if isinstance(size, int) else tuple(size)
        if len(sizes) != 2 or not all(isinstance(s, int) and s >= 1 for s in sizes):
            raise ValueError(f"crop size must be an int >= 1 or (height, width), got {size!r}")
        self.size: tuple[int, int] = (int(sizes[0]), int(sizes[1]))
        self.scale = _range("scale", scale)
        self.ratio = _range("ratio", ratio)

    def arguments(self) -> dict[str, Any]:
        return {"size": list(self.size), "scale": list(self.scale), "ratio": list(self.ratio)}

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*tuple(shape)[:-2], *self.size)

    def sample(self, generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """(4,) float64 (top, left, height, width), inside an input of `shape` (..., H, W)."""
        height, width = int(shape[-2]), int(shape[-1])
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * generator.uniform(*self.scale)
            aspect = math.exp(generator.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(generator.integers(0, height - h + 1))
                left = int(generator.integers(0, width - w + 1))
                return np.array([top, left, h, w], dtype=np.float64)
        return self.fallback(height, width)

    def fallback(self, height: int, width: int) -> np.ndarray:
        """The centre box used when no draw fits: (4,) float64 (top, left, height, width)."""
        in_ratio = width / height
        h, w = height, width
        if in_ratio < self.ratio[0]:
            h = round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w = round(height * self.ratio[1])
        h, w = min(max(h, 1), height), min(max(w, 1), width)
        return np.array([(height - h) // 2, (width - w) // 2, h, w], dtype=np.float64)

    def apply_batch(self, inputs: torch.Tensor, params: Params) -> torch.Tensor:
        batch, height, width = inputs.shape[0], inputs.shape[-2], inputs.shape[-1]
        matrix = _param_matrix(params, batch, 4)
        boxes = matrix.astype(np.int64)
        if (boxes != matrix).any():
            raise ValueError(
                f"crop boxes must be integers, got {matrix[(boxes != matrix).any(1)][0]}"
            )
        top, left, h, w = boxes.T
        bad = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (top + h > height) | (left + w > width)
        if bad.any():
            raise ValueError(
                f"crop box (top, left, height, width) {boxes[bad][0].tolist()} is not inside the "
                f"{height} x {width} input; parameters must come from sample() on this input's shape"
            )
        compute = torch.float64 if inputs.dtype == torch.float64 else torch.float32
        out_h, out_w = self.size
        i0, i1, l0, l1 = _linear_weights(top, h, out_h, compute)
        rows = _lerp(inputs, -2, i0, i1, l0, l1)
        j0, j1, m0, m1 = _linear_weights(left, w, out_w, compute)
        out = _lerp(rows, -1, j0, j1, m0, m1)
        if inputs.dtype.is_floating_point:
            return out.to(inputs.dtype)
        info = torch.iinfo(inputs.dtype)
        return out.round().clamp(info.min, info.max).to(inputs.dtype)


def _linear_weights(
    start: np.ndarray, length: np.ndarray, size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """Bilinear source indices and weights, as PyTorch's (align_corners=False, no antialias).

    Args:
        start, length: (B,) int64 the crop's first index and length along the axis.
        size: the output length.

    Returns:
        i0, i1 (B, size) int64 absolute indices; l0, l1 (B, size) weights of `dtype`.
    """
    dst = np.arange(size, dtype=np.float64) + 0.5
    src = np.maximum(dst[None] * (length[:, None] / size) - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), length[:, None] - 1)
    high = np.minimum(low + 1, length[:, None] - 1)
    frac = src - low
    return (
        torch.from_numpy(start[:, None] + low),
        torch.from_numpy(start[:, None] + high),
        torch.from_numpy(1.0 - frac).to(dtype),
        torch.from_numpy(frac).to(dtype),
    )


def _lerp(
    x: torch.Tensor,
    dim: int,
    i0: torch.Tensor,
    i1: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
) -> torch.Tensor:
    """`x[i0] * w0 + x[i1] * w1` along `dim` of (B, C, H, W), per sample, in `w0`'s dtype.

    Separate multiplies and an add, each rounded on its own: no fused or reordered arithmetic.
    """
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[dim] = i0.shape[1]
    expand = list(x.shape)
    expand[dim] = i0.shape[1]

    def take(index: torch.Tensor) -> torch.Tensor:
        return x.gather(dim, index.to(x.device).reshape(shape).expand(expand)).to(w0.dtype)

    return take(i0) * w0.to(x.device).reshape(shape) + take(i1) * w1.to(x.device).reshape(shape)


class Compose(_Builtin):
    """Augmentations applied in order; parameters concatenated, names prefixed by each part's name.

    `Compose(RandomResizedCrop(32), HorizontalFlip())` has parameters `crop.top`, `crop.left`,
    `crop.height`, `crop.width`, `flip.flip`; a repeated name gets a suffix (`flip`, `flip_1`).
    Nested compositions are flattened. Each part samples from the same generator in turn, with
    the shape its predecessors produce. Spec: the parts' specs joined by `;`.
    """

    name = "compose"

    def __init__(self, *augmentations: Augmentation) -> None:
        parts: list[Augmentation] = []
        for aug in augmentations:
            parts.extend(aug.parts if isinstance(aug, Compose) else [aug])
        self.parts: tuple[Augmentation, ...] = tuple(parts)
        self.widths = tuple(len(p.param_names) for p in self.parts)
        names: list[str] = []
        seen: dict[str, int] = {}
        for part in self.parts:
            prefix = str(getattr(part, "name", "") or type(part).__name__.lower())
            count = seen.get(prefix, 0)
            seen[prefix] = count + 1
            if count:
                prefix = f"{prefix}_{count}"
            names.extend(f"{prefix}.{n}" for n in part.param_names)
        self.param_names = tuple(names)

    def arguments(self) -> dict[str, Any]:
        return {"augmentations": [describe(p) for p in self.parts]}

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for part in self.parts:
            shape = part.output_shape(shape)
        return shape

    def sample(self, generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """(P,) float64, each part's parameters in turn."""
        out = []
        for part in self.parts:
            out.append(np.asarray(part.sample(generator, shape), np.float64).reshape(-1))
            shape = part.output_shape(shape)
        return np.concatenate(out) if out else np.empty(0, dtype=np.float64)

    def split(self, params: np.ndarray) -> list[np.ndarray]:
        """(..., P) parameters as each part's (..., P_k) slice."""
        bounds = np.cumsum((0, *self.widths))
        return [params[..., a:b] for a, b in itertools.pairwise(bounds)]

    def apply_batch(self, inputs: torch.Tensor, params: Params) -> torch.Tensor:
        matrix = _param_matrix(params, inputs.shape[0], len(self.param_names))
        for part, p in zip(self.parts, self.split(matrix), strict=True):
            inputs = apply_batch(part, inputs, p)
        return inputs


class _External:
    """A user augmentation built by a `module:callable` spec, remembering that spec."""

    def __init__(self, spec: str, aug: Augmentation) -> None:
        self.spec = spec
        self.aug = aug
        self.name = spec.rpartition(":")[2]
        self.param_names = tuple(str(n) for n in aug.param_names)

    def sample(self, generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(self.aug.sample(generator, shape), dtype=np.float64)

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return self.aug.apply(x, params)

    def apply_batch(self, inputs: torch.Tensor, params: Params) -> torch.Tensor:
        return apply_batch(self.aug, inputs, params)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.aug.output_shape(shape))

    def __repr__(self) -> str:
        return f"{self.spec!r} ({self.aug!r})"


# ---- specs -------------------------------------------------------------------------------------

_ITEM = re.compile(r"([A-Za-z_]\w*)\s*(?:\((.*)\))?", re.DOTALL)
_CALLABLE = re.compile(r"[^\s();,=]+:[A-Za-z_]\w*")
_EXAMPLE = 'e.g. "crop(size=32,scale=0.35:1);flip" or "mypkg.augs:make"'


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _pair(parse: Callable[[str], Any], allow_single: bool) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        parts = text.split(":")
        if len(parts) == 1 and allow_single:
            return parse(parts[0])
        if len(parts) != 2:
            raise ValueError(f"expected a pair a:b, got {text!r}")
        return (parse(parts[0]), parse(parts[1]))

    return convert


# name -> (class, {argument: converter from text}, required arguments)
_BUILTINS: dict[
    str, tuple[Callable[..., Augmentation], dict[str, Callable[[str], Any]], tuple[str, ...]]
] = {
    "crop": (
        RandomResizedCrop,
        {"size": _pair(int, True), "scale": _pair(_float, False), "ratio": _pair(_float, False)},
        ("size",),
    ),
    "flip": (HorizontalFlip, {"p": _float}, ()),
    "identity": (Identity, {}, ()),
}


def parse_augment(spec: str) -> Augmentation:
    """Build the augmentation a spec string names.

    Grammar (whitespace around tokens is ignored)::

        spec  := item (";" item)*                  applied left to right (a Compose if > 1 item)
        item  := name ["(" [arg ("," arg)*] ")"]   a built-in
               | module.path:callable | file.py:callable   a user factory, called with no arguments
        arg   := key "=" number | key "=" number ":" number   (a:b is a pair)

    Built-ins: `crop(size=H[:W], scale=lo:hi, ratio=lo:hi)` (`RandomResizedCrop`, size
    required), `flip(p=P)` (`HorizontalFlip`), `identity` (`Identity`). For example
    `crop(size=32,scale=0.35:1);flip`. `describe(aug)["spec"]` is the canonical spec, which parses
    back to an equal augmentation.

    Raises:
        SpecError: the spec is malformed, names an unknown augmentation or argument, has a value out
            of range, or names a factory that fails or returns no augmentation.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"augmentation spec is empty; give one, {_EXAMPLE}")
    items = _split_items(spec)
    parts = [_parse_item(item.strip(), spec) for item in items]
    return parts[0] if len(parts) == 1 else Compose(*parts)


def _split_items(spec: str) -> list[str]:
    """`spec` split at the `;` outside parentheses."""
    items, depth, start = [], 0, 0
    for pos, char in enumerate(spec):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise SpecError(f"augmentation spec {spec!r} has an unmatched ')' at position {pos}")
        if char == ";" and depth == 0:
            items.append(spec[start:pos])
            start = pos + 1
    if depth:
        raise SpecError(f"augmentation spec {spec!r} has an unclosed '('; close it, {_EXAMPLE}")
    items.append(spec[start:])
    for item in items:
        if not item.strip():
            raise SpecError(
                f"augmentation spec {spec!r} has an empty item; separate items with one ';'"
            )
    return items


def _parse_item(item: str, spec: str) -> Augmentation:
    match = _ITEM.fullmatch(item)
    if match is None:
        if _CALLABLE.fullmatch(item):
            return _external(item)
        raise SpecError(f"cannot parse {item!r} in augmentation spec {spec!r}; write {_EXAMPLE}")
    name, body = match.group(1), match.group(2)
    if name not in _BUILTINS:
        raise SpecError(
            f"unknown augmentation {name!r} in {spec!r}; built-ins are {', '.join(_BUILTINS)}, "
            "or name your own as 'package.module:callable'"
        )
    factory, converters, required = _BUILTINS[name]
    kwargs: dict[str, Any] = {}
    for arg in (body or "").split(",") if (body or "").strip() else []:
        key, sep, value = (s.strip() for s in arg.partition("="))
        where = f"{name}(...) in augmentation spec {spec!r}"
        if not sep or not key or not value:
            raise SpecError(
                f"argument {arg.strip()!r} of {where} is not key=value, e.g. {name}({_hint(name)})"
            )
        if key not in converters:
            known = ", ".join(converters) or "none"
            raise SpecError(f"{where} has unknown argument {key!r}; its arguments are: {known}")
        if key in kwargs:
            raise SpecError(f"{where} gives {key!r} twice")
        try:
            kwargs[key] = converters[key](value)
        except ValueError as exc:
            raise SpecError(f"{key}={value} in {where}: {exc}") from exc
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise SpecError(
            f"{name} in augmentation spec {spec!r} needs {', '.join(missing)}: e.g. {name}({_hint(name)})"
        )
    try:
        return factory(**kwargs)
    except ValueError as exc:
        raise SpecError(f"{item!r} in augmentation spec {spec!r}: {exc}") from exc


def _hint(name: str) -> str:
    return {"crop": "size=32,scale=0.35:1", "flip": "p=0.5"}.get(name, "")


def _external(spec: str) -> Augmentation:
    aug = instantiate(spec, "augmentation")
    missing = [
        m for m in ("sample", "apply", "output_shape") if not callable(getattr(aug, m, None))
    ]
    names = getattr(aug, "param_names", None)
    if (
        missing
        or not isinstance(names, tuple | list)
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
    ):
        raise SpecError(
            f"augmentation factory {spec!r} returned {type(aug).__name__}, which is not an "
            "Augmentation: it needs param_names (a tuple of distinct str) and methods sample, apply "
            f"and output_shape{' (missing: ' + ', '.join(missing) + ')' if missing else ''}; "
            "see softcache.data.augment"
        )
    return _External(spec, aug)


def describe(aug: Augmentation) -> dict[str, Any]:
    """What a store records about its augmentation (JSON-able).

    Returns:
        {"name": str, "param_names": [str] (P), "arguments": dict, "spec": str}; `spec` is
        canonical, and `parse_augment(spec)` (or `from_description`) rebuilds the augmentation.

    Raises:
        SpecError: `aug` is a user object not built by `parse_augment`, so there is no spec that
            rebuilds it; name it as `module:callable` and build it with `parse_augment`.
    """
    if isinstance(aug, _External):
        name, arguments = aug.name, {"factory": aug.spec}
    elif type(aug) in (Identity, HorizontalFlip, RandomResizedCrop, Compose):
        # Exact types: a subclass may behave differently from the built-in its spec would rebuild.
        assert isinstance(aug, _Builtin)
        name, arguments = aug.name, aug.arguments()
    else:
        raise SpecError(
            f"cannot describe {type(aug).__name__}: a store must record how to rebuild it; make "
            "it with parse_augment('package.module:callable') from a factory that returns it"
        )
    return {
        "name": name,
        "param_names": list(aug.param_names),
        "arguments": arguments,
        "spec": _spec_of(aug),
    }


def from_description(description: Mapping[str, Any]) -> Augmentation:
    """Rebuild a store's augmentation from its metadata (`describe`'s dict, or any with `spec`).

    Raises:
        SpecError: the spec does not parse, or builds an augmentation whose `param_names` differ
            from the recorded ones (a user augmentation changed since the store was built).
    """
    aug = parse_augment(str(description.get("spec", "")))
    recorded = description.get("param_names")
    if recorded is not None and list(recorded) != list(aug.param_names):
        raise SpecError(
            f"the store's augmentation {description['spec']!r} had parameters {list(recorded)}, but "
            f"it now builds {list(aug.param_names)}; the stored views cannot be replayed with "
            "it. Restore the augmentation the store was built with, or rebuild the store"
        )
    return aug


def _spec_of(aug: Any) -> str:
    if isinstance(aug, _External):
        return aug.spec
    if isinstance(aug, Compose):
        return ";".join(_spec_of(p) for p in aug.parts)
    if not isinstance(aug, _Builtin):
        return repr(aug)
    args = ",".join(f"{k}={_format(v)}" for k, v in aug.arguments().items())
    return f"{aug.name}({args})" if args else str(aug.name)


def _format(value: Any) -> str:
    if isinstance(value, list | tuple):
        if len(set(value)) == 1 and all(isinstance(v, int) for v in value):
            return str(value[0])  # a square size
        return ":".join(_format(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


# ---- argument checks ---------------------------------------------------------------------------


def _param_matrix(params: Params, batch: int, width: int) -> np.ndarray:
    """`params` as a (batch, width) float64 array, or a ValueError."""
    array = (
        params.detach().cpu().double().numpy()
        if isinstance(params, torch.Tensor)
        else np.asarray(params, np.float64)
    )
    if array.size != batch * width:
        raise ValueError(f"expected {batch} x {width} parameters, got shape {array.shape}")
    return array.reshape(batch, width)


def _range(name: str, value: Sequence[float]) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not (0 < pair[0] <= pair[1] < math.inf):
        raise ValueError(f"{name} must be a pair 0 < lo <= hi, got {tuple(value)}")
    return (pair[0], pair[1])


def _indices(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    rows = np.asarray(indices)
    if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(
            f"indices must be a 1-d array of integers, got {rows.dtype} shape {rows.shape}"
        )
    if rows.size and rows.min() < 0:
        raise ValueError(f"indices must be >= 0, got {rows.min()}")
    return rows.astype(np.int64)


def _non_negative(name: str, value: int) -> int:
    number = operator.index(value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")
    return number


def _positive(name: str, value: int) -> int:
    number = operator.index(value)
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number
