"""Pictures: the attention mask of every variant (`fastwam viz masks --out docs/`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from fastwam.model.visibility import VARIANTS, Group


@dataclass
class MasksArgs:
    out: str = "docs"
    frames: int = 3  # latent frames in the example sequence
    tokens_per_frame: int = 4
    actions: int = 6


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (headless machines, worker processes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (110 dpi PNG) and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Path(path)


def example_layout(variant_name: str, frames: int, per_frame: int, actions: int):
    """Token groups and first-frame flags of a small example sequence for a variant, plus labelled spans."""
    groups, first, spans = [], [], []
    video_groups = [Group.VIDEO, Group.COND] if variant_name == "idm" else [Group.VIDEO]
    for g in video_groups:
        label = "noisy video" if g is Group.VIDEO and variant_name == "idm" else g.name.lower()
        if g is Group.COND:
            label = "clean video"
        for f in range(frames):
            spans.append((f"{label} f{f}", len(groups), per_frame))
            groups += [int(g)] * per_frame
            first += [f == 0] * per_frame
    spans.append(("action", len(groups), actions))
    groups += [int(Group.ACTION)] * actions
    first += [False] * actions
    return torch.tensor(groups), torch.tensor(first), spans


def draw_masks(out_dir: str | Path, frames: int = 3, per_frame: int = 4, actions: int = 6) -> Path:
    plt = pyplot()

    titles = {
        "fast": "Fast-WAM: actions see only the clean first frame",
        "joint": "Joint: actions see all (noisy) video",
        "idm": "IDM: actions see the clean video copy only",
        "no_cotrain": "w/o video co-training: Fast-WAM mask, no video loss",
    }
    fig, axes = plt.subplots(1, 4, figsize=(22, 6.2))
    for ax, (name, variant) in zip(axes, VARIANTS.items()):
        groups, first, spans = example_layout(name, frames, per_frame, actions)
        mask = variant.rule.mask(groups, first, groups, first).float().numpy()
        ax.imshow(mask, cmap="Greens", vmin=-0.15, vmax=1.15, interpolation="nearest")
        ticks = [start + n / 2 - 0.5 for _, start, n in spans]
        labels = [label for label, _, _ in spans]
        ax.set_xticks(ticks, labels, rotation=90, fontsize=8)
        ax.set_yticks(ticks, labels, fontsize=8)
        for _, start, _ in spans[1:]:
            ax.axhline(start - 0.5, color="grey", lw=0.6)
            ax.axvline(start - 0.5, color="grey", lw=0.6)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        ax.set_title(f"{name}\n{titles[name]}", fontsize=10)
    fig.suptitle("Attention visibility per variant (green = may attend; rows = queries)", fontsize=12)
    fig.tight_layout()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "masks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def masks_cli(argv: list[str], prog: str = "fastwam viz masks") -> int:
    args = tyro.cli(MasksArgs, args=argv, prog=prog)
    path = draw_masks(args.out, args.frames, args.tokens_per_frame, args.actions)
    print(f"wrote {path}")
    return 0
