"""The parts of `fastwam train` (the command and `train()` itself live in `fastwam.train`).

steps.py        what optimisation step s sees: its clips, noise, augmentation and learning rate (functions of seed, s)
distributed.py  single process / torchrun DDP / FSDP2
runs.py         run directories: a new run vs a resumed one, the settings check, metrics.jsonl, Ctrl-C
monitor.py      validation loss, sample images, TensorBoard
"""
