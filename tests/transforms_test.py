"""Camera composition shared by training and inference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fastwam.config import DataConfig
from fastwam.data.transforms import (
    canvas_size,
    compose_cameras,
    compose_cameras_batch,
    compose_cameras_uint8,
    resize_crop,
)


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_identity_size_is_exact_and_range():
    cfg = DataConfig(image_size=(16, 16))
    a, b = _img(16, 16, 0), _img(16, 16, 1)
    out = compose_cameras([a, b], cfg)
    assert out.shape == (3, 16, 32) and out.dtype == torch.float32
    expect = np.concatenate([a, b], axis=1).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(out.numpy(), expect, atol=1e-6)
    black_white = compose_cameras([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)],
                                  DataConfig(image_size=(4, 4)))
    assert black_white[:, :, :4].eq(-1).all() and black_white[:, :, 4:].eq(1).all()


def test_resize_shortest_side_then_centre_crop():
    # 20x40 image: left quarter red, middle half green, right quarter blue -> 10x10 keeps only the green middle
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10, 0] = 255
    img[:, 10:30, 1] = 255
    img[:, 30:, 2] = 255
    out = resize_crop(img, (10, 10))[0].numpy()
    assert out.shape == (10, 10, 3)
    assert out[:, 1:-1, 1].min() == 255 and out[:, 1:-1, 0].max() == 0 and out[:, 1:-1, 2].max() == 0
    tall = resize_crop(_img(64, 32), (16, 16))
    assert tall.shape == (1, 16, 16, 3) and tall.dtype == torch.uint8


def test_layouts_and_batch():
    cfg = DataConfig(image_size=(8, 12))
    assert compose_cameras([_img(30, 40)], cfg).shape == (3, 8, 12)
    assert compose_cameras([_img(30, 40), _img(24, 24)], cfg).shape == (3, 8, 24)
    rt = dataclasses.replace(cfg, layout="robotwin")
    cams = [_img(32, 48, 0), _img(20, 30, 1), _img(20, 30, 2)]
    out = compose_cameras(cams, rt)
    assert out.shape == (3, 12, 12) and canvas_size(rt, 3) == (12, 12)
    canvas = compose_cameras_uint8(cams, rt)[0].numpy()
    np.testing.assert_array_equal(canvas[:8], resize_crop(cams[0], (8, 12))[0].numpy())  # top camera, full size
    np.testing.assert_array_equal(canvas[8:, :6], resize_crop(cams[1], (4, 6))[0].numpy())  # wrists, half size
    np.testing.assert_array_equal(canvas[8:, 6:], resize_crop(cams[2], (4, 6))[0].numpy())
    batch = compose_cameras_batch([np.stack([_img(30, 40, i) for i in range(3)]),
                                   np.stack([_img(30, 40, 10 + i) for i in range(3)])], cfg)
    assert batch.shape == (3, 3, 8, 24)
    torch.testing.assert_close(batch[1], compose_cameras([_img(30, 40, 1), _img(30, 40, 11)], cfg))


def test_errors():
    cfg = DataConfig(image_size=(8, 8))
    with pytest.raises(ValueError, match="1 or 2 cameras"):
        compose_cameras([_img(8, 8)] * 3, cfg)
    with pytest.raises(ValueError, match="3 cameras"):
        compose_cameras([_img(8, 8)] * 2, dataclasses.replace(cfg, layout="robotwin"))
    with pytest.raises(TypeError, match="uint8"):
        compose_cameras([np.zeros((8, 8, 3), np.float32)], cfg)
    with pytest.raises(ValueError, match="H, W, 3"):
        compose_cameras([np.zeros((8, 8), np.uint8)], cfg)
