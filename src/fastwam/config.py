"""One configuration system: frozen dataclasses and named presets.

Every default lives here. A run's full resolved `Config` is written to `config.json` in each checkpoint, and
`Config.from_dict(json.load(...))` rebuilds it exactly, so a checkpoint is self-describing. The CLI (tyro) exposes
every field as a typed `--section.field` override on top of a preset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

# ---------------------------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of the two experts. Video expert names and defaults follow Wan2.2-TI2V-5B / diffusers."""

    # Video expert (a Wan DiT). Its attention width is num_heads * head_dim (= its hidden size, as in Wan).
    latent_channels: int = 48  # channels of a latent frame (training sets it from the codec)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # latent (frames, height, width) per video token
    video_ffn_dim: int = 14336  # feed-forward width of the video expert
    # Hidden size of the video expert; 0 = its attention width num_heads * head_dim, as in Wan. Another value grows
    # or shrinks the video expert while the shared attention width, and with it the action expert, stays as it is
    # (the capacity study's knob; Wan checkpoints need 0).
    video_hidden_dim: int = 0
    # Shared by both experts: mixture-of-transformers needs equal heads, head dim and layer count.
    num_heads: int = 24  # attention heads (both experts)
    head_dim: int = 128  # width of one attention head (both experts)
    num_layers: int = 30  # transformer blocks (both experts)
    # Action expert: own hidden size; its attention width is still num_heads * head_dim.
    action_hidden_dim: int = 1024  # hidden size of the action expert
    action_ffn_dim: int = 4096  # feed-forward width of the action expert
    # Conditioning.
    freq_dim: int = 256  # sinusoidal embedding size of the noise level
    text_dim: int = 4096  # width of the text encoder's output
    cross_attn_norm: bool = True  # LayerNorm before the cross-attention to the text (as in Wan)
    eps: float = 1e-6  # epsilon of the normalisation layers
    rope_theta: float = 10000.0  # base of the rotary position embedding
    rope_max_seq_len: int = 1024  # Wan config field, kept for its checkpoints (RoPE is built per shape)
    # Robot interface (filled from the dataset's metadata at training time).
    action_dim: int = 7  # size of one action vector
    state_dim: int = 8  # size of the proprioceptive state vector
    action_horizon: int = 32  # actions per predicted chunk
    # Latent frames per clip, the first being the clean observation (9 video frames / 4x VAE -> 3).
    latent_frames: int = 3
    # False: the video expert alone, a video prior (`fastwam pretrain`): no action expert, no state projection.
    action_expert: bool = True

    @property
    def video_dim(self) -> int:
        """The video expert's hidden size (resolved `video_hidden_dim`)."""
        return self.video_hidden_dim or self.num_heads * self.head_dim

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class CodecConfig:
    """Maps frames in [-1, 1] to latents and back.

    `pixel`: space-to-depth by `space_factor` (exact, parameter-free; 3 * space_factor**2 channels).
    `dct`: the low-frequency 2-D DCT coefficients of each space_factor x space_factor block (JPEG's transform, fixed),
      normalised per channel like the Wan VAE's latents: a compact latent for CPU presets (see `model/codecs.py`).
    `wan_vae`: the frozen Wan2.2 VAE (diffusers AutoencoderKLWan) loaded from `path` (a local directory).
    """

    kind: Literal["pixel", "dct", "wan_vae"] = "pixel"
    space_factor: int = 8  # pixel / dct: block size in pixels (a latent pixel per block)
    path: str = ""  # wan_vae: local directory of the VAE weights
    # dct: keep the frequencies (u, v) with u + v < dct_diagonals in every colour channel (4 -> 10 per channel).
    dct_diagonals: int = 4
    # dct: per-channel latent statistics; empty = fitted on the training data when training starts (then stored here).
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    def latent_channels(self) -> int:
        if self.kind == "pixel":
            return 3 * self.space_factor**2
        if self.kind == "dct":
            d = min(self.dct_diagonals, 2 * self.space_factor - 1)
            return 3 * sum(1 for u in range(self.space_factor) for v in range(self.space_factor) if u + v < d)
        return 48

    def spatial_factor(self) -> int:
        return self.space_factor if self.kind in ("pixel", "dct") else 16

    def temporal_factor(self) -> int:
        return 1 if self.kind in ("pixel", "dct") else 4


