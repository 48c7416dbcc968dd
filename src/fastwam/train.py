"""`fastwam train`: the training loop (single process, or `torchrun` DDP / FSDP2).

`train()` runs four stages: set-up (data, codec statistics, the robot interface, the run directory), resume (the
checkpoint's weights, optimizer and step, under the run's own settings), the loop (one optimisation step, its logs,
validation and samples), and saves (every `save_every` steps, at the end, and when Ctrl-C asks to stop). Each step
draws its clips, noise and augmentation from (seed, step) alone (`training/steps.py`), so a resumed run continues
bit-exactly. Run-directory rules (no shadowed runs, settings checked on resume, metrics logged once) are in
`training/runs.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro
from tqdm.auto import tqdm

from fastwam import checkpoint as ckpt_io
from fastwam.config import Config
from fastwam.errors import UserError
from fastwam.files import write_text_atomic
from fastwam.model.codecs import LatentCodec
from fastwam.model.encoders import build_codec, build_text_encoder
from fastwam.model.fastwam import FastWAM, TrainingNoise
from fastwam.model.visibility import get_variant
from fastwam.presets import PresetArgs, parse_with_preset
from fastwam.training import distill, monitor, runs
from fastwam.training.distributed import (
    Dist,
    any_rank,
    barrier,
    init_distributed,
    mean_across_ranks,
    shutdown_distributed,
    wrap_model,
)
from fastwam.training.steps import (
    MixedBatches,
    StepBatches,
    lr_scale,
    prepare_batch,
    random_shift,
    step_generator,
    with_placeholders,
)

__all__ = ["train", "TrainResult", "TrainArgs", "cli", "parse_with_preset", "resolve_config", "fit_codec",
           "StepBatches", "lr_scale"]

# ---------------------------------------------------------------------------------------------------------------------
# Set-up: the config that data and codec imply


def resolve_config(cfg: Config, dataset, codec: LatentCodec) -> Config:
    """Fill the model's robot interface and latent geometry from the dataset and codec (not from the preset).
    A video prior (`fastwam pretrain`) has no robot interface: its action / state sizes stay as configured."""
    robot = {}
    if cfg.model.action_expert:
        robot = {"action_dim": int(dataset.action_dim), "state_dim": int(dataset.state_dim)}
    model = dataclasses.replace(
        cfg.model,
        **robot,
        action_horizon=cfg.data.action_horizon,
        latent_channels=codec.latent_channels,
        latent_frames=codec.latent_frames(cfg.data.num_frames),
    )
    data = dataclasses.replace(cfg.data, cameras=tuple(dataset.camera_keys))
    return cfg.replace(model=model, data=data)


CODEC_FIT_CLIPS = 512


def fit_codec(cfg: Config, dataset) -> Config:
    """Measure a `dct` codec's per-channel latent statistics on the training clips when the config has none.

    The clips are a fixed sample (seed 0, not the training seed), so every variant and seed trained on one dataset
    gets the same codec; the statistics are stored in the checkpoint's config.json like a VAE's latents_mean/std.
    """
    if cfg.codec.kind != "dct" or cfg.codec.latents_std:
        return cfg
    from fastwam.model.codecs import fit_codec_stats

    n = min(CODEC_FIT_CLIPS, len(dataset))
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()
    videos = torch.stack([torch.as_tensor(dataset[i]["video"]) for i in picks])
    return cfg.replace(codec=fit_codec_stats(cfg.codec, videos))


def stats_dict(dataset) -> dict | None:
    """The dataset's action / state statistics (None for video-only data: a video prior stores none)."""
    stats = getattr(dataset, "stats", None)
    if stats is None:
        return None
    return stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)


# Train settings that must be positive / non-negative (the rest are typed by the config and checked where used).
_POSITIVE = ("steps", "batch_size", "grad_accum", "log_every", "save_every")
_NON_NEGATIVE = ("keep_last", "val_every", "sample_every", "threads", "random_shift", "action_prefix_max")


def check_train_settings(tc) -> None:
    for name in _POSITIVE + _NON_NEGATIVE:
        value = getattr(tc, name)
        low = 1 if name in _POSITIVE else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            flag = "--steps / --config.train.steps" if name == "steps" else f"--config.train.{name.replace('_', '-')}"
            raise UserError(f"train.{name} must be an integer >= {low}, got {value!r} ({flag})")
    if not 0 <= tc.ema_decay < 1:
        raise UserError(f"train.ema_decay must be in [0, 1), got {tc.ema_decay} (--config.train.ema-decay)")


