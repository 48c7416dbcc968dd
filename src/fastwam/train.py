"""`fastwam train`: the training loop (single process, or `torchrun` DDP / FSDP2).

Determinism is by construction: the clips and every random draw of step s (noise, noise levels, augmentation) are
functions of (seed, s) alone, drawn for the GLOBAL batch and sliced per rank. So `--resume` continues exactly, and a
2-process run sees the same data and noise as a 1-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import tyro
from tqdm.auto import tqdm

from fastwam import checkpoint as ckpt_io
from fastwam.config import Config, get_preset
from fastwam.model.codecs import LatentCodec, build_codec
from fastwam.model.fastwam import FastWAM, TrainingNoise
from fastwam.model.text import TextEncoder, build_text_encoder
from fastwam.model.visibility import get_variant

# ---------------------------------------------------------------------------------------------------------------------
# Pieces shared with evaluation / policy


def resolve_config(cfg: Config, dataset, codec: LatentCodec) -> Config:
    """Fill the model's robot interface and latent geometry from the dataset and codec (not from the preset)."""
    model = dataclasses.replace(
        cfg.model,
        action_dim=int(dataset.action_dim),
        state_dim=int(dataset.state_dim),
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


def stats_dict(dataset) -> dict:
    stats = dataset.stats
    return stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)


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
    """A collated clip batch -> the tensors `FastWAM.loss` takes."""
    video = batch["video"].to(device)
    with torch.no_grad():
        latents = codec.encode(video)
        text = text_encoder(list(batch["task"])).to(device)
    return {
        "latents": latents,
        "latent_mask": codec.latent_frame_mask(batch["video_mask"].to(device)),
        "actions": batch["actions"].to(device),
        "action_mask": batch["action_mask"].to(device),
        "state": batch["state"].to(device),
        "text": text,
    }


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


# ---------------------------------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _mean_across_ranks(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= d.world
    return x


# ---------------------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    step: int
    losses: list[dict] = field(default_factory=list)  # one entry per logged step (rank 0)
    timers: dict = field(default_factory=dict)


