"""Contracts of compiled inference: every stage traces as one graph (no breaks), and compiled sampling equals eager."""

import pytest
import torch

from fastwam.model.fastwam import INFERENCE_STAGES, FastWAM


def _model_and_inputs(cfg, b=2):
    torch.manual_seed(0)
    model = FastWAM(cfg.model).eval()
    m, g = cfg.model, torch.Generator().manual_seed(1)
    inputs = dict(
        first_latent=torch.randn(b, m.latent_channels, 1, 4, 4, generator=g),
        text=torch.randn(b, 3, m.text_dim, generator=g),
        state=torch.randn(b, m.state_dim, generator=g),
        action_noise=torch.randn(b, m.action_horizon, m.action_dim, generator=g),
        video_noise=torch.randn(b, m.latent_channels, m.latent_frames - 1, 4, 4, generator=g),
    )
    return model, inputs


def _sample(model, inputs, mode, b=None):
    sliced = {k: v[:b] for k, v in inputs.items()}
    return model.sample(mode=mode, steps=4, return_video=True, **sliced)


@pytest.mark.parametrize("mode", ["fast", "joint", "idm"])
def test_every_stage_compiles_as_one_graph_and_matches_eager(tiny_cfg, mode):
    # Backend "eager" runs dynamo's tracing (fullgraph=True: any graph break or host sync raises) without codegen.
    torch._dynamo.reset()
    model, inputs = _model_and_inputs(tiny_cfg)
    reference = _sample(model, inputs, mode)
    model.compile_inference(backend="eager")
    assert set(model._compiled) == set(INFERENCE_STAGES)
    compiled = _sample(model, inputs, mode)
    assert torch.equal(compiled.actions, reference.actions)
    if mode != "fast":
        assert torch.equal(compiled.video, reference.video)
    # A new batch size recompiles (then with a dynamic batch dimension) and is still right.
    single = _sample(model, inputs, mode, b=1)
    assert (single.actions - reference.actions[:1]).abs().max() <= 1e-5


def test_inductor_fast_sampling_matches_eager(tiny_cfg):
    """The generated kernels (C++ on CPU; Triton + CUDA graphs on GPU) agree with eager to rounding."""
    torch._dynamo.reset()
    model, inputs = _model_and_inputs(tiny_cfg, b=1)
    reference = _sample(model, inputs, "fast")
    model.compile_inference()
    assert model._compile_mode == "default"  # CUDA graphs ("reduce-overhead") only on GPU
    first = _sample(model, inputs, "fast")
    again = _sample(model, inputs, "fast")
    assert (first.actions - reference.actions).abs().max() <= 1e-5
    assert torch.equal(first.actions, again.actions)


def test_sample_outputs_are_not_aliased_to_compiled_buffers(tiny_cfg):
    # Under CUDA graphs a replay overwrites the previous outputs; sample() hands out copies so results stay valid.
    torch._dynamo.reset()
    model, inputs = _model_and_inputs(tiny_cfg, b=1)
    model.compile_inference(backend="eager")
    first = _sample(model, inputs, "idm")
    kept = first.actions.clone(), first.video.clone()
    other = dict(inputs, action_noise=torch.randn_like(inputs["action_noise"]))
    _sample(model, other, "idm")
    assert torch.equal(first.actions, kept[0]) and torch.equal(first.video, kept[1])


def test_each_stage_is_compiled_once_and_replayed_at_every_step(tiny_cfg):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, inputs = _model_and_inputs(tiny_cfg, b=3)
    model.compile_inference(backend="eager")
    counters.clear()
    _sample(model, inputs, "fast", b=1)  # 4 steps
    assert counters["stats"]["unique_graphs"] == 3  # condition, prefill, action step: not one graph per step
    _sample(model, inputs, "fast", b=1)
    assert counters["stats"]["unique_graphs"] == 3  # the second request compiles nothing
    # A second batch size makes the batch dimension dynamic (one more graph per stage); a third compiles nothing.
    _sample(model, inputs, "fast", b=2)
    _sample(model, inputs, "fast", b=3)
    assert counters["stats"]["unique_graphs"] == 6
