"""`fastwam <command> [<subcommand>] [options]` — the one CLI.

A thin dispatcher: each command lives next to the code it drives and parses its own options with tyro, so
`fastwam <command> --help` lists every typed option (including `--config.section.field` overrides where a command
takes a config). Modules are imported lazily so `fastwam --help` is instant and optional extras (metaworld,
diffusers) are only needed by the commands that use them.
"""

from __future__ import annotations

import importlib
import sys

# (command words) -> ("module:function", one-line help). The function takes the remaining argv.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("fastwam.demo:cli", "the CPU Meta-World demo end to end: data -> train -> evaluate -> report"),
    ("data", "metaworld"): ("fastwam.data.metaworld:cli",
                            "generate scripted Meta-World demos as a LeRobot v3.0 dataset"),
    ("train",): ("fastwam.train:cli", "train a policy (any preset / variant) on a LeRobot dataset"),
    ("serve",): ("fastwam.serving.server:cli", "serve a checkpoint over the openpi websocket protocol"),
    ("eval", "metaworld"): ("fastwam.eval.metaworld:cli", "closed-loop Meta-World evaluation of a checkpoint"),
    ("eval", "libero"): ("fastwam.eval.libero:cli", "LIBERO evaluation client (talks to `fastwam serve`)"),
    ("ablate",): ("fastwam.ablate:cli", "the four-variant ablation: data, train x4, eval, report"),
    ("bench", "latency"): ("fastwam.bench.latency:cli", "observation -> action latency per inference mode (JSON)"),
    ("bench", "data"): ("fastwam.bench.data:cli", "training data loader throughput (JSON)"),
    ("bench", "train"): ("fastwam.bench.train:cli", "training step rate and overhead share (JSON)"),
    ("bench", "serve"): ("fastwam.bench.serve:cli", "websocket server latency / throughput under N clients (JSON)"),
    ("bench", "memory"): ("fastwam.bench.memory:cli", "peak host RAM while loading a checkpoint (JSON)"),
    ("viz", "masks"): ("fastwam.viz:masks_cli", "draw each variant's attention mask"),
}


def _usage() -> str:
    lines = ["usage: fastwam <command> [options]", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {help_text}")
    lines.append("")
    lines.append("`fastwam <command> --help` lists a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            target, _ = COMMANDS[key]
            module_name, func_name = target.split(":")
            func = getattr(importlib.import_module(module_name), func_name)
            prog = "fastwam " + " ".join(key)
            result = func(argv[n:], prog=prog)
            return int(result or 0)
    if argv and argv[0] not in ("-h", "--help"):
        groups = {words[0] for words in COMMANDS if len(words) > 1}
        hint = f" (`{argv[0]}` needs a subcommand)" if argv[0] in groups else ""
        print(f"fastwam: unknown command {' '.join(argv[:2])!r}{hint}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    print(_usage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