def train(
    cfg: Config,
    out: str | Path,
    resume: bool = False,
    dataset=None,
    val_dataset=None,
    progress: bool = True,
    log_all_steps: bool = False,
    stop_at: int | None = None,
) -> TrainResult:
    """Train `cfg` into run directory `out`. `dataset` overrides cfg.data.dataset (e.g. a synthetic one).

    stop_at: leave after this step (checkpointed) as if interrupted; `resume=True` continues the same schedule.
    """
    d = init_distributed()
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    variant = get_variant(tc.variant)
    run_dir = Path(out)

    if dataset is None:
        from fastwam.data.clips import ClipDataset

        dataset = ClipDataset(cfg.data, split="train")
        if val_dataset is None and cfg.data.val_episodes > 0:
            val_dataset = ClipDataset(cfg.data, split="val", stats=dataset.stats)
    cfg = fit_codec(cfg, dataset)
    codec = build_codec(cfg.codec).to(device).eval()
    cfg = resolve_config(cfg, dataset, codec)
    text_encoder = build_text_encoder(cfg.text, cfg.model.text_dim).to(device).eval()

    start_step = 0
    resume_from = None
    if resume:
        try:
            resume_from = ckpt_io.resolve_checkpoint(run_dir)
        except ckpt_io.CheckpointError:
            resume_from = None  # nothing to resume yet: start fresh
        if resume_from is not None:
            saved = ckpt_io.load_config(resume_from)
            if saved.model != cfg.model:
                raise ckpt_io.CheckpointError(
                    f"cannot resume {resume_from}: its model config differs from this run's "
                    f"({_diff(saved.model, cfg.model)})"
                )
            # Keep the saved config (its codec statistics included); only the step budget may change on resume.
            cfg = saved.replace(train=dataclasses.replace(saved.train, steps=tc.steps))
            tc = cfg.train
            codec = build_codec(cfg.codec).to(device).eval()

    torch.manual_seed(tc.seed)
    if tc.init_from_wan and resume_from is None:
        from fastwam.model.weights import build_fastwam_from_wan

        # Built on the meta device and filled in place: no second full copy of the 5B weights in memory.
        model = build_fastwam_from_wan(tc.init_from_wan, cfg.model, device=device, seed=tc.seed)
    else:
        model = FastWAM(cfg.model).to(device)
    model.grad_checkpointing = tc.grad_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if tc.ema_decay > 0 else None
    if resume_from is not None:
        ckpt_io.load_weights(model, resume_from / ckpt_io.WEIGHTS)
        if ema is not None and (resume_from / ckpt_io.EMA).is_file():
            ckpt_io.load_weights(ema, resume_from / ckpt_io.EMA, "EMA model")
        start_step = ckpt_io.load_train_state(resume_from, optimizer)["step"]

    wrapped = _wrap(model, tc, d, device)
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    if tc.batch_size % (d.world * tc.grad_accum):
        raise ValueError(f"batch_size {tc.batch_size} must be divisible by world size x grad_accum "
                         f"({d.world} x {tc.grad_accum})")
    micro = tc.batch_size // (d.world * tc.grad_accum)
    batches = StepBatches(len(dataset), tc.batch_size, tc.seed)
    collate = getattr(dataset, "collate", None)
    norm_stats = stats_dict(dataset)

    writer = None
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
        writer = _summary_writer(run_dir, tc)
    timers = {"data": 0.0, "compute": 0.0, "log": 0.0, "checkpoint": 0.0, "validation": 0.0, "samples": 0.0}
    result = TrainResult(run_dir, None, start_step)
    bar = tqdm(total=tc.steps, initial=start_step, disable=not (progress and d.main), dynamic_ncols=True,
               desc=f"train {tc.variant}", unit="step")
    window_t0, window_steps = time.perf_counter(), 0
    step = start_step
    model.train()
    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    for step in range(start_step, end):
        lr = tc.lr * lr_scale(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = step_generator(tc.seed, step)
        indices = batches.indices(step)

        t0 = time.perf_counter()
        items = [dataset[i] for i in indices[d.rank * micro * tc.grad_accum:(d.rank + 1) * micro * tc.grad_accum]]
        global_batch = collate(items) if collate else items
        timers["data"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        video_shape = None
        optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(3, device=device)
        for a in range(tc.grad_accum):
            sl = slice(a * micro, (a + 1) * micro)
            mb = {k: (v[sl] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in global_batch.items()}
            mb["video"] = random_shift(mb["video"], tc.random_shift, step_generator(tc.seed, step, 1 + a))
            inputs = prepare_batch(mb, codec, text_encoder, device)
            if video_shape is None:
                # One draw for the whole global batch; this rank's micro-batch takes its slice.
                video_shape = (tc.batch_size, *inputs["latents"].shape[1:])
                noise = TrainingNoise.draw(variant, video_shape, (tc.batch_size, *inputs["actions"].shape[1:]), gen)
            start = (d.rank * tc.grad_accum + a) * micro
            sync = contextlib.nullcontext() if (a == tc.grad_accum - 1 or d.world == 1) else wrapped.no_sync()
            with sync, autocast():
                out = wrapped(**inputs, variant=variant, noise=_to(noise.slice(start, start + micro), device))
                (out.total / tc.grad_accum).backward()
            totals += torch.stack([out.total.detach(), out.video, out.action]).float() / tc.grad_accum
        if not torch.isfinite(totals).all():
            raise FloatingPointError(
                f"non-finite loss at step {step} (total/video/action = {totals.tolist()}); the last checkpoint in "
                f"{run_dir / 'checkpoints'} is intact — lower the learning rate or check the data, then --resume"
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm.detach(), 1 - tc.ema_decay)
        totals = _mean_across_ranks(totals, d)
        timers["compute"] += time.perf_counter() - t0
        window_steps += 1

        t0 = time.perf_counter()
        done = step + 1
        if d.main and (done % tc.log_every == 0 or done == tc.steps or log_all_steps):
            now = time.perf_counter()
            its = window_steps / max(now - window_t0, 1e-9)
            window_t0, window_steps = now, 0
            entry = {"step": done, "loss": totals[0].item(), "video": totals[1].item(), "action": totals[2].item(),
                     "lr": lr, "grad_norm": float(grad_norm), "it_s": its}
            result.losses.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", video=f"{entry['video']:.4f}",
                            action=f"{entry['action']:.4f}", lr=f"{lr:.1e}")
            if writer is not None:
                for k in ("loss", "video", "action"):
                    writer.add_scalar(f"train/{k}", entry[k], done)
                writer.add_scalar("train/lr", lr, done)
                writer.add_scalar("train/grad_norm", entry["grad_norm"], done)
                writer.add_scalar("perf/it_per_s", its, done)
                writer.add_scalar("perf/samples_per_s", its * tc.batch_size, done)
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
        bar.update(1)
        timers["log"] += time.perf_counter() - t0

        if d.main and val_dataset is not None and tc.val_every and done % tc.val_every == 0:
            t0 = time.perf_counter()
            val = validation_loss(model, val_dataset, codec, text_encoder, variant, device, tc.seed)
            if writer is not None:
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, done)
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": done, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
            timers["validation"] += time.perf_counter() - t0

        if d.main and tc.sample_every and done % tc.sample_every == 0:
            t0 = time.perf_counter()
            write_samples(model, val_dataset or dataset, codec, text_encoder, cfg, run_dir / "samples", done, writer)
            timers["samples"] += time.perf_counter() - t0

        if done % tc.save_every == 0 or done == end:
            t0 = time.perf_counter()
            if d.main:
                result.checkpoint = ckpt_io.save_checkpoint(
                    run_dir, done, cfg, model, norm_stats, optimizer, {"seed": tc.seed}, ema, tc.keep_last
                )
            if d.world > 1:
                dist.barrier()
            timers["checkpoint"] += time.perf_counter() - t0
    bar.close()
    if writer is not None:
        writer.close()
    result.step = max(end, start_step)
    result.timers = timers
    if result.checkpoint is None and d.main:
        with contextlib.suppress(ckpt_io.CheckpointError):
            result.checkpoint = ckpt_io.resolve_checkpoint(run_dir)
    return result


def _to(noise: TrainingNoise, device) -> TrainingNoise:
    values = [None if t is None else t.to(device) for t in (getattr(noise, f.name) for f in dataclasses.fields(noise))]
    return TrainingNoise(*values)


def _wrap(model: FastWAM, tc, d: Dist, device):
    if d.world == 1:
        return model
    if tc.fsdp:
        # FSDP2: shard each block of both experts, then the root (parameters become DTensors).
        from torch.distributed.fsdp import fully_shard

        for block in list(model.video.blocks) + list(model.action.blocks):
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _summary_writer(run_dir: Path, tc):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency, but a bare environment should still train
        return None
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    if tc.wandb:
        import wandb  # optional; not a dependency

        wandb.init(project="fastwam", dir=str(run_dir), sync_tensorboard=True)
    return writer


@torch.no_grad()
def validation_loss(model, dataset, codec, text_encoder, variant, device, seed: int, max_clips: int = 64) -> dict:
    """Loss over a fixed subset of held-out clips with fixed noise (comparable across steps)."""
    was_training = model.training
    model.eval()
    n = min(len(dataset), max_clips)
    collate = getattr(dataset, "collate")
    sums, count = torch.zeros(3), 0
    for start in range(0, n, 16):
        batch = collate([dataset[i] for i in range(start, min(n, start + 16))])
        inputs = prepare_batch(batch, codec, text_encoder, device)
        out = model.loss(**inputs, variant=variant, generator=step_generator(seed, start, 99))
        b = inputs["actions"].shape[0]
        sums += torch.stack([out.total.detach(), out.video, out.action]).float().cpu() * b
        count += b
    model.train(was_training)
    sums /= max(count, 1)
    return {"loss": sums[0].item(), "video": sums[1].item(), "action": sums[2].item()}


@torch.no_grad()
def write_samples(model, dataset, codec, text_encoder, cfg: Config, out_dir: Path, step: int, writer=None) -> Path:
    """Imagined future vs the real clip for one example, as a PNG strip (top: real, bottom: imagined)."""
    import imageio.v3 as iio

    model.eval()
    item = dataset[0]
    batch = dataset.collate([item]) if hasattr(dataset, "collate") else item
    device = next(model.parameters()).device
    inputs = prepare_batch(batch, codec, text_encoder, device)
    video_ctx, _ = model.contexts(inputs["text"], inputs["state"])
    first = inputs["latents"][:, :, :1]
    g = torch.Generator().manual_seed(cfg.train.seed)
    noise = torch.randn(1, first.shape[1], cfg.model.latent_frames - 1, *first.shape[3:], generator=g).to(first)
    from fastwam.model import flow
    from fastwam.model.visibility import MODE_RULES

    mode = get_variant(cfg.train.variant).inference
    latents = model.imagine(first, noise, video_ctx, flow.euler_sigmas(cfg.inference.steps), MODE_RULES[mode])
    imagined = codec.decode(latents)[0]  # [3, F, H, W]
    real = codec.decode(inputs["latents"])[0]
    to_row = lambda v: torch.cat(list(v.unbind(1)), dim=2)  # noqa: E731  [3, H, F*W]
    grid = torch.cat([to_row(real), to_row(imagined)], dim=1)
    img = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{step:07d}.png"
    iio.imwrite(path, img)
    if writer is not None:
        writer.add_image("samples/real_vs_imagined", img, step, dataformats="HWC")
    model.train()
    return path


def _diff(a, b) -> str:
    return ", ".join(f"{f.name}: {getattr(a, f.name)} != {getattr(b, f.name)}"
                     for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name))


