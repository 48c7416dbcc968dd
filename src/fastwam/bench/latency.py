"""`fastwam bench latency`: observation -> action-chunk latency per inference mode, as JSON.

Random weights are fine: latency does not depend on the values. What is timed, per call: encoding the first
frame with the preset's codec (pixel / DCT; for the Wan VAE preset the latents are given, as in the paper's
"model forward only" numbers) and the full `FastWAM.sample` (prefill + denoising loop). Text embeddings are cached
per instruction in real use, so they are excluded. CUDA timings synchronise before reading the clock. The modes
are timed round-robin (one call of each per iteration), so that a slow spell of the machine tilts no ratio.

--step-counts 1,2,4,10: the fast path timed at each denoising step count, side by side and round-robin (one call of
each per iteration, so that the machine's slow spells fall on every count alike; `step_counts` in the JSON:
p50 per N, the speed-up over the largest N, and the action-expert calls per chunk, which is N: the FLOPs of the
denoising loop scale with it). --rtc adds each N with real-time-chunking guidance (`model/rtc.py`; one vector-Jacobian
product per step, so a guided step costs about a forward and a backward of the action expert), and with the clean
prefix that a model trained with action_prefix_max continues instead (`fast_rtc_prefix`: no guidance).

--stages: the fast path's parts timed apart (p50 ms of codec encode, conditioning, first-frame prefill, one action
step; eager, round-robin): the fixed cost one-step sampling keeps, and the cost of each step.

--compile: `FastWAM.compile_inference` (CUDA graphs on GPU). The first call per mode (compilation) is reported apart
as `first_call_s`, and each mode's compiled actions are compared with the eager ones (`max_abs_diff_vs_eager`).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from fastwam.config import Config, get_preset
from fastwam.model.encoders import build_codec
from fastwam.model.fastwam import FastWAM
from fastwam.policy import resolve_dtype
from fastwam.presets import PresetName


@dataclass
class LatencyArgs:
    preset: PresetName = "small_cpu"  # config preset to time (ignored with --config-file)
    config_file: str = ""  # time this config instead of the preset: a run's config.json, or an ablation.json
    modes: str = "fast,joint,idm"
    steps: int = 10
    # Also time the fast path at each of these step counts, side by side (e.g. 1,2,4,10); empty = only --steps.
    step_counts: str = ""
    rtc: bool = False  # with --step-counts: also time real-time-chunking guided sampling (delay = a quarter chunk)
    batch: int = 1
    warmup: int = 3
    iters: int = 20
    device: str = "auto"  # auto = cuda if available else cpu
    dtype: str = "auto"  # auto = bf16 on cuda, fp32 on cpu
    threads: int = 0  # CPU threads (0 = torch default)
    # Also time the fast path's parts once each: codec encode, conditioning, first-frame prefill, one action step
    # (`stages` in the JSON: what one-step sampling cannot remove, and what each step adds).
    stages: bool = False
    compile: bool = False  # torch.compile every inference stage (CUDA graphs on GPU); first call excluded, reported
    json: bool = False
    out: str = ""  # also write the JSON report to this file


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    info = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load_config(path: str) -> Config:
    """A Config from a run's config.json, or from the "config" entry of an ablation.json."""
    d = json.loads(Path(path).read_text())
    return Config.from_dict(d["config"] if "config" in d else d)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run(args: LatencyArgs) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = resolve_dtype(args.dtype, device)
    cfg = _load_config(args.config_file) if args.config_file else get_preset(args.preset)
    m = cfg.model
    torch.manual_seed(0)
    with torch.device(device):
        model = FastWAM(m).to(dtype).eval()
    h, w = cfg.data.image_size
    n_cams = max(1, len(cfg.data.cameras) or 2)
    width = w * n_cams if cfg.data.layout == "side_by_side" else w
    codec = build_codec(cfg.codec) if cfg.codec.kind in ("pixel", "dct") else None  # the VAE's latents are given
    s = cfg.codec.spatial_factor()
    frame = torch.rand(args.batch, 3, 1, h, width, device=device, dtype=dtype) * 2 - 1
    latent = torch.randn(args.batch, m.latent_channels, 1, h // s, width // s, device=device, dtype=dtype)
    text = torch.randn(args.batch, cfg.text.max_len, m.text_dim, device=device, dtype=dtype)
    state = torch.randn(args.batch, m.state_dim, device=device, dtype=dtype)
    action_noise = torch.randn(args.batch, m.action_horizon, m.action_dim, device=device, dtype=dtype)
    video_noise = torch.randn(args.batch, m.latent_channels, m.latent_frames - 1, *latent.shape[3:], device=device,
                              dtype=dtype)

    def once(mode: str, steps: int = args.steps, guide=None) -> torch.Tensor:
        first = codec.encode(frame) if codec is not None else latent
        out = model.sample(first, text, state, mode=mode, steps=steps, action_noise=action_noise,
                           video_noise=video_noise, guide=guide)
        return out.actions.float().cpu()  # the caller needs the actions on the host

    def clock(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1000

    def timed_together(fns: dict) -> dict[str, tuple[torch.Tensor, dict]]:
        """Time several calls round-robin (one of each per iteration), so that a slow spell of the machine (another
        process, the clock frequency) lands on all of them alike and their ratios stay fair."""
        first = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            actions = fn()  # the first call compiles (with --compile) and allocates
            first[name] = (actions, time.perf_counter() - t0)
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        times = {name: [] for name in fns}
        for _ in range(args.iters):
            for name, fn in fns.items():
                times[name].append(clock(fn))
        return {name: (first[name][0], {
            "p50_ms": round(statistics.median(ts), 3),
            "p90_ms": round(_percentile(ts, 0.9), 3),
            "mean_ms": round(statistics.fmean(ts), 3),
            "first_call_s": round(first[name][1], 4),  # 0.1 ms resolution: a tiny model's first call takes a few ms
        }) for name, ts in times.items()}

    modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    counts = [int(x) for x in args.step_counts.split(",") if x.strip()]
    if any(n < 1 for n in counts):
        raise SystemExit(f"--step-counts must be positive integers, got {args.step_counts!r}")
    eager_actions = {}
    if args.compile:  # the compiled graphs must give the eager actions (to rounding) before their speed counts
        eager_actions = {mode: once(mode) for mode in modes}
        model.compile_inference()
    results = {}
    # Round-robin over the modes as over the step counts: the speed-up of fast over joint / IDM is a ratio too.
    for mode, (actions, stats) in timed_together({mode: lambda mode=mode: once(mode) for mode in modes}).items():
        results[mode] = stats
        if mode in eager_actions:
            results[mode]["max_abs_diff_vs_eager"] = float((actions - eager_actions[mode]).abs().max())
    sweep = {}
    delay = max(1, m.action_horizon // 4)  # the guided timing's inference delay: a quarter chunk
    if counts:
        from fastwam.model.rtc import ActionGuide, rtc_weights

        h = m.action_horizon
        guide = ActionGuide(torch.randn(args.batch, h, m.action_dim, device=device, dtype=dtype),
                            rtc_weights(h, h // 2 + delay, delay).expand(args.batch, h).to(device, dtype),
                            torch.full((args.batch,), delay, device=device))
        prefix = dataclasses.replace(guide, method="prefix")  # as a model trained with action_prefix_max samples
        fns = {}
        for n in counts:
            fns[(n, "fast")] = lambda n=n: once("fast", n)
            if args.rtc:
                fns[(n, "fast_rtc")] = lambda n=n: once("fast", n, guide)
                fns[(n, "fast_rtc_prefix")] = lambda n=n: once("fast", n, prefix)
        for (n, kind), (_, stats) in timed_together(fns).items():
            sweep.setdefault(str(n), {"action_expert_calls": n})[kind] = stats
        most = str(max(counts))
        for entry in sweep.values():
            entry["speedup_vs_%s_steps" % most] = round(sweep[most]["fast"]["p50_ms"] / entry["fast"]["p50_ms"], 2)
    stages = {}
    if args.stages:
        from fastwam.model import flow
        from fastwam.model.fastwam import MODE_RULES

        rule = MODE_RULES["fast"]
        first = codec.encode(frame) if codec is not None else latent
        video_ctx, action_ctx = model.condition(text, state)
        cache = model.prefill(first, video_ctx, rule)
        layout = cache.action_layout(rule, action_noise.shape[1])
        sigmas = flow.euler_sigmas(args.steps, flow.DEFAULT_SHIFT, device=device)
        parts = {
            "condition": lambda: model.condition(text, state),
            "prefill": lambda: model.prefill(first, video_ctx, rule),
            "action_step": lambda: model.action_step(action_noise, sigmas[0], sigmas[1], cache, action_ctx, rule,
                                                     layout),
        }
        if codec is not None:
            parts = {"codec_encode": lambda: codec.encode(frame), **parts}
        with torch.no_grad():
            stages = {name: stats["p50_ms"] for name, (_, stats) in timed_together(parts).items()}
    report = {
        "benchmark": "latency",
        "preset": cfg.name,
        "config_file": args.config_file or None,
        "steps": args.steps,
        "batch": args.batch,
        "iters": args.iters,
        "compiled": model._compile_mode or False,
        "timed": "codec encode of the first frame + FastWAM.sample" if codec else "FastWAM.sample (VAE excluded)",
        "params": model.num_parameters(),
        "machine": machine_info(device, dtype),
        "modes": results,
    }
    if stages:
        report["stages_p50_ms"] = stages
    if sweep:
        report["step_counts"] = sweep
        report["rtc_delay"] = delay if args.rtc else None
    if "fast" in results:
        report["speedup_vs_fast"] = {
            k: round(v["p50_ms"] / results["fast"]["p50_ms"], 2) for k, v in results.items() if k != "fast"
        }
    return report


def cli(argv: list[str], prog: str = "fastwam bench latency") -> int:
    args = tyro.cli(LatencyArgs, args=argv, prog=prog)
    report = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for mode, r in report["modes"].items():
            print(f"{mode:>6}: p50 {r['p50_ms']:.2f} ms  p90 {r['p90_ms']:.2f} ms")
        for n, r in report.get("step_counts", {}).items():
            rtc = (f"  (rtc p50 {r['fast_rtc']['p50_ms']:.2f} ms guided, {r['fast_rtc_prefix']['p50_ms']:.2f} ms "
                   "prefix)" if "fast_rtc" in r else "")
            print(f"fast, {n:>3} step(s): p50 {r['fast']['p50_ms']:.2f} ms{rtc}")
    return 0