# ---------------------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    step: int
    losses: list[dict] = field(default_factory=list)  # one entry per logged step (rank 0)
    timers: dict = field(default_factory=dict)
    interrupted: bool = False  # stopped early by Ctrl-C (a checkpoint of `step` was saved)


class NonFiniteLoss(UserError, FloatingPointError):
    """The loss became NaN / inf: the last checkpoint is intact; the learning rate or the data needs a look."""


@dataclass
class _Trainer:
    """Everything the loop needs, built by the set-up and resume stages."""

    cfg: Config
    d: Dist
    device: torch.device
    run_dir: Path
    dataset: Any
    val_dataset: Any
    codec: LatentCodec
    text_encoder: torch.nn.Module
    model: FastWAM
    ema: FastWAM | None
    optimizer: torch.optim.Optimizer
    wrapped: torch.nn.Module  # the model, or its DDP / FSDP wrapper
    norm_stats: dict | None
    mix: Any = None  # MixedBatches when co-training with an action-free dataset
    video_dataset: Any = None
    teacher: FastWAM | None = None  # distillation (`fastwam distill`): the frozen teacher
    timers: dict = field(default_factory=lambda: dict.fromkeys(
        ("data", "compute", "log", "checkpoint", "validation", "samples"), 0.0))


def train(
    cfg: Config,
    out: str | Path,
    resume: runs.Resume = False,
    dataset=None,
    val_dataset=None,
    progress: bool = True,
    log_all_steps: bool = False,
    stop_at: int | None = None,
    accept_changes: bool = False,
) -> TrainResult:
    """Train `cfg` into run directory `out`. `dataset` overrides cfg.data.dataset (e.g. a synthetic one).

    resume: False = a new run (refused if `out` already holds checkpoints), True = continue from `out`'s latest
    checkpoint (refused if there is none, or if settings other than the step budget differ, unless accept_changes),
    "auto" = continue if there is a checkpoint, else start. stop_at: leave after this step (checkpointed) as if
    interrupted; resuming continues the same schedule. Ctrl-C stops after the current step with a checkpoint.
    """
    d = init_distributed()
    try:
        result = _train(cfg, out, resume, dataset, val_dataset, progress, log_all_steps, stop_at, accept_changes, d)
    except BaseException:
        shutdown_distributed(d, clean=False)
        raise
    shutdown_distributed(d)
    return result


def _train(cfg, out, resume, dataset, val_dataset, progress, log_all_steps, stop_at, accept_changes, d: Dist):
    run_dir = Path(out)
    check_train_settings(cfg.train)
    ckpt = runs.find_resume_checkpoint(run_dir, resume)
    cfg, dataset, val_dataset, video_dataset = _set_up(cfg, ckpt, dataset, val_dataset, accept_changes, d)
    t = _build(cfg, d, run_dir, dataset, val_dataset, from_wan=ckpt is None)
    if video_dataset is not None:
        t.video_dataset = video_dataset
        t.mix = MixedBatches(len(dataset), len(video_dataset), cfg.train.batch_size, cfg.data.video_ratio,
                             cfg.train.seed)
        if d.main:
            print(f"co-training: each batch of {cfg.train.batch_size} holds {t.mix.labelled} action-labelled clips "
                  f"from {cfg.data.dataset} and {t.mix.video} action-free clips from {cfg.data.video_dataset} "
                  f"({len(video_dataset)} clips)", file=sys.stderr)
    start = _resume(t, ckpt) if ckpt is not None else 0
    end = cfg.train.steps if stop_at is None else min(cfg.train.steps, stop_at)
    result = TrainResult(run_dir, ckpt, start)
    stop = runs.StopRequest()
    with stop.installed():
        _loop(t, start, end, result, stop, progress, log_all_steps)
    result.timers = t.timers
    return result


