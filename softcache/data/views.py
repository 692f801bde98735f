"""Stored augmentation views: the rows a build feeds the teacher, and their replay for the student.

A store built with `views = V` and an augmentation holds V rows per sample: row `i * V + v` is
view v of sample i, the augmentation applied to the sample's input with parameters drawn from
`softcache.data.augment.view_generator(seed, i, v)`. The parameters are stored (`view_params`), so a
student replays exactly the input the teacher saw (`replay`), and the row's `sample_hash` is the
hash of that input, which is what the alignment check compares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from softcache.data.augment import Augmentation


class ViewDataset(Dataset):
    """The teacher's view of a dataset: item `i * views + v` is view v of sample i.

    Args:
        dataset: a map-style dataset of `(input, label)` items, inputs (C, H, W) tensors.
        augmentation: draws and applies each view's parameters.
        views: views per sample (V >= 1).
        seed: the build's augmentation seed; parameters derive from (seed, sample, view).
    """

    def __init__(self, dataset: Any, augmentation: Augmentation, views: int, seed: int) -> None:
        self.dataset = dataset
        self.augmentation = augmentation
        self.views = views
        self.seed = seed
        self.input_shape = tuple(torch.as_tensor(dataset[0][0]).shape)

    def __len__(self) -> int:
        return len(self.dataset) * self.views

    def params(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """(len(rows), P) float64: the parameters of the given rows' views."""
        from softcache.data.augment import view_generator

        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), len(self.augmentation.param_names)), dtype=np.float64)
        for j, row in enumerate(rows):
            sample, view = divmod(int(row), self.views)
            generator = view_generator(self.seed, sample, view)
            out[j] = self.augmentation.sample(generator, self.input_shape)
        return out

    def __getitem__(self, row: int) -> tuple[torch.Tensor, Any]:
        sample = row // self.views
        x, label = self.dataset[sample]
        params = torch.from_numpy(self.params([row])[0])
        return self.augmentation.apply(torch.as_tensor(x), params), label


def replay(augmentation: Augmentation, inputs: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """Recreate a batch of stored views from the raw inputs and the stored parameters.

    Args:
        augmentation: the store's augmentation.
        inputs: (B, C, H, W) raw samples, as the dataset returns them.
        params: (B, P) float64 stored parameters, one row per sample.

    Returns:
        (B, C, H', W') the views, bit for bit what the teacher saw (batch application rounds
        every element as the teacher's one-sample application did).
    """
    from softcache.data.augment import apply_batch

    return apply_batch(augmentation, inputs, params)


# Fresh views come from a random stream of their own, disjoint from every stored view's
# (seed, sample, view) stream: a run with --augment never replays a store's views by accident.
_FRESH_STREAM = 1


class FreshViews:
    """New random views every epoch (training without stored views): sample i in epoch e gets
    parameters from (seed, i, e), so a resumed run draws the same views.

    Args:
        augmentation: draws and applies the parameters.
        seed: the run's augmentation seed.
    """

    def __init__(self, augmentation: Augmentation, seed: int) -> None:
        self.augmentation = augmentation
        self.seed = seed

    def params(self, indices: np.ndarray, epoch: int, shape: tuple[int, ...]) -> np.ndarray:
        """(len(indices), P) float64 parameters of the samples' views in `epoch`."""
        return np.stack(
            [
                self.augmentation.sample(
                    np.random.default_rng([self.seed, int(i), epoch, _FRESH_STREAM]), shape
                )
                for i in np.asarray(indices)
            ]
        ).reshape(len(indices), len(self.augmentation.param_names))

    def views(self, inputs: torch.Tensor, indices: np.ndarray, epoch: int) -> torch.Tensor:
        """(B, C, H', W') this epoch's views of a batch of raw inputs (B, C, H, W)."""
        shape = tuple(inputs.shape[1:])
        return replay(self.augmentation, inputs, self.params(indices, epoch, shape))


def augmentation_of(description: Mapping[str, Any] | None) -> Augmentation | None:
    """The augmentation a store's views were made with, from its recorded description
    (`StoreMeta.augmentation`); None for a store without views.

    Also checks that a user augmentation still has the parameters the store recorded.
    """
    if not description:
        return None
    from softcache.data.augment import from_description

    return from_description(description)
