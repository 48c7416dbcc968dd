"""The frozen umT5 text encoder (transformers' `UMT5EncoderModel` + its tokenizer) from local directories.

Encoding follows Wan's prompt path (diffusers `WanPipeline._get_t5_prompt_embeds`): clean the text (HTML entities,
collapsed whitespace), tokenize to exactly `max_len` tokens (padding / truncation, with the closing `</s>`), run the
encoder with the attention mask, and zero every position past the real tokens. Fast-WAM first wraps the
instruction in its prompt template ("A video recorded from a robot's point of view executing the following
instruction: {task}") and uses max_len 128.

A dataset has a handful of instructions and umT5-XXL is a 5.7B model, so embeddings are cached: in memory by the base
class, and on disk (one safetensors file per prompt, `cache_dir`) keyed by a hash of the final prompt, `max_len`, the
dtype and a fingerprint of the model and tokenizer files (path, names, sizes, mtimes) — replacing the weights
invalidates the cache.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
from pathlib import Path

import torch

from fastwam.config import TextConfig
from fastwam.files import replacing
from fastwam.model.text import TextEncoder

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


DISK_CACHE_BYTES = 1 << 30  # the text-embedding disk cache's bound (~500 prompts of 128 x 4096 float32)


def default_cache_dir() -> Path | None:
    """$FASTWAM_TEXT_CACHE (empty disables), else $XDG_CACHE_HOME/fastwam/text_embeddings (~/.cache/...)."""
    env = os.environ.get("FASTWAM_TEXT_CACHE")
    if env is not None:
        return Path(env).expanduser() if env else None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastwam" / "text_embeddings"


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning without the optional ftfy step (so the result, and the cache key, do not depend on
    which packages happen to be installed): unescape HTML twice, collapse whitespace, strip."""
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def resolve_text_encoder_dirs(path: str | os.PathLike) -> tuple[Path, Path]:
    """(encoder dir, tokenizer dir) for a pipeline root (text_encoder/ + tokenizer/), an encoder directory with the
    tokenizer files beside it, or an encoder directory whose sibling is tokenizer/."""
    if not str(path):
        raise ValueError("no path given for the umT5 text encoder (set --config.text.path)")
    p = Path(path).expanduser()
    if (p / "text_encoder" / "config.json").exists():
        enc = p / "text_encoder"
    elif (p / "config.json").exists():
        enc = p
    else:
        raise FileNotFoundError(f"umT5: neither {p}/config.json nor {p}/text_encoder/config.json exists "
                                "(expected a local directory, e.g. Wan2.2-TI2V-5B-Diffusers or its text_encoder/)")
    for cand in (enc, p / "tokenizer", enc.parent / "tokenizer"):
        if any((cand / f).exists() for f in _TOKENIZER_FILES):
            return enc, cand
    raise FileNotFoundError(f"umT5: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {enc}, {p / 'tokenizer'} "
                            f"or {enc.parent / 'tokenizer'}")


def _fingerprint(*dirs: Path) -> list:
    out = []
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_file():
                st = f.stat()
                out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


class UMT5TextEncoder(TextEncoder):
    def __init__(
        self,
        tokenizer,
        model: torch.nn.Module,
        max_len: int,
        template: str = TextConfig.template,
        cache_dir: str | os.PathLike | None = None,
        fingerprint: object = None,
        max_cache_bytes: int = DISK_CACHE_BYTES,
    ):
        super().__init__()
        if "{task}" not in template:
            raise ValueError(f"prompt template must contain '{{task}}': {template!r}")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_len = int(max_len)
        self.dim = int(model.config.d_model)
        self.template = template
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._fingerprint = fingerprint
        self.max_cache_bytes = int(max_cache_bytes)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        max_len: int = 128,
        template: str = TextConfig.template,
        cache_dir: str | os.PathLike | None | bool = True,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> UMT5TextEncoder:
        """Local files only. cache_dir: True = `default_cache_dir()`, False / None = no disk cache, or a path.
        dtype: default bfloat16 on CUDA, float32 elsewhere (bf16 is emulated, ~20x slower, on CPU)."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        enc_dir, tok_dir = resolve_text_encoder_dirs(path)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(enc_dir, dtype=dtype, local_files_only=True).to(device)
        if cache_dir is True:
            cache_dir = default_cache_dir()
        fingerprint = {"files": _fingerprint(enc_dir, tok_dir), "dtype": str(dtype)}
        return cls(tokenizer, model, max_len, template, cache_dir or None, fingerprint)

    def prompt(self, instruction: str) -> str:
        return clean_prompt(self.template.replace("{task}", instruction))

    def cache_path(self, prompt: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps({"prompt": prompt, "max_len": self.max_len, "model": self._fingerprint}, sort_keys=True)
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def encode_one(self, instruction: str) -> torch.Tensor:
        """One instruction -> [max_len, dim] float32 on CPU, zero past the prompt's tokens."""
        prompt = self.prompt(instruction)
        path = self.cache_path(prompt)
        if path is not None and path.exists():
            cached = self._read_cache(path, prompt)
            if cached is not None:
                path.touch()  # recently used: the last to be evicted
                return cached
        out = self._encode(prompt)
        if path is not None:
            self._write_cache(path, prompt, out)
        return out

    @torch.no_grad()
    def _encode(self, prompt: str) -> torch.Tensor:
        tok = self.tokenizer(
            [prompt], padding="max_length", max_length=self.max_len, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state[0].float()
        n = int(mask[0].sum())
        hidden[n:] = 0.0  # as Wan: padding positions carry no signal (cross-attention still sees them, as zeros)
        return hidden.cpu()

    def _read_cache(self, path: Path, prompt: str) -> torch.Tensor | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("prompt") != prompt:
                    return None  # a hash collision (or a foreign file): recompute
                t = f.get_tensor("embedding").clone()
        except Exception:  # noqa: BLE001 - a corrupt cache file is recomputed, never fatal
            return None
        return t if t.shape == (self.max_len, self.dim) else None

    def _write_cache(self, path: Path, prompt: str, emb: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:  # concurrent ranks never read a half-written file
            save_file({"embedding": emb.contiguous()}, str(tmp), metadata={"prompt": prompt})
        self._evict(keep=path)

    def _evict(self, keep: Path) -> None:
        """Keep the disk cache under `max_cache_bytes` by removing the least recently used files (one file is
        ~2 MB at full scale: a server that meets many distinct prompts must not fill the disk with them)."""
        files = []
        for f in self.cache_dir.glob("*.safetensors"):
            try:
                st = f.stat()
            except FileNotFoundError:  # removed by a concurrent process
                continue
            files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_cache_bytes:
                break
            if f != keep:
                f.unlink(missing_ok=True)
                total -= size