def _set_up(cfg: Config, ckpt: Path | None, dataset, val_dataset, accept_changes: bool, d: Dist):
    """The datasets and the run's config: codec statistics, robot interface, and on resume the run's own settings."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    saved = ckpt_io.load_config(ckpt) if ckpt is not None else None
    if cfg.train.init_from:
        from fastwam.training import init_from

        if cfg.train.variant == "video":
            raise UserError("--init-from starts a policy from a video prior; `fastwam pretrain` starts from scratch")
        cfg = init_from.recorded_source(cfg, saved) if saved is not None else init_from.adopt_source(cfg, d.main)
    if cfg.train.action_prefix_max:
        horizon = cfg.model.action_horizon
        if cfg.train.variant == "video" or cfg.train.distill_steps:
            raise UserError("train.action_prefix_max conditions a policy's action chunks on their leading actions: "
                            "it needs an action objective (not `fastwam pretrain`, not `fastwam distill`)")
        if cfg.train.action_prefix_max >= horizon:
            raise UserError(f"train.action_prefix_max ({cfg.train.action_prefix_max}) must be below the chunk "
                            f"length ({horizon}): some action must be left to predict")
    if cfg.train.distill_steps:
        distill.check_settings(cfg)
        cfg = distill.recorded_teacher(cfg, saved) if saved is not None else distill.adopt_teacher(cfg)
    if saved is not None:
        cfg = runs.resume_codec(cfg, saved)
    video_only = cfg.train.variant == "video"
    if dataset is None:
        from fastwam.data.clips import ClipDataset

        dataset = ClipDataset(cfg.data, split="train", actions=not video_only)
        if val_dataset is None and cfg.data.val_episodes > 0:
            val_dataset = ClipDataset(cfg.data, split="val", stats=dataset.stats, actions=not video_only)
    video_dataset = _video_dataset(cfg, dataset) if cfg.data.video_dataset else None
    cfg = fit_codec(cfg, dataset)
    cfg = resolve_config(cfg, dataset, build_codec(cfg.codec))
    if saved is not None:
        cfg, changes = runs.settings_for_resume(cfg, saved, ckpt, accept_changes)
        if changes and d.main:
            print(f"resume: taking from this command: {'; '.join(changes)}", file=sys.stderr)
        at = int(ckpt_io.load_train_state(ckpt, None)["step"])
        if at > cfg.train.steps:
            raise UserError(f"--steps {cfg.train.steps} is below the step the run is at ({at}, {ckpt}); give a "
                            "larger total")
    tc = cfg.train
    if tc.batch_size % (d.world * tc.grad_accum):
        raise UserError(f"train.batch_size {tc.batch_size} must be divisible by world size x grad_accum "
                        f"({d.world} x {tc.grad_accum})")
    return cfg, dataset, val_dataset, video_dataset


def _video_dataset(cfg: Config, dataset):
    """The action-free clips of `data.video_dataset`, cut and laid out exactly as the labelled dataset's."""
    from fastwam.data.clips import ClipDataset
    from fastwam.data.lerobot import DatasetError

    if cfg.train.variant == "video":
        raise UserError("--video-dataset mixes action-free clips into a policy's training; for a video prior give "
                        "the video as `fastwam pretrain --dataset`")
    if cfg.train.variant == "no_cotrain":
        raise UserError("--video-dataset adds to the video loss, which no_cotrain does not train")
    cameras = tuple(getattr(dataset, "camera_keys", ()) or cfg.data.cameras)
    data = dataclasses.replace(cfg.data, dataset=cfg.data.video_dataset, cameras=cameras, val_episodes=0)
    try:
        video = ClipDataset(data, split="train", actions=False)
    except DatasetError as e:
        raise DatasetError(f"--video-dataset: {e}") from None
    if hasattr(dataset, "frame_size") and video.frame_size != dataset.frame_size:
        raise DatasetError(f"--video-dataset {cfg.data.video_dataset}: frames are {video.frame_size}, the action "
                           f"dataset's {dataset.frame_size}")
    return video


