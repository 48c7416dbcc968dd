"""Instruction encoders (frozen) and the per-instruction embedding cache.

`HashTextEncoder` (CPU presets) needs no weights: each word is hashed (crc32, stable across processes and
machines) into a fixed random table generated from the config's seed, plus a sinusoidal position signal, so the
embedding of an instruction is reproducible from `config.json` alone. `UMT5TextEncoder` (`umt5.py`) wraps the
umT5-XXL encoder from transformers. Both return [B, max_len, text_dim] with zero padding (as Wan does) and cache
per unique instruction, since a dataset has only a handful.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from torch import nn


class TextEncoder(nn.Module):
    max_len: int
    dim: int

    def __init__(self):
        super().__init__()
        self._cache: dict[str, torch.Tensor] = {}

    def encode_one(self, instruction: str) -> torch.Tensor:
        """One instruction -> [max_len, dim] (float32, CPU)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, instructions: list[str]) -> torch.Tensor:
        out = []
        for text in instructions:
            if not isinstance(text, str):
                raise TypeError(f"instruction must be a string, got {type(text).__name__}")
            if text not in self._cache:
                self._cache[text] = self.encode_one(text)
            out.append(self._cache[text])
        return torch.stack(out)


class HashTextEncoder(TextEncoder):
    def __init__(self, dim: int, max_len: int, vocab_size: int, seed: int):
        super().__init__()
        self.dim, self.max_len, self.vocab_size = dim, max_len, vocab_size
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(vocab_size, dim, generator=g), persistent=False)
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(100.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        pe = torch.zeros(max_len, dim)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
        self.register_buffer("positions", 0.5 * pe, persistent=False)

    @staticmethod
    def words(instruction: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", instruction.lower())

    def encode_one(self, instruction: str) -> torch.Tensor:
        ids = [zlib.crc32(w.encode()) % self.vocab_size for w in self.words(instruction)][: self.max_len]
        out = torch.zeros(self.max_len, self.dim)
        if ids:
            out[: len(ids)] = self.table[torch.tensor(ids)] + self.positions[: len(ids)]
        return out
