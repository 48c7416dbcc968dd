"""Shared by the training tests: the tiny preset with a short schedule, and synthetic clips for it."""

from __future__ import annotations

import dataclasses

from fastwam.config import Config, get_preset
from fastwam.data.synthetic import SyntheticClips


def tiny_train_config(steps: int = 8, **train_kw) -> Config:
    """The tiny preset: `steps` steps of batch 4, a checkpoint every 4 steps, every step logged."""
    cfg = get_preset("tiny")
    tc = dataclasses.replace(cfg.train, steps=steps, save_every=4, log_every=1, batch_size=4, **train_kw)
    return cfg.replace(train=tc)


def synthetic_clips(cfg: Config, n: int = 16) -> SyntheticClips:
    return SyntheticClips(cfg.data, num_clips=n)