def _build(cfg: Config, d: Dist, run_dir: Path, dataset, val_dataset, from_wan: bool) -> _Trainer:
    """Codec, text encoder, model (+ EMA), optimizer on this rank's device; the run directory's config.json."""
    tc = cfg.train
    device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    codec = build_codec(cfg.codec).to(device).eval()
    text_encoder = build_text_encoder(cfg.text, cfg.model.text_dim).to(device).eval()
    torch.manual_seed(tc.seed)
    if tc.init_from_wan and from_wan:
        from fastwam.model.weights import build_fastwam_from_wan

        # Built on the meta device and filled in place: no second full copy of the 5B weights in memory.
        model = build_fastwam_from_wan(tc.init_from_wan, cfg.model, device=device, seed=tc.seed)
    else:
        model = FastWAM(cfg.model).to(device)
        if tc.init_from and from_wan:
            from fastwam.training import init_from

            report = init_from.initialise(model, cfg)
            if d.main:
                print(f"init-from {tc.init_from} (step {tc.init_from_step}): {len(report['copied'])} tensors copied, "
                      f"{len(report['interpolated'])} interpolated, {len(report['random'])} random", file=sys.stderr)
    model.grad_checkpointing = tc.grad_checkpointing
    teacher = None
    if tc.distill_steps:  # a student: a copy of the teacher (a new run) whose action expert alone trains
        teacher, teacher_ckpt = distill.load_teacher(cfg, device)
        if from_wan:
            distill.initialise_student(model, teacher_ckpt)
        trained = distill.freeze_all_but_action(model)
        if d.main:
            distill.announce(cfg, teacher_ckpt, trained, sum(p.numel() for p in model.parameters()))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = model.parameters()
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if tc.ema_decay > 0 else None
    if teacher is not None and ema is not None and from_wan:
        distill.initialise_student(ema, teacher_ckpt, ema=True)
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", cfg.to_json())
    # A student's step calls its `distill_loss` (through DDP on several processes): `StudentLoss` is that module.
    wrapped = wrap_model(model if teacher is None else distill.StudentLoss(model), tc.fsdp, d, device)
    return _Trainer(cfg, d, device, run_dir, dataset, val_dataset, codec, text_encoder, model, ema, optimizer,
                    wrapped, stats_dict(dataset), teacher=teacher)


def _resume(t: _Trainer, ckpt: Path) -> int:
    """Load the checkpoint's weights, EMA and optimizer into the built trainer; returns its step."""
    ckpt_io.load_weights(t.model, ckpt / ckpt_io.WEIGHTS)
    if t.ema is not None and (ckpt / ckpt_io.EMA).is_file():
        ckpt_io.load_weights(t.ema, ckpt / ckpt_io.EMA, "EMA model")
    step = int(ckpt_io.load_train_state(ckpt, t.optimizer)["step"])
    if t.d.main:
        print(f"resuming from step {step}: {ckpt}", file=sys.stderr)
    return step


def _loop(t: _Trainer, start: int, end: int, result: TrainResult, stop: runs.StopRequest, progress: bool,
          log_all_steps: bool) -> None:
    """Steps start..end-1 with their logs, validation, samples and checkpoints; stops early on Ctrl-C (saved)."""
    tc = t.cfg.train
    log = _Log(t, start, progress and t.d.main)
    batches = StepBatches(len(t.dataset), tc.batch_size, tc.seed)
    t.model.train()
    try:
        for step in range(start, end):
            totals, lr, grad_norm = _step(t, step, batches)
            done = step + 1
            clock = time.perf_counter()
            if t.d.main and (done % tc.log_every == 0 or done == tc.steps or log_all_steps):
                result.losses.append(log.train_step(done, totals, lr, grad_norm))
            log.bar.update(1)
            t.timers["log"] += time.perf_counter() - clock
            _validate_and_sample(t, done, log)
            stopping = any_rank(stop.requested, t.d, t.device)
            if done % tc.save_every == 0 or done == end or stopping:
                result.checkpoint = _save(t, done)
            result.step = done
            if stopping:
                result.interrupted = True
                break
    finally:
        log.close()