@dataclass(frozen=True)
class TextConfig:
    """Instruction encoder (frozen).

    `hash`: words hashed into a fixed random embedding table generated from `seed` (no weights to ship; the output
    is reproducible from the config alone). `umt5`: the umT5-XXL encoder + tokenizer from a local `path`.
    """

    kind: Literal["hash", "umt5"] = "hash"
    max_len: int = 16  # tokens per instruction (padded with zeros or cut)
    vocab_size: int = 4096  # hash: rows of the embedding table
    seed: int = 0  # hash: seed that generates the embedding table
    path: str = ""  # umt5: local directory of the encoder and its tokenizer
    # umt5: the prompt around each instruction ({task} is replaced by it), as Wan was trained.
    template: str = "A video recorded from a robot's point of view executing the following instruction: {task}"


# ---------------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class DataConfig:
    """How clips are cut from a LeRobot dataset. Action/state dims, fps and camera sizes come from the dataset."""

    dataset: str = ""  # LeRobot dataset directory (v3.0, or v2.1)
    # Cameras to use, in layout order; empty = every `observation.images.*` feature of the dataset, sorted.
    cameras: tuple[str, ...] = ()
    state_key: str = "observation.state"  # the dataset feature holding the robot state
    action_key: str = "action"  # the dataset feature holding the actions
    # Per-camera output size (H, W) after resize-shortest-side + centre-crop.
    image_size: tuple[int, int] = (64, 64)
    # `side_by_side` for 1-2 cameras; `robotwin`: first camera on top, the other two side by side below it at half size.
    layout: Literal["side_by_side", "robotwin"] = "side_by_side"
    num_frames: int = 3  # video frames per clip, frame 0 = the observation
    frame_stride: int = 8  # env steps between video frames
    action_horizon: int = 16  # actions per clip: the chunk the model predicts
    normalizer: Literal["min_max", "q01_q99", "z_score"] = "min_max"  # how actions and state are scaled
    cache_in_memory: bool = True  # decode every frame once up front (if under half the free memory)
    num_workers: int = 0  # DataLoader worker processes
    val_episodes: int = 0  # episodes held out (the last ones) for validation loss
    # Co-training with action-free video: a LeRobot dataset without actions (same cameras) whose clips add to the
    # video loss only (their action loss is masked out). Each batch holds exactly round(video_ratio * batch) of them.
    video_dataset: str = ""
    video_ratio: float = 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainConfig:
    # The attention variant to train; "video" is `fastwam pretrain`'s objective (the video expert alone).
    variant: Literal["fast", "joint", "idm", "no_cotrain", "video"] = "fast"
    steps: int = 2000  # total optimisation steps (> 0)
    batch_size: int = 16  # global batch: all ranks and grad_accum micro-batches together
    grad_accum: int = 1  # micro-batches per optimisation step
    lr: float = 1e-4  # peak learning rate (AdamW)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_frac: float = 0.05  # share of the steps with a linear warm-up
    min_lr_frac: float = 0.01  # the cosine decay ends at lr * min_lr_frac
    grad_clip: float = 1.0  # clip the gradient norm to this
    seed: int = 0  # seed of the initialisation, data order, noise and augmentation
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    grad_checkpointing: bool = False  # recompute activations in the backward pass (less memory)
    # Initialise from Wan2.2 weights (a local diffusers or original-layout directory): the video expert loads them,
    # the action expert is interpolated from them (docs/reference.md, "Action-expert initialisation"). Empty = random.
    init_from_wan: str = ""
    # Initialise from a fastwam run (a `fastwam pretrain` video prior, or any policy run): its video expert (and state
    # projection, where both have one) is copied; the action expert is interpolated from the video expert as from Wan
    # weights (init_action "interpolate"), left random ("random"), or copied from a policy source of the same shapes
    # ("copy": fine-tuning a trained policy, e.g. for action_prefix_max). The codec and text encoder come from that run.
    init_from: str = ""
    init_action: Literal["interpolate", "random", "copy"] = "interpolate"
    # Recorded when the run starts (not options): the source checkpoint's step and the sha256 of its weights file.
    init_from_step: int = 0
    init_from_sha256: str = ""
    # Few-step distillation (`fastwam distill`, `training/distill.py`): the run is a student of the teacher run
    # `distill_from` (a checkpoint directory), trained to sample in `distill_steps` Euler steps (its inference.steps)
    # what the teacher samples in `distill_teacher_steps`; only the action expert trains. 0 = not distilling.
    distill_from: str = ""
    distill_steps: int = 0
    distill_teacher_steps: int = 10
    # Recorded when the run starts (not options): the teacher checkpoint's step and the sha256 of its weights file.
    distill_teacher_step: int = 0
    distill_teacher_sha256: str = ""
    # Training-time action conditioning (real-time chunking without guidance; `model/rtc.py`): each labelled clip's
    # first d ~ U{0..N} actions are given clean (timestep 0) and left out of the loss, so that at inference a chunk
    # can be conditioned on the actions that run while it is computed. 0 = off (the official objective, exactly).
    action_prefix_max: int = 0
    fsdp: bool = False  # multi-GPU: shard with FSDP2 (fully_shard) instead of DDP (the 5B preset)
    random_shift: int = 0  # augmentation: random translation of the clip's frames by up to N pixels
    ema_decay: float = 0.0  # 0 = no EMA (the official code has none)
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard entries
    save_every: int = 500  # steps between checkpoints (one is also saved at the end)
    keep_last: int = 2  # checkpoints kept, the one just written included (0 = all)
    val_every: int = 0  # steps between validation losses (needs data.val_episodes > 0; 0 = never)
    sample_every: int = 0  # write a PNG of the imagined vs the real future every K steps (0 = never)
    threads: int = 0  # torch CPU threads (0 = torch default)
    wandb: bool = False  # also sync TensorBoard to Weights & Biases (wandb not included)


