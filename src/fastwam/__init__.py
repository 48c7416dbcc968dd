"""fastwam: Fast-WAM world action models (masked mixture-of-transformers video + action experts)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Public helpers resolved on first use, so `import fastwam` stays light (no torch import until needed).
_LAZY = {
    "load_video_expert": "fastwam.model.weights",
    "build_fastwam_from_wan": "fastwam.model.weights",
    "init_action_expert_from_video": "fastwam.model.weights",
    "load_model": "fastwam.loading",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastwam' has no attribute {name!r}")