def _step(t: _Trainer, step: int, batches: StepBatches) -> tuple[torch.Tensor, float, float]:
    """One optimisation step (all micro-batches): returns the mean (total, video, action) loss, lr, grad norm."""
    tc, d, variant = t.cfg.train, t.d, get_variant(t.cfg.train.variant)
    micro = tc.batch_size // (d.world * tc.grad_accum)
    lr = tc.lr * lr_scale(step, tc)
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    gen = step_generator(tc.seed, step)

    clock = time.perf_counter()
    mine = slice(d.rank * micro * tc.grad_accum, (d.rank + 1) * micro * tc.grad_accum)
    if t.mix is None:
        items = [t.dataset[i] for i in batches.indices(step)[mine]]
    else:
        m = t.cfg.model
        items = [with_placeholders(t.video_dataset[i], m.action_horizon, m.action_dim, m.state_dim) if action_free
                 else {**t.dataset[i], "labelled": torch.tensor(True)} for action_free, i in t.mix.indices(step)[mine]]
    collate = getattr(t.dataset, "collate", None)
    global_batch = collate(items) if collate else items
    t.timers["data"] += time.perf_counter() - clock

    clock = time.perf_counter()
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and t.device.type == "cuda")
    noise = None
    t.optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(3, device=t.device)
    for a in range(tc.grad_accum):
        sl = slice(a * micro, (a + 1) * micro)
        mb = {k: (v[sl] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in global_batch.items()}
        mb["video"] = random_shift(mb["video"], tc.random_shift, step_generator(tc.seed, step, 1 + a))
        inputs = prepare_batch(mb, t.codec, t.text_encoder, t.device)
        if noise is None and t.teacher is not None:
            noise = distill.draw_noise(t.cfg, gen)  # the action noise the teacher starts from
        if noise is None:
            # One draw for the whole global batch; this rank's micro-batch takes its slice.
            video_shape = (tc.batch_size, *inputs["latents"].shape[1:])
            action_shape = inputs["actions"].shape[1:] if inputs["actions"] is not None else (1, 1)
            noise = TrainingNoise.draw(variant, video_shape, (tc.batch_size, *action_shape), gen,
                                       action_prefix_max=tc.action_prefix_max)
        start = (d.rank * tc.grad_accum + a) * micro
        sync = contextlib.nullcontext() if (a == tc.grad_accum - 1 or d.world == 1) else t.wrapped.no_sync()
        autocast = torch.autocast(t.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with sync, autocast:
            if t.teacher is not None:  # distillation: the student's steps against the teacher's trajectory
                out = distill.student_loss(t.teacher, t.wrapped, inputs, noise[start : start + micro].to(t.device),
                                           t.cfg)
            else:
                # Whether the action stream runs is decided for the whole global batch, so every rank runs the same
                # modules (DDP): only a video prior's objective skips it.
                out = t.wrapped(**inputs, variant=variant, noise=_to(noise.slice(start, start + micro), t.device),
                                run_actions=variant.action_loss_weight > 0)
            (out.total / tc.grad_accum).backward()
        totals += torch.stack([out.total.detach(), out.video, out.action]).float() / tc.grad_accum
    if not torch.isfinite(totals).all():
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (total/video/action = {totals.tolist()}); the last checkpoint in "
            f"{t.run_dir / 'checkpoints'} is intact — lower the learning rate or check the data, then --resume"
        )
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), tc.grad_clip)
    t.optimizer.step()
    if t.ema is not None:
        with torch.no_grad():
            for pe, pm in zip(t.ema.parameters(), t.model.parameters()):
                if pm.requires_grad:  # (all but a distilled student's frozen video expert)
                    pe.lerp_(pm.detach(), 1 - tc.ema_decay)
    totals = mean_across_ranks(totals, d)
    t.timers["compute"] += time.perf_counter() - clock
    return totals, lr, float(grad_norm)


def _validate_and_sample(t: _Trainer, done: int, log: _Log) -> None:
    tc = t.cfg.train
    if t.d.main and t.val_dataset is not None and tc.val_every and done % tc.val_every == 0:
        clock = time.perf_counter()
        val = monitor.validation_loss(t.model, t.val_dataset, t.codec, t.text_encoder, get_variant(tc.variant),
                                      t.device, tc.seed)
        log.validation(done, val)
        t.timers["validation"] += time.perf_counter() - clock
    if t.d.main and tc.sample_every and done % tc.sample_every == 0:
        clock = time.perf_counter()
        monitor.write_samples(t.model, t.val_dataset or t.dataset, t.codec, t.text_encoder, t.cfg,
                              t.run_dir / "samples", done, log.writer)
        t.timers["samples"] += time.perf_counter() - clock


def _save(t: _Trainer, done: int) -> Path | None:
    """Checkpoint step `done` (rank 0 writes; every rank waits for it)."""
    clock = time.perf_counter()
    path = None
    if t.d.main:
        tc = t.cfg.train
        path = ckpt_io.save_checkpoint(t.run_dir, done, t.cfg, t.model, t.norm_stats, t.optimizer, {"seed": tc.seed},
                                       t.ema, tc.keep_last)
    barrier(t.d)
    t.timers["checkpoint"] += time.perf_counter() - clock
    return path


