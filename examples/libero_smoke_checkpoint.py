"""A small random-weight fastwam checkpoint with the `libero_2cam224` interface, to check a LIBERO set-up end to end.

It has the LIBERO layout the paper's model reads (two 224 x 224 cameras `image` and `wrist_image` side by side, an
8-dim state, 7-dim actions in chunks of 32) and a tiny network (pixel codec, hash text encoder), so `fastwam serve`
starts in seconds on a CPU. Its actions are meaningless: it proves the wiring (simulator, client, server, policy),
not a success rate.

    python examples/libero_smoke_checkpoint.py --out runs/libero_smoke
    fastwam serve --checkpoint runs/libero_smoke --port 8000 &
    fastwam eval libero --port 8000 --suites libero_spatial --task-ids 0 --trials 1
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from fastwam import checkpoint as ckpt_io
from fastwam.config import CodecConfig, get_preset
from fastwam.model.fastwam import FastWAM


def smoke_config():
    tiny, libero = get_preset("tiny"), get_preset("libero_2cam224")
    codec = CodecConfig(kind="pixel", space_factor=28)  # 224 / 28 = 8 latent pixels a side per camera
    model = dataclasses.replace(tiny.model, latent_channels=codec.latent_channels(), action_dim=7, state_dim=8,
                                action_horizon=32, latent_frames=3)
    data = dataclasses.replace(libero.data, num_frames=3, action_horizon=32, dataset="")
    return tiny.replace(name="tiny", model=model, codec=codec, data=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/libero_smoke")
    parser.add_argument("--seed", type=int, default=0)
    out = parser.parse_args()
    cfg = smoke_config()
    torch.manual_seed(out.seed)
    model = FastWAM(cfg.model)
    stats = {}  # the identity normaliser: actions and state pass through unchanged
    for role, n in (("action", 7), ("state", 8)):
        stats[role] = {"min": [-1.0] * n, "max": [1.0] * n, "mean": [0.0] * n, "std": [1.0] * n,
                       "q01": [-1.0] * n, "q99": [1.0] * n}
    path = ckpt_io.save_checkpoint(out.out, 0, cfg, model, stats)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
