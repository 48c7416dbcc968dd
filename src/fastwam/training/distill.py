"""`fastwam distill`: a few-step action sampler distilled from a trained Fast-WAM run.

Method: teacher-trajectory distillation of the action expert (Luhman & Luhman 2021, one-step knowledge distillation,
generalised to N segments as in progressive distillation, Salimans & Ho 2022, but done in one stage).

- The student is a copy of the teacher (every weight, its EMA too). Only `action.*` parameters train: the video
  expert and the text / state projections are frozen, so the frame-0 prefix the fast sampler caches, and the video
  of joint / idm sampling, are exactly the teacher's.
- The student samples with N Euler steps on the same noise levels as plain sampling, `flow.euler_sigmas(N, shift)`.
  A distilled run is an ordinary checkpoint whose `inference.steps` is N: nothing new at inference, any server or
  evaluation runs it as it runs the teacher.
- Each training step takes the batch plain training would (same clips, augmentation and encoders, `_step` in
  train.py), draws action noise from the step's generator, and runs the TEACHER in fast mode from sigma = 1 to 0
  (no grad): the frame-0 prefix once, then `teacher_steps` fine Euler steps spread over the N student segments.
  Segment k spans u in [u_k, u_{k+1}] of linspace(1, 0, N + 1) and is integrated with m = ceil(teacher_steps / N)
  Euler sub-steps on shift_sigma(linspace(u_k, u_{k+1}, m + 1)); when N divides teacher_steps that is exactly the
  teacher's own teacher_steps-step path, so for N = 1 the target is the teacher's ordinary 10-step chunk. The states
  x_k at the segment boundaries are recorded.
- Loss: the mean over segments of MSE(student velocity at (x_k, sigma_k), (x_{k+1} - x_k) / (sigma_{k+1} -
  sigma_k)): the student's one Euler step lands where the teacher's sub-steps landed. The frozen prefix (frame-0
  K/V) is computed once per batch and shared by teacher and student.

Why this method: no architecture change (no step-size conditioning input, which the released official checkpoints
lack), so any fastwam policy, an imported official one included, can be distilled and served as it is; the frozen
conditioning prefix is shared by teacher and student; the target is deterministic (a fixed teacher ODE solution for
each noise draw), so it converges in a few hundred steps, on a CPU too. Alternatives not taken: shortcut models and
MeanFlow condition the network on the step size (new inputs, trained from scratch with the whole model);
consistency distillation needs a target network and many more steps; progressive distillation halves the steps one
stage at a time (log2(10 / N) trainings instead of one).

The teacher is the weights the teacher run serves (its EMA when it kept one), in float32, on the student's device.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch
from torch import nn

from fastwam import checkpoint as ckpt_io
from fastwam import hub
from fastwam.config import Config
from fastwam.errors import UserError
from fastwam.model import flow
from fastwam.model.fastwam import FastWAM, LossOutput
from fastwam.model.visibility import MODE_RULES, get_variant
from fastwam.training.init_from import checkpoint_step, file_sha256, source_checkpoint

# ---------------------------------------------------------------------------------------------------------------------
# The teacher and the run's config


def teacher_checkpoint(path: str) -> Path:
    return source_checkpoint(path, "--checkpoint", "`fastwam train`")


def check_teacher(tcfg: Config, where: str | Path) -> None:
    """A teacher must be a policy that samples in fast mode (the distilled sampler is the fast one)."""
    if not tcfg.model.action_expert or tcfg.train.variant == "video":
        raise UserError(f"--checkpoint {where}: a video prior (`fastwam pretrain`) has no action expert to distill; "
                        "give a policy run (`fastwam train`)")
    mode = get_variant(tcfg.train.variant).inference
    if mode != "fast":
        raise UserError(f"--checkpoint {where}: a {tcfg.train.variant} policy samples in {mode} mode; distillation "
                        "makes a few-step fast sampler (teachers trained as fast or no_cotrain)")


def student_config(tcfg: Config, distill_from: str, steps: int, teacher_steps: int, train_steps: int,
                   lr: float | None = None, batch_size: int | None = None, dataset: str | None = None) -> Config:
    """The student run's config: the teacher's, with the distillation settings and the optimisation schedule.

    Co-training video, validation and samples are switched off (the video expert does not train); the teacher's own
    origin (init-from / Wan weights) is dropped: the student starts from the teacher.
    """
    tc = dataclasses.replace(
        tcfg.train, steps=train_steps, lr=tcfg.train.lr if lr is None else lr,
        batch_size=tcfg.train.batch_size if batch_size is None else batch_size,
        init_from="", init_from_step=0, init_from_sha256="", init_from_wan="", fsdp=False, val_every=0,
        sample_every=0, distill_from=distill_from, distill_steps=steps, distill_teacher_steps=teacher_steps,
        distill_teacher_step=0, distill_teacher_sha256="",
    )
    data = dataclasses.replace(tcfg.data, video_dataset="", dataset=tcfg.data.dataset if dataset is None else dataset)
    return tcfg.replace(train=tc, data=data, inference=dataclasses.replace(tcfg.inference, steps=steps))


def recorded_path(path: str) -> str:
    """What the run records as its teacher: the resolved checkpoint directory (a hf:// reference as given)."""
    return path if hub.is_hub(path) else str(teacher_checkpoint(path))


def check_settings(cfg: Config) -> None:
    """The distillation settings of a run, before anything is built (one line each)."""
    tc = cfg.train
    for name, low in (("distill_steps", 1), ("distill_teacher_steps", 1)):
        value = getattr(tc, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"train.{name} must be an integer >= {low}, got {value!r}")
    if tc.distill_steps >= tc.distill_teacher_steps:
        raise UserError(f"--steps {tc.distill_steps}: a distilled sampler takes fewer steps than its teacher's "
                        f"{tc.distill_teacher_steps}")
    if not tc.distill_from:
        raise UserError("distillation needs a teacher: train.distill_from (fastwam distill --checkpoint RUN)")
    refused = [(tc.fsdp, "FSDP (the teacher is a full copy on every rank: use DDP)"),
               (bool(tc.init_from or tc.init_from_wan), "--init-from / init-from-wan (the student starts from its "
                                                        "teacher)"),
               (bool(cfg.data.video_dataset), "--video-dataset (the video expert does not train)")]
    for bad, what in refused:
        if bad:
            raise UserError(f"distillation does not take {what}")
    if get_variant(tc.variant).inference != "fast":
        raise UserError(f"distillation makes a fast sampler; train.variant {tc.variant} samples in "
                        f"{get_variant(tc.variant).inference} mode")


def adopt_teacher(cfg: Config) -> Config:
    """A new run's config with the teacher's identity recorded (its checkpoint step and the sha256 of its weights)."""
    ckpt = teacher_checkpoint(cfg.train.distill_from)
    check_teacher(ckpt_io.load_config(ckpt), cfg.train.distill_from)
    train = dataclasses.replace(cfg.train, distill_teacher_step=checkpoint_step(ckpt),
                                distill_teacher_sha256=file_sha256(ckpt / ckpt_io.WEIGHTS))
    return cfg.replace(train=train)


def recorded_teacher(cfg: Config, saved: Config) -> Config:
    """On resume: the teacher's identity as the run recorded it when it started."""
    train = dataclasses.replace(cfg.train, distill_teacher_step=saved.train.distill_teacher_step,
                                distill_teacher_sha256=saved.train.distill_teacher_sha256)
    return cfg.replace(train=train)


def load_teacher(cfg: Config, device) -> tuple[FastWAM, Path]:
    """The teacher (the weights its run serves: EMA when kept), float32, frozen, in eval mode, on `device`.

    Refuses a teacher whose weights changed since the run recorded them, and one whose model / codec / text encoder
    is not the run's (e.g. a --dataset with other action or state sizes)."""
    from fastwam.loading import model_from_weights

    ckpt = teacher_checkpoint(cfg.train.distill_from)
    weights = ckpt / ckpt_io.WEIGHTS
    recorded = cfg.train.distill_teacher_sha256
    if recorded and file_sha256(weights) != recorded:
        raise UserError(f"teacher {ckpt}: its weights changed since this run recorded them (sha256 "
                        f"{recorded[:16]}...); distill the new teacher into another --out")
    tcfg = ckpt_io.load_config(ckpt)
    for section in ("model", "codec", "text"):
        mine, theirs = dataclasses.asdict(getattr(cfg, section)), dataclasses.asdict(getattr(tcfg, section))
        differ = [k for k in mine if mine[k] != theirs[k]]
        if differ:
            k = differ[0]
            raise UserError(f"teacher {ckpt}: {section}.{k} is {theirs[k]!r} there and {mine[k]!r} in this run (the "
                            "data or settings do not fit the teacher; distill on the teacher's dataset)")
    ema = ckpt / ckpt_io.EMA
    teacher = model_from_weights(tcfg.model, ema if ema.is_file() else weights)
    return teacher.float().to(device).eval().requires_grad_(False), ckpt


@torch.no_grad()
def initialise_student(model: FastWAM, ckpt: Path, ema: bool = False) -> None:
    """A new student: an exact copy of the teacher's weights (ema=True: its EMA, or its weights if it kept none)."""
    source = ckpt / ckpt_io.EMA if ema and (ckpt / ckpt_io.EMA).is_file() else ckpt / ckpt_io.WEIGHTS
    ckpt_io.load_weights(model, source, "teacher EMA model" if ema else "teacher model")


def freeze_all_but_action(model: FastWAM) -> int:
    """requires_grad False on everything but `action.*` (video expert, state projection); returns the trained count."""
    trained = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("action."))
        trained += p.numel() if p.requires_grad else 0
    return trained