@dataclass(frozen=True)
class InferenceConfig:
    mode: Literal["fast", "joint", "idm"] = "fast"  # how a policy samples actions (see model/fastwam.py)
    steps: int = 10  # Euler denoising steps
    shift: float = 5.0  # shift of the flow-matching noise schedule


@dataclass(frozen=True)
class Config:
    name: str = "custom"  # the preset this config started from (choose with --preset; a label, not a switch)
    model: ModelConfig = field(default_factory=ModelConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return _from_dict(cls, d)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


def _from_dict(cls: type, d: Any, where: str = "") -> Any:
    """Rebuild a (nested) frozen dataclass from `asdict` output; unknown keys are an error, missing keys default.

    Every value is checked against its field's annotation (`int`, `float` (ints accepted), `bool`, `str`, `Literal`
    choices, `tuple[...]` element types), because a config.json is edited by hand and a wrong type (`"3"` for 3)
    would otherwise be accepted here and fail much later, far from its cause. Errors are `ConfigError`s naming the
    dotted field path (`model.num_layers must be an int, got "2"`).
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping (a JSON object), got {_shown(d)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ConfigError(f"{where + ': ' if where else ''}unknown {cls.__name__} field(s): {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        path = f"{where}.{name}" if where else name
        default = getattr(cls(), name) if _has_default(known[name]) else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_dict(type(default), value, path)
        else:
            kwargs[name] = _checked(hints[name], value, path)
    return cls(**kwargs)


class ConfigError(ValueError):
    """A config value that does not fit its field; the message names the dotted field path."""


def _shown(value: Any) -> str:
    """A value as it reads in JSON (`"2"`, `4.5`, `true`), cut short: what the user typed, not Python's repr."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _checked(annotation: Any, value: Any, path: str) -> Any:
    """`value` converted to what `annotation` declares (JSON lists -> tuples, ints -> floats), or a ConfigError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        if type(value) is not bool:
            raise ConfigError(f"{path} must be true or false, got {_shown(value)}")
        return value
    if annotation is int:
        if type(value) is not int:  # bool is an int subclass, and 4.5 / "3" are not ints
            raise ConfigError(f"{path} must be an int, got {_shown(value)}")
        return value
    if annotation is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite number, got {_shown(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {_shown(value)}")
        return value
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            choices = ", ".join(json.dumps(a) for a in args)
            raise ConfigError(f"{path} must be one of {choices}, got {_shown(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {_shown(value)}")
        variadic = len(args) == 2 and args[1] is Ellipsis
        if not variadic and len(value) != len(args):
            raise ConfigError(f"{path} must be a list of {len(args)} values, got {_shown(value)}")
        types = [args[0]] * len(value) if variadic else list(args)
        return tuple(_checked(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(types, value, strict=True)))
    return tuple(value) if isinstance(value, list) else value  # an annotation this checker does not know: as given


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


# ---------------------------------------------------------------------------------------------------------------------
# Presets


def _tiny() -> Config:
    """Unit tests: a few thousand parameters, milliseconds per step."""
    return Config(
        name="tiny",
        model=ModelConfig(
            latent_channels=12, patch_size=(1, 2, 2), video_ffn_dim=32, num_heads=2, head_dim=8, num_layers=2,
            action_hidden_dim=8, action_ffn_dim=16, freq_dim=16, text_dim=8, rope_max_seq_len=64,
            action_dim=4, state_dim=4, action_horizon=4,
        ),
        codec=CodecConfig(kind="pixel", space_factor=2),
        text=TextConfig(kind="hash", max_len=4, vocab_size=64),
        data=DataConfig(image_size=(8, 8), num_frames=3, frame_stride=2, action_horizon=4),
        train=TrainConfig(steps=20, batch_size=2, lr=1e-3, log_every=5, save_every=10),
        inference=InferenceConfig(steps=3),
    )


def _small_cpu() -> Config:
    """Meta-World on 2 CPU cores: a 3.8M video expert and a 0.79M action expert, two 64x64 cameras, 3 latent frames x
    32 tokens + 16 actions. A token is a 16x16 pixel patch (space-to-depth 8, then the (1,2,2) patch embedding).

    The video expert is 256 wide at a shared attention width of 4 x 32 (`video_hidden_dim`), chosen by measurement
    (docs/results/, the capacity study on MT10): at the attention width (128, 1.24M parameters) its video flow loss
    stalled at ~0.76 and its imagined frames stayed covered in noise; at 256 the loss reaches ~0.53 and imagined frames
    show the scene, for the same action expert, at 37 % of the training speed (1.40 vs 3.77 it/s at batch 16, one
    thread). Success is in the README's results section.
    """
    return Config(
        name="small_cpu",
        model=ModelConfig(
            latent_channels=30, patch_size=(1, 2, 2), video_ffn_dim=1024, video_hidden_dim=256, num_heads=4,
            head_dim=32, num_layers=4, action_hidden_dim=96, action_ffn_dim=384, freq_dim=64, text_dim=64,
            rope_max_seq_len=256, action_dim=4, state_dim=4, action_horizon=16,
        ),
        # DCT latents: 30 channels -> 120-value tokens, within the video expert's width (see model/codecs.py).
        codec=CodecConfig(kind="dct", space_factor=8, dct_diagonals=4),
        text=TextConfig(kind="hash", max_len=16, vocab_size=4096),
        data=DataConfig(image_size=(64, 64), num_frames=3, frame_stride=8, action_horizon=16),
        train=TrainConfig(steps=4000, batch_size=32, lr=5e-4, warmup_frac=0.05, log_every=20, save_every=1000,
                          random_shift=4),
        inference=InferenceConfig(steps=10),
    )


def _libero_2cam224() -> Config:
    """The paper's exact shapes: Wan2.2-TI2V-5B video expert + ~1B action expert, LIBERO two-camera 224x448 input."""
    return Config(
        name="libero_2cam224",
        model=ModelConfig(action_dim=7, state_dim=8, action_horizon=32),
        codec=CodecConfig(kind="wan_vae"),
        text=TextConfig(kind="umt5", max_len=128),
        data=DataConfig(
            # The public LeRobot LIBERO conversions name their features image / wrist_image / state / actions.
            cameras=("image", "wrist_image"), state_key="state", action_key="actions", image_size=(224, 224),
            num_frames=9, frame_stride=4, action_horizon=32, normalizer="min_max",
        ),
        train=TrainConfig(steps=20000, batch_size=16, lr=1e-4, precision="auto", grad_checkpointing=True),
        inference=InferenceConfig(steps=10),
    )


PRESETS = {"tiny": _tiny, "small_cpu": _small_cpu, "libero_2cam224": _libero_2cam224}


def get_preset(name: str) -> Config:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}") from None
