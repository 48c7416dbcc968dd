"""What a run reports besides its checkpoints: held-out loss, imagined-future images, TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path

import torch

from fastwam.config import Config
from fastwam.model.visibility import get_variant
from fastwam.training.steps import prepare_batch, step_generator


def summary_writer(run_dir: Path, wandb: bool, purge_step: int):
    """TensorBoard writer; events of steps >= purge_step left by an earlier attempt are dropped (as metrics.jsonl's)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency, but a bare environment should still train
        return None
    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
    if wandb:
        import wandb as wandb_lib  # optional; not a dependency

        wandb_lib.init(project="fastwam", dir=str(run_dir), sync_tensorboard=True)
    return writer


def write_scalars(writer, entry: dict, batch_size: int) -> None:
    """One logged training step's entry (metrics.jsonl's keys) as TensorBoard scalars."""
    if writer is None:
        return
    step = entry["step"]
    for k in ("loss", "video", "action", "lr", "grad_norm"):
        writer.add_scalar(f"train/{k}", entry[k], step)
    writer.add_scalar("perf/it_per_s", entry["it_s"], step)
    writer.add_scalar("perf/samples_per_s", entry["it_s"] * batch_size, step)


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
        b = inputs["latents"].shape[0]
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
