"""What optimisation step s sees: its clips, noise, augmentation and learning rate.

Determinism is by construction: the clips and every random draw of step s (noise, noise levels, augmentation) are
functions of (seed, s) alone, drawn for the GLOBAL batch and sliced per rank. So `--resume` continues exactly, and a
2-process run sees the same data and noise as a 1-process run with the same global batch.
"""

from __future__ import annotations

import math

import torch

from fastwam.model.codecs import LatentCodec
from fastwam.model.text import TextEncoder


def lr_scale(step: int, cfg) -> float:
    """Linear warm-up for warmup_frac of the run, then cosine down to min_lr_frac."""
    warmup = max(1, int(round(cfg.warmup_frac * cfg.steps)))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))


def random_shift(video: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each clip (all its frames alike) by up to `pad` pixels, replicating the border (DrQ-style)."""
    if pad <= 0:
        return video
    b, c, t, h, w = video.shape
    padded = torch.nn.functional.pad(video.flatten(1, 2), (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    return out.unflatten(1, (c, t))


def prepare_batch(batch: dict, codec: LatentCodec, text_encoder: TextEncoder, device) -> dict:
    """A collated clip batch -> the tensors `FastWAM.loss` takes (a video-only batch: actions and state None)."""
    video = batch["video"].to(device)
    with torch.no_grad():
        latents = codec.encode(video)
        text = text_encoder(list(batch["task"])).to(device)
    get = lambda key: batch[key].to(device) if key in batch else None  # noqa: E731
    out = {
        "latents": latents,
        "latent_mask": codec.latent_frame_mask(batch["video_mask"].to(device)),
        "actions": get("actions"),
        "action_mask": get("action_mask"),
        "state": get("state"),
        "text": text,
    }
    if "labelled" in batch:
        out["labelled"] = batch["labelled"].to(device)
    return out


class MixedBatches:
    """The global batch of step s from an action-labelled and an action-free dataset, mixed at an exact count.

    Every batch holds exactly `video` action-free clips (round(ratio * batch)) and batch - video labelled ones, each
    drawn by its own `StepBatches` (a seeded permutation per epoch of its dataset) and shuffled together by a draw of
    (seed, step): the mix is the same in every batch, deterministic for a seed, and a resumed run continues it.
    `indices(step)` -> [(is_action_free, index in its dataset)].
    """

    def __init__(self, labelled_size: int, video_size: int, batch: int, ratio: float, seed: int):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"data.video_ratio must be in (0, 1), got {ratio}: a batch needs both kinds of clip")
        self.video = int(round(ratio * batch))
        self.labelled = batch - self.video
        if self.video < 1 or self.labelled < 1:
            raise ValueError(f"data.video_ratio {ratio} of a batch of {batch} leaves {self.video} action-free and "
                             f"{self.labelled} labelled clips: each kind needs at least one")
        self.batch, self.seed = batch, seed
        self._labelled = StepBatches(labelled_size, self.labelled, seed)
        self._video = StepBatches(video_size, self.video, seed + 7_777_777)

    def indices(self, step: int) -> list[tuple[bool, int]]:
        both = [(False, i) for i in self._labelled.indices(step)] + [(True, i) for i in self._video.indices(step)]
        order = torch.randperm(self.batch, generator=step_generator(self.seed, step, 31)).tolist()
        return [both[j] for j in order]


def with_placeholders(item: dict, horizon: int, action_dim: int, state_dim: int) -> dict:
    """An action-free clip in a labelled batch: zero actions and state that the loss never reads (`labelled` False,
    every action step masked), so it adds to the video loss only."""
    return {**item, "actions": torch.zeros(horizon, action_dim), "action_mask": torch.zeros(horizon, dtype=torch.bool),
            "state": torch.zeros(state_dim), "labelled": torch.tensor(False)}


class StepBatches:
    """Global batch indices of optimisation step s: consecutive slices of per-epoch seeded permutations."""

    def __init__(self, size: int, batch: int, seed: int):
        if size == 0:
            raise ValueError("the dataset has no clips")
        self.size, self.batch, self.seed = size, batch, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g).tolist()
        return self._perm

    def indices(self, step: int) -> list[int]:
        out = []
        for p in range(step * self.batch, (step + 1) * self.batch):
            out.append(self._permutation(p // self.size)[p % self.size])
        return out
