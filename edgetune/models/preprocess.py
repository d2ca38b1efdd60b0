"""Image preprocessing without torchvision: resize shorter side, centre crop, normalise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgetune.errors import DataError


@dataclass(frozen=True)
class ImagePreprocess:
    """Turn images into a float batch [N, 3, size, size].

    Accepts uint8 (0..255) or float (0..1) arrays shaped [H, W], [H, W, C], [N, H, W] or
    [N, H, W, C]; grey images are repeated to three channels. `resize` (default `size`) is the
    length the shorter side is scaled to before the centre crop, as in ImageNet evaluation.
    """

    size: int
    resize: int | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        batch = self._as_nchw(images)
        batch = self._resize_shorter(batch, self.resize or self.size)
        batch = self._centre_crop(batch, self.size)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (batch - mean) / std

    @staticmethod
    def _as_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        array = torch.as_tensor(np.asarray(images))
        is_uint8 = array.dtype == torch.uint8
        array = array.float() / 255.0 if is_uint8 else array.float()
        if array.ndim == 2:  # one grey image
            array = array[None, :, :, None]
        elif array.ndim == 3:  # one colour image, or a batch of grey ones
            array = array[None] if array.shape[-1] in (3, 4) else array[..., None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
            raise DataError(
                f"images must be [N,H,W] or [N,H,W,C] with C in 1,3,4; got {tuple(array.shape)}"
            )
        if not torch.isfinite(array).all():
            raise DataError("images contain NaN or inf")
        array = array[..., :3] if array.shape[-1] == 4 else array  # drop alpha
        if array.shape[-1] == 1:
            array = array.expand(-1, -1, -1, 3)
        return array.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def _resize_shorter(batch: torch.Tensor, target: int) -> torch.Tensor:
        height, width = batch.shape[-2:]
        scale = target / min(height, width)
        new_size = (max(target, round(height * scale)), max(target, round(width * scale)))
        if new_size == (height, width):
            return batch
        return F.interpolate(
            batch, size=new_size, mode="bilinear", align_corners=False, antialias=scale < 1
        )

    @staticmethod
    def _centre_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
        height, width = batch.shape[-2:]
        top, left = (height - size) // 2, (width - size) // 2
        return batch[..., top : top + size, left : left + size]