class _Log:
    """Progress bar, metrics.jsonl and TensorBoard of one attempt (rank 0; inert on the other ranks)."""

    def __init__(self, t: _Trainer, start: int, show_bar: bool):
        tc = t.cfg.train
        self.batch_size = tc.batch_size
        self.mix = t.mix
        self.metrics = runs.MetricsLog(t.run_dir / "metrics.jsonl", start) if t.d.main else None
        self.writer = monitor.summary_writer(t.run_dir, tc.wandb, purge_step=start + 1) if t.d.main else None
        self.bar = tqdm(total=tc.steps, initial=start, disable=not show_bar, dynamic_ncols=True,
                        desc=f"distill {tc.distill_steps}-step" if tc.distill_steps else f"train {tc.variant}",
                        unit="step")
        self.window_start, self.window_first = time.perf_counter(), start  # it/s over the steps since the last log

    def train_step(self, done: int, totals: torch.Tensor, lr: float, grad_norm: float) -> dict:
        now = time.perf_counter()
        its = (done - self.window_first) / max(now - self.window_start, 1e-9)
        self.window_start, self.window_first = now, done
        entry = {"step": done, "loss": totals[0].item(), "video": totals[1].item(), "action": totals[2].item(),
                 "lr": lr, "grad_norm": grad_norm, "it_s": its}
        if self.mix is not None:  # the exact mix of every batch (co-training with action-free video)
            entry.update(clips_labelled=self.mix.labelled, clips_action_free=self.mix.video)
        self.bar.set_postfix(loss=f"{entry['loss']:.4f}", video=f"{entry['video']:.4f}",
                             action=f"{entry['action']:.4f}", lr=f"{lr:.1e}")
        monitor.write_scalars(self.writer, entry, self.batch_size)
        self.metrics.append(entry)
        return entry

    def validation(self, done: int, val: dict) -> None:
        if self.writer is not None:
            for k, v in val.items():
                self.writer.add_scalar(f"val/{k}", v, done)
        self.metrics.append({"step": done, **{f"val_{k}": v for k, v in val.items()}})

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _to(noise: TrainingNoise, device) -> TrainingNoise:
    values = [None if t is None else t.to(device) for t in (getattr(noise, f.name) for f in dataclasses.fields(noise))]
    return TrainingNoise(*values)


# ---------------------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class TrainArgs(PresetArgs):
    """Train a Fast-WAM policy. Every config field is an override: `--config.train.lr 3e-4`."""

    config: Config
    dataset: str = ""  # LeRobot dataset directory (overrides --config.data.dataset)
    # Run directory (checkpoints, tensorboard, metrics.jsonl). A new run refuses one that holds checkpoints.
    out: str = "runs/train"
    variant: str = ""  # fast | joint | idm | no_cotrain (overrides --config.train.variant)
    # Total optimisation steps, > 0 (overrides --config.train.steps; default: the preset's); with --resume, the new
    # total.
    steps: Annotated[int | None, tyro.conf.arg(metavar="N")] = None
    resume: bool = False  # continue the run in --out from its latest checkpoint (an error if it has none)
    # Resume when --out holds a checkpoint, else start a new run there (for scripts that rerun one command, such as
    # fastwam ablate).
    auto_resume: bool = False
    # With --resume: continue under this command's settings where they differ from the run's (otherwise refused, with
    # the differing fields listed). The model and codec can never change.
    accept_changes: bool = False
    synthetic: bool = False  # train on the built-in synthetic dataset (smoke test; no data needed)
    progress: bool = True  # show a progress bar
    # Start from another fastwam run (a `fastwam pretrain` video prior, or any run): its video expert, codec and text
    # encoder (overrides --config.train.init-from).
    init_from: str = ""
    # With --init-from: the action expert interpolated from the video expert (as from Wan weights), random, or copied
    # from a policy source of the same shapes (copy: fine-tune a trained policy).
    init_action: Literal["interpolate", "random", "copy"] | None = None
    # Co-train with an action-free LeRobot dataset (same cameras): its clips add to the video loss only.
    video_dataset: str = ""
    # Share of each batch taken from --video-dataset (exact: round(ratio x batch) clips; default 0.5).
    video_ratio: float | None = None


