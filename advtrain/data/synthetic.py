"""Synthetic images on which natural training learns a non-robust rule and adversarial training a robust one.

Every image starts mid-grey (0.5) and gets three additive parts (pixel units of [0,1]):

- robust pattern: the image is cut into a grid of up to GRID x GRID cells; at the centre of every cell sits a small
  square (a third of the cell's side, at least one pixel) per channel. Each class owns a random +-1 code over these
  squares, drawn at +-ROBUST_CONTRAST = 0.3, so two classes differ by 0.6 on some squares and an L-inf attack must
  reach eps = 0.3 to pass the midpoint: three times the default eps of 0.1. In ROBUST_SHOWN = 90% of the examples
  the code is the example's own class's, in the rest another, random class's: on its own it explains ~90% of labels.
- non-robust pattern: each class owns a random +-1 texture, a TILE x TILE tile per channel repeated over all
  pixels, added at amplitude `noise`. It predicts every label, and a convolution finds it anywhere in the image,
  but an eps = 0.1 attack can swap one class's texture for another's when noise <= 0.05.
- Gaussian pixel noise of standard deviation noise / 4, so that no two images are alike.

The result is clipped to [0,1] and rounded to uint8. Natural training must fit the 10% of examples whose squares
show the wrong class, which only the texture can do, so it comes to trust the texture over the squares: an eps = 0.1
attack then breaks it. Adversarial training at eps = 0.1 cannot use the texture and learns the squares (about 90%
robust accuracy at best). The squares are kept small so that their pixel energy (contrast^2 x pixels) does not
dwarf the texture's; with full blocks, natural training fits the squares first and takes many epochs to find the
texture. Use noise = 0.03 to 0.05. Labels are uniform over the classes; train and test follow the same distribution.
"""

import numpy as np

from .errors import DataError

ROBUST_CONTRAST = 0.3  # pixel units of [0,1], either side of mid-grey
ROBUST_SHOWN = 0.9  # fraction of examples whose squares show their own class's code
GRID = 4  # cells per side of the robust pattern (fewer on images smaller than 4 pixels)
TILE = 3  # pixels per side of the non-robust texture's tile (less on smaller images)
PIXEL_NOISE = 0.25  # std of the Gaussian pixel noise, as a fraction of `noise`
_CHUNK = 8192  # examples generated at a time, to bound float32 working memory
_STREAM = 2  # this module's stream of the run seed; the train/val split uses another


def make_synthetic(
    *, num_classes: int, shape: tuple[int, int, int], n_train: int, n_test: int, noise: float, seed: int
) -> tuple[np.ndarray, ...]:
    """(train_x (n_train,C,H,W) uint8, train_y int64, test_x, test_y), the same for the same arguments."""
    if num_classes < 2:
        raise DataError(f"synthetic data needs at least 2 classes, got dataset.num_classes={num_classes}")
    rng = np.random.default_rng([seed, _STREAM])
    channels, height, width = shape
    rows, cols = _cells(height), _cells(width)
    codes = _codes(rng, num_classes, (channels, rows.max() + 1, cols.max() + 1), shape)
    robust = codes[:, :, rows][:, :, :, cols] * robust_mask(shape)
    tile = (channels, min(TILE, height), min(TILE, width))
    texture = _codes(rng, num_classes, tile, shape)
    non_robust = texture[:, :, np.arange(height) % tile[1]][:, :, :, np.arange(width) % tile[2]]
    return (*_sample(rng, n_train, robust, non_robust, noise), *_sample(rng, n_test, robust, non_robust, noise))


def robust_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """(H,W) float mask of the pixels that carry the robust pattern: one centred square per grid cell."""
    _, height, width = shape
    return np.outer(_centres(_cells(height)), _centres(_cells(width))).astype(np.float32)


def _cells(size: int) -> np.ndarray:
    """Grid cell of every pixel along one side."""
    return np.arange(size) * min(GRID, size) // size


def _centres(cells: np.ndarray) -> np.ndarray:
    """Whether each pixel along one side lies in the centred third of its cell."""
    inside = np.zeros(len(cells), bool)
    for cell in np.unique(cells):
        where = np.flatnonzero(cells == cell)
        side = max(1, round(len(where) / 3))
        start = where[0] + (len(where) - side) // 2
        inside[start : start + side] = True
    return inside


def _codes(rng: np.random.Generator, num_classes: int, size: tuple[int, ...], shape) -> np.ndarray:
    """(K, *size) of +-1, different for every pair of classes."""
    if 2 ** int(np.prod(size)) < num_classes:
        raise DataError(f"synthetic shape {list(shape)} is too small to give {num_classes} classes distinct patterns")
    while True:  # redraw on a clash, which is rare with the 9+ values each class gets
        codes = rng.choice(np.array([-1.0, 1.0], np.float32), size=(num_classes, *size))
        if len(np.unique(codes.reshape(num_classes, -1), axis=0)) == num_classes:
            return codes


def _sample(rng, n, robust, non_robust, noise) -> tuple[np.ndarray, np.ndarray]:
    num_classes, shape = len(robust), robust.shape[1:]
    labels = rng.integers(num_classes, size=n)
    other = (labels + rng.integers(1, num_classes, size=n)) % num_classes
    shown = np.where(rng.random(n) < ROBUST_SHOWN, labels, other)
    images = np.empty((n, *shape), np.uint8)
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        x = 0.5 + ROBUST_CONTRAST * robust[shown[part]] + noise * non_robust[labels[part]]
        x += PIXEL_NOISE * noise * rng.standard_normal(x.shape, dtype=np.float32)
        images[part] = np.rint(np.clip(x, 0.0, 1.0) * 255)
    return images, labels.astype(np.int64)