# ---------------------------------------------------------------------------------------------------------------------
# CLI


@dataclass
class TrainArgs:
    """Train a Fast-WAM policy. Every config field is an override: `--config.train.lr 3e-4`."""

    config: Config
    dataset: str = ""  # LeRobot dataset directory (overrides --config.data.dataset)
    out: str = "runs/train"  # run directory (checkpoints, tensorboard, metrics.jsonl)
    variant: str = ""  # fast | joint | idm | no_cotrain (overrides --config.train.variant)
    steps: int = 0  # total optimisation steps (overrides --config.train.steps; with --resume, the new total)
    resume: bool = False  # continue the run in --out from its latest checkpoint
    synthetic: bool = False  # train on the built-in synthetic dataset (smoke test; no data needed)
    progress: bool = True


def parse_with_preset(argv: list[str], args_cls, prog: str, default_preset: str = "small_cpu"):
    """`--preset NAME` picks the defaults of `config`; tyro then parses every other option against them."""
    argv = list(argv)
    preset = default_preset
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
            del argv[i : i + 2]
            break
        if a.startswith("--preset="):
            preset = a.split("=", 1)[1]
            del argv[i]
            break
    base = get_preset(preset)
    default = args_cls(config=base)
    return tyro.cli(args_cls, args=argv, default=default, prog=prog,
                    description=f"{args_cls.__doc__} (preset: {preset}; choose with --preset)")


def cli(argv: list[str], prog: str = "fastwam train") -> int:
    args = parse_with_preset(argv, TrainArgs, prog)
    cfg = args.config
    if args.dataset:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, dataset=args.dataset))
    if args.variant:
        get_variant(args.variant)
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, variant=args.variant))
    if args.steps:
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=args.steps))
    dataset = None
    if args.synthetic:
        from fastwam.data.synthetic import SyntheticClips

        dataset = SyntheticClips(cfg.data, num_clips=128)
    elif not cfg.data.dataset:
        print("fastwam train: give --dataset DIR (a LeRobot v3.0 dataset) or --synthetic", file=sys.stderr)
        return 2
    result = train(cfg, args.out, resume=args.resume, dataset=dataset, progress=args.progress)
    if result.losses:
        last = result.losses[-1]
        print(f"step {result.step}: loss {last['loss']:.4f} (video {last['video']:.4f}, action {last['action']:.4f})")
    print(f"checkpoint: {result.checkpoint}")
    return 0
