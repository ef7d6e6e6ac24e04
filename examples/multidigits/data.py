"""MultiDigits: two handwritten digits in one image, a small analogue of MultiMNIST.

The source images are the 1,797 8x8 digits that ship with scikit-learn (``load_digits``), so
nothing is downloaded. Each MultiDigits sample pastes two of them onto a 10x14 canvas: the left
digit in columns 0-8, the right one starting at column 5 or 6, each with a random vertical shift of
0-2 rows. The two digits overlap on 2 or 3 columns (pixels are combined with ``max``), so the
shared features must separate them, which is what makes the two tasks compete.

Tasks: 1 = class of the left digit, 2 = class of the right digit, and optionally 3 = the sum of
the two digits (a regression target, scaled to [0, 1] by dividing by 18).

The train and test samples are built from disjoint sets of source images (a fixed stratified
70/30 split of the 1,797 digits), so a test image never contains a digit seen in training.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

HEIGHT = 10
WIDTH = 14
DIGIT = 8
MAX_SUM = 18.0


@dataclass(frozen=True)
class Split:
    """Images ``[n, 1, HEIGHT, WIDTH]`` in [0, 1] and digit labels ``[n, 2]`` (left, right)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def sums(self) -> Tensor:
        """Regression target of the third task: (left + right) / 18, shape ``[n]``."""
        return self.labels.sum(dim=1).to(self.images.dtype) / MAX_SUM


@dataclass(frozen=True)
class MultiDigits:
    train: Split
    test: Split


def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """The scikit-learn digits: float32 images in [0, 1] ``[1797, 8, 8]``, labels ``[1797]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split_sources(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple:
    """Indices of a stratified split of the source images into (train, test), both sorted."""
    train, test = [], []
    for digit in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == digit))
        n_test = round(test_fraction * len(indices))
        test.append(indices[:n_test])
        train.append(indices[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def compose(
    left: np.ndarray, right: np.ndarray, left_row: int, right_row: int, right_col: int
) -> np.ndarray:
    """Paste two 8x8 digits onto a HEIGHT x WIDTH canvas (pixel-wise max where they overlap)."""
    canvas = np.zeros((HEIGHT, WIDTH), dtype=left.dtype)
    canvas[left_row : left_row + DIGIT, :DIGIT] = left
    window = canvas[right_row : right_row + DIGIT, right_col : right_col + DIGIT]
    np.maximum(window, right, out=window)
    return canvas


def make_pairs(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> Split:
    """``n`` random MultiDigits samples drawn from the given pool of source images."""
    first = rng.integers(0, len(images), size=n)
    second = rng.integers(0, len(images), size=n)
    rows = rng.integers(0, HEIGHT - DIGIT + 1, size=(n, 2))
    right_cols = rng.integers(WIDTH - DIGIT - 1, WIDTH - DIGIT + 1, size=n)  # 5 or 6
    canvases = np.stack(
        [
            compose(images[a], images[b], r[0], r[1], c)
            for a, b, r, c in zip(first, second, rows, right_cols)
        ]
    )
    return Split(
        images=torch.from_numpy(canvases).unsqueeze(1),
        labels=torch.from_numpy(np.stack([labels[first], labels[second]], axis=1)),
    )


def make_multidigits(n_train: int = 6000, n_test: int = 2000, seed: int = 0) -> MultiDigits:
    """Build the data set. Same ``seed`` (and sizes), same tensors, on every machine.

    The benchmark keeps ``seed=0`` for every training seed, so that all runs are evaluated on the
    same test set.
    """
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"`n_train` and `n_test` must be positive, got {n_train} and {n_test}.")
    images, labels = load_source_digits()
    rng = np.random.default_rng(seed)
    train_idx, test_idx = split_sources(labels, test_fraction=0.3, rng=rng)
    train = make_pairs(images[train_idx], labels[train_idx], n_train, rng)
    test = make_pairs(images[test_idx], labels[test_idx], n_test, rng)
    return MultiDigits(train=train, test=test)
