"""Choosing a config on the command line: `--preset NAME` picks the defaults, `--config.section.field` overrides them.

`--preset` is read before tyro parses (the preset decides every other option's default) and is also a real option of
each command that takes a config (`PresetArgs`), so `--help` lists it with its choices. `--config.name` is only the
config's label: a value other than the preset is refused, because it would look like a preset switch while changing
nothing else (and `fastwam ablate` re-derives each job's overrides from the preset of that name).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from fastwam.config import get_preset
from fastwam.errors import UserError

PresetName = Literal["tiny", "small_cpu", "libero_2cam224"]  # the keys of config.PRESETS (a test keeps them equal)


@dataclass(kw_only=True)
class PresetArgs:
    """Base of a command's arguments that take a config: adds `--preset` (listed first in `--help`)."""

    preset: PresetName = "small_cpu"  # config preset: the defaults that every --config.* option overrides


def parse_with_preset(argv: list[str], args_cls: type[PresetArgs], prog: str):
    """Parse `argv` into `args_cls` (a PresetArgs dataclass with a `config` field) on top of the chosen preset."""
    if not issubclass(args_cls, PresetArgs) or "config" not in {f.name for f in fields(args_cls)}:
        raise TypeError(f"{args_cls.__name__} must be a PresetArgs dataclass with a `config` field")
    import tyro

    preset = args_cls.preset  # the command's default preset (a subclass may choose another)
    for i, a in enumerate(argv):
        if a == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif a.startswith("--preset="):
            preset = a.split("=", 1)[1]
    default = args_cls(config=get_preset(preset), preset=preset)  # an unknown name: one line listing the presets
    args = tyro.cli(args_cls, args=list(argv), default=default, prog=prog,
                    description=f"{args_cls.__doc__} The defaults shown are preset {preset}'s.")
    if args.config.name != preset:
        raise UserError(f"--config.name {args.config.name!r} only relabels the config, it does not switch presets; "
                        f"choose the preset with --preset (one of {', '.join(PresetName.__args__)}) and drop "
                        "--config.name")
    return args
