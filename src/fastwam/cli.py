"""`fastwam <command> [<subcommand>] [options]` — the one CLI.

A thin dispatcher: each command lives next to the code it drives and parses its own options with tyro, so
`fastwam <command> --help` lists every typed option (including `--config.section.field` overrides where a command
takes a config). Modules are imported lazily so `fastwam --help` is instant and optional extras (metaworld,
diffusers) are only needed by the commands that use them.

Errors: a user error (`fastwam.errors.UserError`, which checkpoint and dataset errors are, or any ValueError — the
package's convention for bad input) is printed as one line and exits with code 2, as is an error about a path the
user gave (not found, already exists, not permitted); any other OSError (disk full) is one line with code 1, Ctrl-C one
line with code 130. `FASTWAM_DEBUG=1` or `--debug` adds the traceback.
Anything else is a bug and keeps Python's traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from fastwam import __version__
from fastwam.errors import DEBUG_ENV, INTERRUPTED_EXIT, USER_ERROR_EXIT, debug_enabled

# (command words) -> ("module:function", one-line help). The function takes the remaining argv.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("fastwam.study.demo:cli", "the CPU Meta-World demo end to end: data -> train -> evaluate -> report"),
    ("data", "metaworld"): ("fastwam.data.metaworld:cli",
                            "generate scripted Meta-World demos as a LeRobot v3.0 dataset"),
    ("data", "videos"): ("fastwam.data.videos:cli", "a folder of videos -> an action-free LeRobot v3.0 dataset"),
    ("train",): ("fastwam.train:cli", "train a policy (any preset / variant) on a LeRobot dataset"),
    ("pretrain",): ("fastwam.train:pretrain_cli", "pretrain a video prior (the video expert alone) on video"),
    ("distill",): ("fastwam.train:distill_cli", "a few-step action sampler distilled from a trained run"),
    ("serve",): ("fastwam.serving.serve_cli:main", "serve a checkpoint over the openpi websocket protocol"),
    ("eval", "metaworld"): ("fastwam.eval.metaworld:cli", "closed-loop Meta-World evaluation of a checkpoint"),
    ("eval", "libero"): ("fastwam.eval.libero:cli", "LIBERO evaluation client (talks to `fastwam serve`)"),
    ("ablate",): ("fastwam.study.ablate:cli", "the four-variant ablation: data, train x4, eval, report"),
    ("bench", "latency"): ("fastwam.bench.latency:cli", "observation -> action latency per inference mode (JSON)"),
    ("bench", "data"): ("fastwam.bench.data:cli", "training data loader throughput (JSON)"),
    ("bench", "train"): ("fastwam.bench.train:cli", "training step rate and overhead share (JSON)"),
    ("bench", "realtime"): ("fastwam.bench.realtime:cli", "a robot loop at a control rate, inference beside it (JSON)"),
    ("bench", "serve"): ("fastwam.bench.serve:cli", "websocket server latency / throughput under N clients (JSON)"),
    ("bench", "memory"): ("fastwam.bench.memory:cli", "peak host RAM while loading a checkpoint (JSON)"),
    ("viz", "masks"): ("fastwam.viz:masks_cli", "draw each variant's attention mask"),
    ("import", "official"): ("fastwam.formats.official:cli",
                             "an official Fast-WAM checkpoint (.pt) + dataset stats -> a fastwam run"),
    ("import", "lerobot"): ("fastwam.formats.lerobot_policy:cli",
                            "a Fast-WAM policy in LeRobot's format (local directory) -> a fastwam run"),
}


def _usage() -> str:
    lines = ["usage: fastwam [--version] [--debug] <command> [options]", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {help_text}")
    lines.append("")
    lines.append("`fastwam <command> --help` lists a command's options. Errors are one line; --debug (or")
    lines.append(f"{DEBUG_ENV}=1) shows their traceback.")
    return "\n".join(lines)


_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _run(func, argv: list[str], prog: str, debug: bool) -> int:
    """Run one command; user errors, OS errors and Ctrl-C become one line on stderr (plus the traceback if debug)."""
    try:
        return int(func(argv, prog=prog) or 0)
    except BaseException as e:
        code = _exit_code(e)
        if code is None:  # a bug (or tyro's own exit): Python reports it as usual
            raise
        if debug:
            traceback.print_exc()
        message = "interrupted" if isinstance(e, KeyboardInterrupt) else _one_line(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code


def _exit_code(e: BaseException) -> int | None:
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED_EXIT
    if isinstance(e, (ValueError, *_PATH_ERRORS)):  # UserError & co, the package's input checks, a path the user gave
        return USER_ERROR_EXIT
    if isinstance(e, OSError):  # the machine's side (disk full, connection refused): one line too
        return 1
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"fastwam {__version__}")
        return 0
    debug = "--debug" in argv or debug_enabled()
    if "--debug" in argv:  # accepted anywhere on the line; no command has an option of that name
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"  # subprocesses a command starts (ablate's jobs) report the same way
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            target, _ = COMMANDS[key]
            module_name, func_name = target.split(":")
            func = getattr(importlib.import_module(module_name), func_name)
            return _run(func, argv[n:], "fastwam " + " ".join(key), debug)
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