def cli(argv: list[str], prog: str = "fastwam train") -> int:
    args = parse_with_preset(argv, TrainArgs, prog)
    cfg = args.config
    if args.dataset:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, dataset=args.dataset))
    if args.variant:
        if args.variant == "video":
            raise UserError("--variant video is the objective of a video prior: run `fastwam pretrain`")
        get_variant(args.variant)
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, variant=args.variant))
    if cfg.train.variant == "video" or not cfg.model.action_expert:
        raise UserError("`fastwam train` trains a policy; a video prior (the 'video' objective, no action expert) is "
                        "`fastwam pretrain`'s")
    train_fields, data_fields = {}, {}
    if args.init_from:
        train_fields["init_from"] = args.init_from
    if args.init_action is not None:
        train_fields["init_action"] = args.init_action
    if args.video_dataset:
        data_fields["video_dataset"] = args.video_dataset
    if args.video_ratio is not None:
        data_fields["video_ratio"] = args.video_ratio
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, **train_fields),
                      data=dataclasses.replace(cfg.data, **data_fields))
    if (args.init_action is not None) and not cfg.train.init_from:
        raise UserError("--init-action needs --init-from RUN")
    if args.video_ratio is not None and not cfg.data.video_dataset:
        raise UserError("--video-ratio needs --video-dataset DIR")
    return _run(cfg, args, prog)


def _run(cfg: Config, args, prog: str) -> int:
    """What `fastwam train` and `fastwam pretrain` share once the config is made: steps, resume, data, the run."""
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps must be a positive number of optimisation steps, got {args.steps}")
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=args.steps))
    if args.resume and args.auto_resume:
        raise UserError("give --resume or --auto-resume, not both")
    dataset = None
    if getattr(args, "synthetic", False):
        from fastwam.data.synthetic import SyntheticClips

        dataset = SyntheticClips(cfg.data, num_clips=128)
    elif not cfg.data.dataset:
        raise UserError("give --dataset DIR (a LeRobot v3.0 dataset) or --synthetic")
    resume = "auto" if args.auto_resume else args.resume
    result = train(cfg, args.out, resume=resume, dataset=dataset, progress=args.progress,
                   accept_changes=args.accept_changes)
    if result.losses:
        last = result.losses[-1]
        print(f"step {result.step}: loss {last['loss']:.4f} (video {last['video']:.4f}, action {last['action']:.4f})")
    print(f"checkpoint: {result.checkpoint}")
    return _exit_code(result, prog)


def _exit_code(result: TrainResult, prog: str) -> int:
    if result.interrupted:
        print(f"{prog}: interrupted at step {result.step}; saved {result.checkpoint} — continue with the same "
              "command plus --resume", file=sys.stderr)
        return 130
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# `fastwam pretrain`: the video expert alone


@dataclass
class PretrainArgs(PresetArgs):
    """Pretrain a video prior: the video expert alone (no action expert, no action tokens) learns to predict future
    frames by flow matching on any LeRobot dataset, with or without actions (`fastwam data videos`, `fastwam data
    metaworld --no-actions`). Start a policy from it with `fastwam train --init-from RUN`."""

    config: Config
    dataset: str = ""  # LeRobot dataset directory (actions not needed; overrides --config.data.dataset)
    out: str = "runs/pretrain"  # run directory (checkpoints, tensorboard, metrics.jsonl, samples/)
    # Total optimisation steps, > 0 (default: the preset's); with --resume, the new total.
    steps: Annotated[int | None, tyro.conf.arg(metavar="N")] = None
    resume: bool = False  # continue the run in --out from its latest checkpoint (an error if it has none)
    auto_resume: bool = False  # resume when --out holds a checkpoint, else start there
    accept_changes: bool = False  # with --resume: continue under this command's settings where they differ
    progress: bool = True  # show a progress bar


def pretrain_cli(argv: list[str], prog: str = "fastwam pretrain") -> int:
    args = parse_with_preset(argv, PretrainArgs, prog)
    cfg = args.config
    if args.dataset:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, dataset=args.dataset))
    if cfg.data.video_dataset or cfg.train.init_from or cfg.train.init_from_wan:
        raise UserError("fastwam pretrain trains a video expert from scratch on --dataset alone (no "
                        "--config.data.video-dataset, --config.train.init-from or init-from-wan)")
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, variant="video"),
                      model=dataclasses.replace(cfg.model, action_expert=False))
    return _run(cfg, args, prog)