def announce(cfg: Config, ckpt: Path, trained: int, total: int) -> None:
    tc = cfg.train
    print(f"distill: teacher {ckpt} (step {tc.distill_teacher_step}), {tc.distill_teacher_steps} teacher steps -> "
          f"{tc.distill_steps}-step student; training the action expert ({trained:,} of {total:,} parameters)",
          file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# The teacher's trajectory and the student's loss


def teacher_schedule(student_steps: int, teacher_steps: int, shift: float, device=None) -> tuple[torch.Tensor, list]:
    """The teacher's fine noise levels and, as indices into them, the N + 1 segment boundaries.

    Segment k spans u in [u_k, u_{k+1}] of linspace(1, 0, N + 1) with m = ceil(teacher_steps / N) Euler sub-steps on
    shift_sigma(linspace(u_k, u_{k+1}, m + 1)). The boundary levels are exactly `flow.euler_sigmas(N, shift)`; for
    N = 1 the fine levels are exactly `flow.euler_sigmas(teacher_steps, shift)`.
    """
    n = student_steps
    m = math.ceil(teacher_steps / n)
    coarse = torch.linspace(1.0, 0.0, n + 1, device=device)
    if n == 1:
        u = torch.linspace(1.0, 0.0, m + 1, device=device)
    else:
        pieces = [torch.linspace(float(coarse[k]), float(coarse[k + 1]), m + 1, device=device)[:-1] for k in range(n)]
        u = torch.cat([*pieces, coarse[-1:]])
    return flow.shift_sigma(u, shift), [k * m for k in range(n + 1)]


@torch.no_grad()
def teacher_trajectory(teacher: FastWAM, first_latent: torch.Tensor, text: torch.Tensor, state: torch.Tensor,
                       noise: torch.Tensor, student_steps: int, teacher_steps: int, shift: float = flow.DEFAULT_SHIFT):
    """The teacher's fast-mode path from `noise` (sigma 1) to its chunk (sigma 0).

    Returns (states [N + 1, B, Ha, A] at the segment boundaries, their noise levels sigmas [N + 1] (=
    `euler_sigmas(N, shift)`), the frame-0 prefix cache). The same stages as `FastWAM.sample(mode="fast")`, so with
    N = 1 the last state is that function's chunk for this noise, bit for bit.
    """
    rule = MODE_RULES["fast"]
    video_ctx, action_ctx = teacher.condition(text, state)
    cache = teacher.prefill(first_latent, video_ctx, rule)
    x = noise.to(first_latent.dtype)
    layout = cache.action_layout(rule, x.shape[1])
    fine, bounds = teacher_schedule(student_steps, teacher_steps, shift, device=first_latent.device)
    states = [x]
    for k in range(student_steps):
        for i in range(bounds[k], bounds[k + 1]):
            x = teacher.action_step(x, fine[i], fine[i + 1], cache, action_ctx, rule, layout)
        states.append(x)
    return torch.stack(states), fine[bounds], cache


class StudentLoss(nn.Module):
    """The module a distillation step calls (and DDP wraps): the student's `distill_loss`."""

    def __init__(self, model: FastWAM):
        super().__init__()
        self.model = model

    def forward(self, **kwargs) -> torch.Tensor:
        return self.model.distill_loss(**kwargs)


def draw_noise(cfg: Config, generator: torch.Generator) -> torch.Tensor:
    """The global batch's action noise of one step [batch, Ha, A] (each rank's micro-batch takes its slice)."""
    m = cfg.model
    return torch.randn(cfg.train.batch_size, m.action_horizon, m.action_dim, generator=generator)


def student_loss(teacher: FastWAM, student: nn.Module, inputs: dict, noise: torch.Tensor, cfg: Config) -> LossOutput:
    """One micro-batch's distillation loss (`inputs`: `prepare_batch`'s tensors): total = action = the loss."""
    tc = cfg.train
    states, sigmas, cache = teacher_trajectory(teacher, inputs["latents"][:, :, :1], inputs["text"], inputs["state"],
                                               noise, tc.distill_steps, tc.distill_teacher_steps, cfg.inference.shift)
    loss = student(text=inputs["text"], state=inputs["state"], states=states, sigmas=sigmas, cache=cache)
    return LossOutput(total=loss, video=torch.zeros((), device=loss.device), action=loss.detach())
