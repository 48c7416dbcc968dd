"""Normalisation statistics for actions and proprioceptive state, and the normaliser that uses them.

Stats are computed once over a dataset (all episodes, so the train and val splits share them), saved as JSON next to
each checkpoint, and loaded by the policy, so inference un-normalises exactly as training normalised.
Keys are the roles "action" and "state" (not the dataset's column names) so a checkpoint does not depend on them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

NormMode = Literal["min_max", "q01_q99", "z_score"]
NORM_MODES: tuple[str, ...] = ("min_max", "q01_q99", "z_score")
STAT_KEYS = ("min", "max", "mean", "std", "q01", "q99")
# The official Fast-WAM normaliser's constants (its LinearNormalizer; docs/reference.md, "Normalisation"):
RANGE_EPS = 1e-4  # min/max, q01/q99: a dimension whose range is below this is only shifted (y = x - lo), not scaled
STD_EPS = 1e-8  # z-score: y = (x - mean) / (std + STD_EPS)
CLAMP = 5.0  # normalised values are clamped to [-CLAMP, CLAMP]; un-normalising does not clamp


@dataclass
class NormStats:
    """{key: {stat: float64 [D]}} for keys such as "action" and "state"; stats are STAT_KEYS."""

    stats: dict[str, dict[str, np.ndarray]]

    def __post_init__(self) -> None:
        for key, st in self.stats.items():
            missing = [s for s in STAT_KEYS if s not in st]
            if missing:
                raise ValueError(f"norm stats for {key!r} lack {missing}")
            self.stats[key] = {s: np.asarray(st[s], dtype=np.float64).reshape(-1) for s in STAT_KEYS}
            dims = {len(v) for v in self.stats[key].values()}
            if len(dims) != 1:
                raise ValueError(f"norm stats for {key!r} have inconsistent dimensions {dims}")

    @classmethod
    def compute(cls, arrays: dict[str, np.ndarray]) -> NormStats:
        """From full data: {key: [N, D]}."""
        stats = {}
        for key, x in arrays.items():
            x = np.asarray(x, dtype=np.float64)
            if x.ndim != 2 or len(x) == 0:
                raise ValueError(f"norm stats for {key!r} need a non-empty [N, D] array, got {x.shape}")
            q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
            stats[key] = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "q01": q01, "q99": q99}
        return cls(stats)

    def keys(self) -> list[str]:
        return list(self.stats)

    def dim(self, key: str) -> int:
        return len(self.stats[key]["min"])

    def __getitem__(self, key: str) -> dict[str, np.ndarray]:
        return self.stats[key]

    def to_dict(self) -> dict[str, dict[str, list[float]]]:
        return {k: {s: v.tolist() for s, v in st.items()} for k, st in self.stats.items()}

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, list[float]]]) -> NormStats:
        return cls({k: {s: np.asarray(v, dtype=np.float64) for s, v in st.items()} for k, st in d.items()})

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> NormStats:
        with open(path) as f:
            return cls.from_dict(json.load(f))


class Normalizer:
    """Maps raw values to the model's range and back, per key, for numpy arrays or torch tensors ([..., D]).

    The official Fast-WAM rules, exactly: min_max / q01_q99 map [lo, hi] affinely to [-1, 1]
    (y = 2 (x - lo) / (hi - lo) - 1), except that a dimension with hi - lo < 1e-4 is only shifted (y = x - lo);
    z_score is y = (x - mean) / (std + 1e-8). Normalising clamps y to [-5, 5] (so outliers stay bounded but are not
    flattened onto the range's edge); un-normalising is the exact affine inverse, without a clamp. Every rule is one
    affine map y = (x - offset) / scale per dimension, computed in float64 and returned in the input's dtype.
    """

    def __init__(self, stats: NormStats, mode: NormMode = "min_max"):
        if mode not in NORM_MODES:
            raise ValueError(f"unknown normalizer {mode!r}; choose one of {NORM_MODES}")
        self.stats, self.mode = stats, mode
        self._params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key, st in stats.stats.items():
            if mode == "z_score":
                offset, scale = st["mean"], st["std"] + STD_EPS
            else:
                lo, hi = (st["min"], st["max"]) if mode == "min_max" else (st["q01"], st["q99"])
                live = (hi - lo) >= RANGE_EPS
                # y = 2 (x - lo) / (hi - lo) - 1 = (x - (hi + lo) / 2) / ((hi - lo) / 2); near-constant: y = x - lo.
                offset = np.where(live, (hi + lo) / 2, lo)
                scale = np.where(live, (hi - lo) / 2, 1.0)
            self._params[key] = (offset, scale)

    def _get(self, key: str, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._params:
            raise KeyError(f"no normalisation stats for {key!r} (have {list(self._params)})")
        offset, scale = self._params[key]
        if x.shape[-1] != len(offset):
            raise ValueError(f"{key}: last dimension {x.shape[-1]} != stats dimension {len(offset)}")
        return offset, scale

    @staticmethod
    def _apply(x: np.ndarray | torch.Tensor, fn) -> np.ndarray | torch.Tensor:
        """fn on float64 values (a near-constant z-score dimension divides by ~1e-8: float32 would lose it), returned
        in the input's floating dtype (float32 for integer input) and, for tensors, on its device."""
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            y = fn(x.detach().to("cpu", torch.float64).numpy())
            return torch.from_numpy(np.ascontiguousarray(y)).to(x.device, dtype)
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
        return fn(np.asarray(x, dtype=np.float64)).astype(dtype, copy=False)

    def normalize(self, key: str, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        offset, scale = self._get(key, x)
        return self._apply(x, lambda v: np.clip((v - offset) / scale, -CLAMP, CLAMP))

    def unnormalize(self, key: str, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        offset, scale = self._get(key, y)
        return self._apply(y, lambda v: v * scale + offset)
