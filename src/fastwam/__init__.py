"""fastwam: Fast-WAM world action models (masked mixture-of-transformers video + action experts)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The public API, resolved on first use so `import fastwam` stays light (no torch import until needed): loading a
# checkpoint as a policy or a bare model, a client of `fastwam serve` and the robot-side asynchronous loop, the
# configuration system, and Wan weights for the video expert.
_LAZY = {
    "FastWAMPolicy": "fastwam.policy",
    "WebsocketClient": "fastwam.serving.client",
    "AsyncChunkRunner": "fastwam.serving.realtime",
    "load_model": "fastwam.loading",
    "Config": "fastwam.config",
    "ModelConfig": "fastwam.config",
    "CodecConfig": "fastwam.config",
    "TextConfig": "fastwam.config",
    "DataConfig": "fastwam.config",
    "TrainConfig": "fastwam.config",
    "InferenceConfig": "fastwam.config",
    "get_preset": "fastwam.config",
    "PRESETS": "fastwam.config",
    "load_video_expert": "fastwam.model.weights",
    "build_fastwam_from_wan": "fastwam.model.weights",
    "init_action_expert_from_video": "fastwam.model.weights",
}

__all__ = ["__version__", *_LAZY]


def __dir__() -> list[str]:
    return sorted(__all__)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastwam' has no attribute {name!r}")