# ---------------------------------------------------------------------------------------------------------------------
# `fastwam distill`: a few-step sampler from a trained run (the method: training/distill.py)


@dataclass
class DistillArgs:
    """Distill a trained Fast-WAM policy (the teacher) into a few-step sampler: a copy of it whose action expert alone
    trains so that N Euler steps land where the teacher's --teacher-steps land. The result is an ordinary run whose
    inference.steps is N (`fastwam serve` / `eval` use it as it is); the video expert and its cached prefix are the
    teacher's, unchanged."""

    checkpoint: str  # the teacher: a `fastwam train` run directory or checkpoint directory (or hf://...)
    out: str = "runs/distill"  # the student's run directory (checkpoints, tensorboard, metrics.jsonl)
    steps: int = 1  # the student's Euler sampling steps N (its inference.steps), 1 <= N < the teacher's steps
    # Fine Euler steps of the teacher's path the student learns (default: the teacher's inference.steps).
    teacher_steps: Annotated[int | None, tyro.conf.arg(metavar="T")] = None
    train_steps: int = 500  # optimisation steps
    # Peak learning rate (default: the teacher's train.lr); warm-up and cosine as in training.
    lr: Annotated[float | None, tyro.conf.arg(metavar="LR")] = None
    batch_size: Annotated[int | None, tyro.conf.arg(metavar="B")] = None  # global batch (default: the teacher's)
    dataset: str = ""  # LeRobot dataset the observations come from (default: the teacher's config.data.dataset)
    synthetic: bool = False  # observations from the built-in synthetic dataset (smoke test)
    resume: bool = False  # continue the run in --out from its latest checkpoint (an error if it has none)
    auto_resume: bool = False  # resume when --out holds a checkpoint, else start there
    accept_changes: bool = False  # with --resume: continue under this command's settings where they differ
    progress: bool = True  # show a progress bar


def distill_cli(argv: list[str], prog: str = "fastwam distill") -> int:
    args = tyro.cli(DistillArgs, args=argv, prog=prog)
    if args.resume and args.auto_resume:
        raise UserError("give --resume or --auto-resume, not both")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: the student needs at least one sampling step")
    if args.train_steps < 1:
        raise UserError(f"--train-steps must be a positive number of optimisation steps, got {args.train_steps}")
    ckpt = distill.teacher_checkpoint(args.checkpoint)
    teacher_cfg = ckpt_io.load_config(ckpt)
    distill.check_teacher(teacher_cfg, args.checkpoint)
    teacher_steps = args.teacher_steps if args.teacher_steps is not None else teacher_cfg.inference.steps
    if teacher_steps < 1:
        raise UserError(f"--teacher-steps {teacher_steps}: the teacher needs at least one step")
    if args.steps >= teacher_steps:
        raise UserError(f"--steps {args.steps}: a distilled sampler takes fewer steps than its teacher's "
                        f"{teacher_steps} (--teacher-steps)")
    cfg = distill.student_config(teacher_cfg, distill.recorded_path(args.checkpoint), args.steps, teacher_steps,
                                 args.train_steps, args.lr, args.batch_size, args.dataset or None)
    if args.synthetic:
        from fastwam.data.synthetic import SyntheticClips

        dataset = SyntheticClips(cfg.data, num_clips=128)
    elif not cfg.data.dataset:
        raise UserError(f"the teacher {ckpt} names no dataset: give --dataset DIR (a LeRobot v3.0 dataset)")
    else:
        from fastwam.data.clips import ClipDataset
        from fastwam.data.normalize import NormStats

        stats = ckpt_io.load_norm_stats(ckpt)
        if stats is None:
            raise UserError(f"{ckpt / ckpt_io.NORM_STATS} is missing: the teacher's normalisation is needed")
        # The teacher's normalisation, whatever the dataset: the student acts in the teacher's action space.
        dataset = ClipDataset(cfg.data, split="train", stats=NormStats.from_dict(stats))
    resume = "auto" if args.auto_resume else args.resume
    result = train(cfg, args.out, resume=resume, dataset=dataset, progress=args.progress,
                   accept_changes=args.accept_changes)
    if result.losses:
        print(f"step {result.step}: distill loss {result.losses[-1]['loss']:.6f}")
    print(f"checkpoint: {result.checkpoint} ({args.steps}-step sampler)")
    return _exit_code(result, prog)
