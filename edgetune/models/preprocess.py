"""Image preprocessing without torchvision, in numpy: resize the shorter side, centre crop,
normalise. One implementation serves training (`ImagePreprocess`, torch tensors) and ONNX
inference (`preprocess_images`, no torch).

`preprocess_images` gives float32 [N, 3, size, size]: the shorter side scaled to `resize`
(default `size`) with bilinear interpolation, antialiased when shrinking (torch's
``antialias=True``, PIL's triangle filter; a test pins it to torch), a centre crop and
per-channel normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetune.errors import DataError


@dataclass(frozen=True)
class ImagePreprocess:
    """A backbone's preprocessing; calling it gives a torch batch [N, 3, size, size].

    Accepts uint8 (0..255) or float (0..1) arrays shaped [H, W], [H, W, C], [N, H, W] or
    [N, H, W, C]; grey images are repeated to three channels. `resize` (default `size`) is the
    length the shorter side is scaled to before the centre crop, as in ImageNet evaluation.
    """

    size: int
    resize: int | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, images: Any) -> Any:
        import torch

        batch = preprocess_images(np.asarray(images), self.size, self.resize, self.mean, self.std)
        return torch.from_numpy(batch)


def preprocess_images(
    images: np.ndarray,
    size: int,
    resize: int | None = None,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> np.ndarray:
    """uint8 (0..255) or float (0..1) images [H, W], [H, W, C], [N, H, W] or [N, H, W, C] ->
    float32 [N, 3, size, size]; grey images are repeated to three channels, alpha dropped."""
    batch = _as_nchw(images)
    batch = _resize_shorter(batch, resize or size)
    top, left = (batch.shape[-2] - size) // 2, (batch.shape[-1] - size) // 2
    batch = batch[..., top : top + size, left : left + size]
    shift = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    scale = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((batch - shift) / scale, dtype=np.float32)


def _as_nchw(images: np.ndarray) -> np.ndarray:
    array = np.asarray(images)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255.0)
    else:
        array = array.astype(np.float32)
    if array.ndim == 2:  # one grey image
        array = array[None, :, :, None]
    elif array.ndim == 3:  # one colour image, or a batch of grey ones
        array = array[None] if array.shape[-1] in (3, 4) else array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"images must be [N,H,W] or [N,H,W,C] with C in 1,3,4; got {tuple(array.shape)}"
        )
    if not np.isfinite(array).all():
        raise DataError("images contain NaN or inf")
    array = array[..., :3] if array.shape[-1] == 4 else array  # drop alpha
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array.transpose(0, 3, 1, 2)


def _resize_shorter(batch: np.ndarray, target: int) -> np.ndarray:
    height, width = batch.shape[-2:]
    scale = target / min(height, width)
    new_h, new_w = max(target, round(height * scale)), max(target, round(width * scale))
    if (new_h, new_w) == (height, width):
        return batch
    rows, cols = _resize_weights(height, new_h), _resize_weights(width, new_w)
    return (rows @ batch.astype(np.float64) @ cols.T).astype(np.float32)  # separable filter


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear weights as torch computes them (align_corners=False).

    Shrinking (ratio > 1) widens the triangle filter by the ratio (antialiasing, as torch's
    ``_upsample_bilinear2d_aa`` and PIL do); growing uses the plain triangle, which equals
    torch's bilinear interpolation with the source index clamped at the edges.
    """
    f32 = np.float32  # torch computes centres and taps in float32: a tap more or less at the
    ratio = f32(n_in) / f32(n_out)  # edge of the filter moves a pixel by up to 1e-5 otherwise
    support = max(ratio, f32(1.0))  # filter half-width in input pixels
    inverse = f32(1.0) / support
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = ratio * f32(i + 0.5)
        lo = max(int(centre - support + f32(0.5)), 0)
        hi = min(int(centre + support + f32(0.5)), n_in)
        taps = np.arange(lo, hi, dtype=f32)
        w = np.maximum(f32(0.0), f32(1.0) - np.abs((taps - centre + f32(0.5)) * inverse))
        weights[i, lo:hi] = w / w.sum(dtype=f32)
    return weights
