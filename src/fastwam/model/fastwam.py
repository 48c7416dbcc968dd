"""FastWAM: a video expert and an action expert sharing one masked attention per layer.

Read top to bottom: construction, conditioning, the training loss (one function for every variant), and sampling
(fast / joint / idm). Latents and text states come in already encoded: the frozen codec and text encoder live
outside the trainable model (`codecs.py`, `text.py`) and are never part of its state dict.

Shapes: latents [B, C, F, H, W] (frame 0 = the observation), actions [B, Ha, A] (normalised), state [B, S]
(normalised), text [B, L, text_dim], labelled [B] (False: an action-free clip, whose actions and state are
placeholders that never reach the loss).

A model built with `ModelConfig.action_expert = False` is a video prior: the video expert alone, trained by
`fastwam pretrain` with the "video" objective; `fastwam train --init-from` starts a policy from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from fastwam.config import ModelConfig
from fastwam.model import flow
from fastwam.model.experts import ActionExpert, VideoExpert
from fastwam.model.mot import KVCache, Part, Stream, parts_layout, run_layers
from fastwam.model.rtc import ActionGuide
from fastwam.model.visibility import MODE_RULES, Group, Rel, Variant, VisibilityRule

# The methods `sample` runs through `_stage`: what `compile_inference` compiles.
INFERENCE_STAGES = ("condition", "prefill_kv", "action_step", "joint_step", "imagine_step")


@dataclass
class TrainingNoise:
    """Every random draw of one training step, so a global batch's draw can be sliced across ranks."""

    sigma_v: torch.Tensor  # [B]
    sigma_a: torch.Tensor  # [B]
    noise_v: torch.Tensor  # like latents
    noise_a: torch.Tensor  # like actions
    sigma_c: torch.Tensor | None = None  # [B] IDM conditioning-video noise level (0 = clean)
    noise_c: torch.Tensor | None = None
    prefix_a: torch.Tensor | None = None  # [B] leading actions given clean (train.action_prefix_max; None = none)

    @classmethod
    def draw(cls, variant: Variant, latents_shape, actions_shape, generator=None, device=None, dtype=None,
             action_prefix_max: int = 0):
        b = latents_shape[0]
        randn = lambda shape: torch.randn(*shape, generator=generator, device=device, dtype=dtype)  # noqa: E731
        sigma_v = flow.sample_sigma(b, generator, device)
        sigma_a = flow.sample_sigma(b, generator, device)
        out = cls(sigma_v, sigma_a, randn(latents_shape), randn(actions_shape))
        if variant.rule.relation(Group.ACTION, Group.COND) is not Rel.NONE:
            noised = torch.rand(b, generator=generator, device=device) < variant.cond_noise_prob
            out.sigma_c = torch.where(noised, flow.sample_sigma(b, generator, device), torch.zeros_like(sigma_v))
            out.noise_c = randn(latents_shape)
        if action_prefix_max > 0:  # drawn last: without it every other draw is what it always was
            out.prefix_a = torch.randint(0, action_prefix_max + 1, (b,), generator=generator, device=device)
        return out

    def slice(self, start: int, end: int) -> TrainingNoise:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return TrainingNoise(*(None if t is None else t[start:end] for t in values))


@dataclass
class TrainingForward:
    """What one training forward predicts, and its targets (velocity = noise - data)."""

    action_velocity: torch.Tensor | None  # [B, Ha, A]; None when the action stream did not run
    action_target: torch.Tensor | None
    video_velocity: torch.Tensor | None = None  # [B, C, F, H, W], every frame (frame 0 is not trained)
    video_target: torch.Tensor | None = None


@dataclass
class LossOutput:
    total: torch.Tensor
    video: torch.Tensor  # the video flow loss before the variant's loss weight (0 when not computed)
    action: torch.Tensor


@dataclass
class SampleOutput:
    actions: torch.Tensor  # [B, Ha, A], normalised
    video: torch.Tensor | None = None  # [B, C, F, H, W] imagined latents (joint / idm)


class FastWAM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.video = VideoExpert(cfg)
        # A video prior has neither an action expert nor a state (its context's state token is zero, as for an
        # action-free clip): see `contexts`.
        self.action = ActionExpert(cfg) if cfg.action_expert else None
        # Proprioception: one extra token on the text context, read by both experts' cross-attention.
        self.state_proj = nn.Linear(cfg.state_dim, cfg.text_dim) if cfg.action_expert else None
        self.grad_checkpointing = False
        self._compiled: dict = {}  # inference stage name -> torch.compile'd method (see `compile_inference`)
        self._compile_mode = ""

    # -----------------------------------------------------------------------------------------------------------------
    # Conditioning

    def contexts(self, text: torch.Tensor, state: torch.Tensor | None, labelled: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text states + the state token, projected by each expert's text embedder (the action context is None for a
        video prior).

        A clip without a state (a video prior's, or an action-free clip, `labelled` False) gets a zero state token:
        the value the text encoder gives padding, so the context keeps its length and the video expert sees the same
        kind of context in pretraining, in co-training and in the policy.
        """
        raw = torch.cat([text, self._state_token(text, state, labelled)], dim=1)
        action_ctx = self.action.condition_embedder.text(raw) if self.action is not None else None
        return self.video.condition_embedder.text(raw), action_ctx

    def _state_token(self, text: torch.Tensor, state: torch.Tensor | None, labelled: torch.Tensor | None):
        if state is None or self.state_proj is None or (labelled is not None and not bool(labelled.any())):
            # Not computed at all (rather than multiplied by 0): the state projection then gets no gradient, so an
            # optimiser step leaves it exactly as it was.
            return text.new_zeros(text.shape[0], 1, text.shape[2])
        state = state.to(text.dtype)
        if labelled is None:
            return self.state_proj(state)[:, None]
        keep = labelled.to(torch.bool)
        # Placeholders are zeroed before the projection: a NaN there would otherwise reach its weight gradient.
        token = self.state_proj(torch.where(keep[:, None], state, torch.zeros_like(state)))[:, None]
        return torch.where(keep[:, None, None], token, torch.zeros_like(token))

    def _run(self, streams: list[Stream], rule: VisibilityRule, **kwargs) -> list[torch.Tensor]:
        return run_layers(streams, rule, grad_checkpointing=self.grad_checkpointing and self.training, **kwargs)

    # -----------------------------------------------------------------------------------------------------------------
    # Training

    def loss(
        self,
        latents: torch.Tensor,
        actions: torch.Tensor,
        state: torch.Tensor,
        text: torch.Tensor,
        variant: Variant,
        latent_mask: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: TrainingNoise | None = None,
        labelled: torch.Tensor | None = None,
        run_actions: bool | None = None,
    ) -> LossOutput:
        """Joint flow-matching loss. Video and action noise levels are drawn independently.

        latent_mask [B, F] / action_mask [B, Ha]: False marks padding past the episode end (excluded from the loss).
        noise: explicit noise (e.g. the rank's slice of a global batch's draw); else drawn from `generator`.
        labelled [B]: False marks an action-free clip: it adds to the video loss only; the action loss is the mean over
        the labelled clips (their actions and state are never read into the loss, whatever placeholder they hold).
        run_actions: whether to run the action stream at all (default: when the objective trains actions and some
        clip is labelled). A trainer sets it from the whole global batch, so that every rank runs the same modules.

        The official reduction: video = squared error averaged over (C, H, W) of each latent frame 1.., then over the
        sample's valid frames; action = averaged over A, then over the valid steps; each sample times its own noise-
        level weight w(sigma); then the batch mean (so a sample counts the same however much of it is padding).
        """
        if run_actions is None:
            run_actions = variant.action_loss_weight > 0 and (labelled is None or bool(labelled.any()))
        if noise is None:
            a_shape = actions.shape if actions is not None else (latents.shape[0], 1, 1)
            noise = TrainingNoise.draw(variant, latents.shape, a_shape, generator, latents.device, latents.dtype)
        fwd = self.training_forward(latents, actions, state, text, variant, noise, labelled, run_actions)
        loss_a = torch.zeros((), device=latents.device)
        if fwd.action_velocity is not None:
            err_a = (fwd.action_velocity.float() - fwd.action_target.float()).pow(2).mean(-1)  # [B, Ha]
            mask_a = torch.ones_like(err_a) if action_mask is None else action_mask.to(err_a.dtype)
            if noise.prefix_a is not None:  # the given (clean) leading actions are inputs, not predictions
                mask_a = mask_a * ~prefix_mask(noise.prefix_a, err_a.shape[1])
            loss_a = _weighted_sample_mean(err_a, mask_a, flow.loss_weight(noise.sigma_a), labelled)

        loss_v = torch.zeros((), device=latents.device)
        if fwd.video_velocity is not None and variant.video_loss_weight > 0:
            err_v = (fwd.video_velocity.float() - fwd.video_target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
            mask_v = torch.ones_like(err_v)
            if latent_mask is not None:
                mask_v = latent_mask[:, : err_v.shape[1]].to(err_v.dtype)
            # Frame 0 is the clean observation: never part of the video loss.
            loss_v = _weighted_sample_mean(err_v[:, 1:], mask_v[:, 1:], flow.loss_weight(noise.sigma_v))

        total = variant.video_loss_weight * loss_v
        if fwd.action_velocity is not None:
            total = total + variant.action_loss_weight * loss_a
        return LossOutput(total=total, video=loss_v.detach(), action=loss_a.detach())

    def training_forward(
        self, latents, actions, state, text, variant: Variant, noise: TrainingNoise,
        labelled: torch.Tensor | None = None, run_actions: bool = True,
    ) -> TrainingForward:
        """One training forward: noise both modalities, run the variant's masked MoT, predict both velocities.

        Without run_actions (a video prior, or a batch of action-free clips only) there are no action tokens at all:
        video never attends to actions, so the video prediction is the same, and the action expert gets no gradient.
        """
        if run_actions and self.action is None:
            raise ValueError("this model is a video prior (no action expert): train it with the 'video' objective")
        sigma_v, sigma_a, noise_a = noise.sigma_v, noise.sigma_a, noise.noise_a
        video_ctx, action_ctx = self.contexts(text, state if run_actions else None, labelled)

        # Without a video objective and with actions blind to future video (fast mask), the future frames cannot
        # influence anything that is trained: feed only the clean first frame (identical loss, far less compute).
        want_video = variant.video_loss_weight > 0
        actions_see_future = variant.rule.relation(Group.ACTION, Group.VIDEO) is Rel.ALL
        video_in = latents if (want_video or actions_see_future) else latents[:, :, :1]

        noise_v = noise.noise_v[:, :, : video_in.shape[2]]
        noisy_v = flow.add_noise(video_in, noise_v, sigma_v)
        noisy_v[:, :, :1] = video_in[:, :, :1]  # the observation stays clean (t = 0)
        streams = [self.video.to_stream(noisy_v, self.video.token_timesteps(noisy_v, sigma_v), video_ctx)]

        if run_actions and variant.rule.relation(Group.ACTION, Group.COND) is not Rel.NONE:
            # IDM: a clean copy of the video conditions the actions; noised with probability cond_noise_prob.
            cond = flow.add_noise(latents, noise.noise_c, noise.sigma_c)
            cond[:, :, :1] = latents[:, :, :1]
            cond_t = self.video.token_timesteps(cond, noise.sigma_c)
            streams.append(self.video.to_stream(cond, cond_t, video_ctx, Group.COND))

        if run_actions:
            if labelled is not None:  # an action-free clip's placeholder actions never enter the model
                keep = labelled.to(torch.bool)[:, None, None]
                actions = torch.where(keep, actions, torch.zeros_like(actions))
            noisy_a = flow.add_noise(actions, noise_a, sigma_a)
            timestep_a = 1000.0 * sigma_a
            if noise.prefix_a is not None:  # training-time action conditioning: the prefix clean, at t = 0
                clean = prefix_mask(noise.prefix_a, actions.shape[1])
                noisy_a = torch.where(clean[..., None], actions, noisy_a)
                timestep_a = torch.where(clean, 0.0, timestep_a[:, None])
            streams.append(self.action.to_stream(noisy_a, timestep_a, action_ctx))
        outs = self._run(streams, variant.rule)
        out = TrainingForward(None, None)
        if run_actions:
            out = TrainingForward(self.action.head(outs[-1]), flow.velocity_target(actions, noise_a))
        if want_video:
            pred_v = self.video.head(outs[0], streams[0].temb)
            out.video_velocity = self.video.unpatchify(pred_v, self.video.grid(video_in))
            out.video_target = flow.velocity_target(video_in, noise_v)
        return out

    def forward(self, *args, **kwargs) -> LossOutput:
        """The training loss (DDP / FSDP hook into `forward`)."""
        return self.loss(*args, **kwargs)

    def distill_loss(self, text: torch.Tensor, state: torch.Tensor, states: torch.Tensor, sigmas: torch.Tensor,
                     cache: KVCache) -> torch.Tensor:
        """Few-step distillation of the fast sampler (`training/distill.py`): this model is the student.

        states [N + 1, B, Ha, A]: a teacher's fast-mode trajectory at the student's noise levels sigmas [N + 1] (1 to
        0); cache: the frame-0 prefix K/V (video expert, frozen, shared with the teacher). Returns the mean over the N
        segments of the MSE between this model's action velocity at (x_k, sigma_k) and the slope
        (x_{k+1} - x_k) / (sigma_{k+1} - sigma_k): one Euler step of the student lands where the teacher's sub-steps
        landed. Only the action expert is in the graph (the state token comes from the frozen state projection).
        """
        rule = MODE_RULES["fast"]
        action_ctx = self.action.cross_kv(self.contexts(text, state)[1])
        layout = cache.action_layout(rule, states.shape[2])
        losses = []
        for k in range(states.shape[0] - 1):
            target = (states[k + 1] - states[k]) / (sigmas[k + 1] - sigmas[k])
            velocity = self.action_velocity(states[k], sigmas[k], cache, action_ctx, rule, layout)
            losses.append((velocity.float() - target.float()).pow(2).mean())
        return torch.stack(losses).mean()

    # -----------------------------------------------------------------------------------------------------------------
    # Inference
    #
    # `sample` strings together a few stages: condition, prefill, and the denoising steps. Each takes and returns
    # tensors of fixed shapes, gets its attention layout prebuilt (building one reads the device back) and its noise
    # levels as 0-d tensors, so `compile_inference` can capture each stage as one graph, compiled once and replayed at
    # every step, with no graph break and no host synchronisation.

    def condition(self, text: torch.Tensor, state: torch.Tensor) -> tuple[list, list]:
        """Both experts' per-layer cross-attention K/V of the text + state context. The context is the same at every
        denoising step, so it is projected once per sample (129 context tokens at full scale, 128 umT5 tokens + the
        state token, against 32 action tokens: the dominant cost otherwise)."""
        video_ctx, action_ctx = self.contexts(text, state)
        return self.video.cross_kv(video_ctx), self.action.cross_kv(action_ctx)

    def video_part(self, latents: torch.Tensor, group: Group = Group.VIDEO) -> Part:
        """The layout description of a video stream: (group, tokens, tokens of latent frame 0)."""
        f, h, w = self.video.grid(latents)
        return group, f * h * w, h * w

    def prefill(self, video: torch.Tensor, video_ctx, rule: VisibilityRule, group=Group.VIDEO) -> KVCache:
        """Run clean video latents (t = 0) through the video expert once, recording every layer's K/V."""
        parts = [self.video_part(video, group)]
        layout = parts_layout(rule, parts, video.device)
        keys, values = self._stage("prefill_kv")(video, video_ctx, rule, group, layout)
        return KVCache(list(keys), list(values), parts=tuple(parts))

    def prefill_kv(self, video: torch.Tensor, video_ctx, rule: VisibilityRule, group: Group, layout) -> tuple:
        record = KVCache()
        timestep = torch.zeros(video.shape[0], 1, device=video.device)
        stream = self.video.to_stream(video, timestep, video_ctx, group)
        self._run([stream], rule, record=record, need_output=False, layout=layout)
        return record.keys, record.values

    def action_velocity(
        self, x: torch.Tensor, sigma, cache: KVCache, action_ctx, rule: VisibilityRule, layout=None, clean=None
    ) -> torch.Tensor:
        """The action expert alone, attending to the cached prefix: velocity [B, Ha, A]. sigma: float or 0-d.
        clean [B, Ha]: actions given clean (timestep 0) to a model trained with action_prefix_max."""
        timestep = torch.as_tensor(1000.0 * sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        if clean is not None:
            timestep = torch.where(clean, 0.0, timestep[:, None])
        stream = self.action.to_stream(x, timestep, action_ctx)
        (out,) = self._run([stream], rule, cache=cache, layout=layout)
        return self.action.head(out)

    def action_step(self, x_a, sigma, sigma_next, cache: KVCache, action_ctx, rule, layout) -> torch.Tensor:
        """One Euler step of the action expert alone against a cached prefix (fast / idm): the per-request loop."""
        velocity = self.action_velocity(x_a, sigma, cache, action_ctx, rule, layout)
        return flow.euler_step(x_a, velocity, sigma, sigma_next)

    def joint_step(self, x_v, x_a, sigma, sigma_next, video_ctx, action_ctx, rule, layout):
        """One Euler step of future video and actions together (joint: actions see the noisy video, no cache)."""
        v_v, v_a = self.velocities(x_v, x_a, sigma.expand(x_v.shape[0]), video_ctx, action_ctx, rule, layout)
        return _future_euler_step(x_v, v_v, sigma, sigma_next), flow.euler_step(x_a, v_a, sigma, sigma_next)

    def imagine_step(self, x_v, sigma, sigma_next, video_ctx, rule, layout) -> torch.Tensor:
        """One Euler step of future video by the video expert alone (the first frame stays as observed)."""
        (v_v,) = self.velocities(x_v, None, sigma.expand(x_v.shape[0]), video_ctx, None, rule, layout)
        return _future_euler_step(x_v, v_v, sigma, sigma_next)

    def imagine(self, first_latent: torch.Tensor, video_noise: torch.Tensor, video_ctx, sigmas, rule) -> torch.Tensor:
        """Denoise future video latents with the video expert alone (actions are invisible to video)."""
        x_v = torch.cat([first_latent, video_noise.to(first_latent.dtype)], dim=2)
        layout = parts_layout(rule, [self.video_part(x_v)], x_v.device)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=x_v.device)
        for i in range(len(sigmas) - 1):
            x_v = self._stage("imagine_step")(x_v, sigmas[i], sigmas[i + 1], video_ctx, rule, layout)
        return x_v

    @torch.no_grad()
    def sample(
        self,
        first_latent: torch.Tensor,
        text: torch.Tensor,
        state: torch.Tensor,
        mode: str = "fast",
        steps: int = 10,
        shift: float = flow.DEFAULT_SHIFT,
        action_noise: torch.Tensor | None = None,
        video_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_video: bool = False,
        guide: ActionGuide | None = None,
    ) -> SampleOutput:
        """Denoise an action chunk from the first latent frame [B, C, 1, H, W].

        fast:  prefill the first frame once (K/V cached), then `steps` Euler steps of the action expert alone.
        joint: denoise future video and actions together (JOINT mask; nothing can be cached).
        idm:   denoise the future video alone, prefill the cache with it (clean), then the action steps.
        Noise may be given explicitly (per-sample determinism across batch sizes); otherwise drawn from `generator`.
        guide: real-time chunking (`model/rtc.py`): continue a previous chunk. fast / idm only (the guidance runs
        through the action expert against the cached prefix); a guide with no weight leaves sampling unchanged.
        """
        if mode not in MODE_RULES:
            raise ValueError(f"unknown inference mode {mode!r}; choose from {', '.join(MODE_RULES)}")
        if first_latent.dim() != 5 or first_latent.shape[2] != 1:
            raise ValueError(f"first_latent must be [B, C, 1, H, W], got {tuple(first_latent.shape)}")
        b, c, _, h, w = first_latent.shape
        device, dtype = first_latent.device, first_latent.dtype
        rule = MODE_RULES[mode]
        if guide is not None and not guide.active:
            guide = None
        if guide is not None and mode == "joint":
            raise ValueError("real-time chunking guides the action expert against a cached prefix (fast / idm); "
                             "joint mode denoises video and actions together")
        if action_noise is None:
            action_noise = torch.randn(
                b, self.cfg.action_horizon, self.cfg.action_dim, generator=generator, device=device, dtype=dtype
            )
        if mode != "fast" and video_noise is None:
            shape = (b, c, self.cfg.latent_frames - 1, h, w)
            video_noise = torch.randn(*shape, generator=generator, device=device, dtype=dtype)
        sigmas = flow.euler_sigmas(steps, shift, device=device)  # 0-d tensor inputs of the compiled steps
        if self._compiled and self._compile_mode == "reduce-overhead" and device.type == "cuda":
            # One CUDA-graph generation per sample: outputs of the earlier stages (context and prefix K/V) stay
            # valid while the later stages read them. (Once called, generations advance only on this call.)
            torch.compiler.cudagraph_mark_step_begin()
        video_ctx, action_ctx = self._stage("condition")(text, state)
        x_a = action_noise.to(dtype)
        video = None

        if mode == "joint":
            video = torch.cat([first_latent, video_noise.to(dtype)], dim=2)
            layout = parts_layout(rule, [self.video_part(video), (Group.ACTION, x_a.shape[1], 0)], device)
            for i in range(steps):
                video, x_a = self._stage("joint_step")(
                    video, x_a, sigmas[i], sigmas[i + 1], video_ctx, action_ctx, rule, layout
                )
        else:
            if mode == "fast":
                cache = self.prefill(first_latent, video_ctx, rule)
            else:  # idm
                video = self.imagine(first_latent, video_noise, video_ctx, sigmas, rule)
                cache = self.prefill(video, video_ctx, rule, group=Group.COND)
            layout = cache.action_layout(rule, x_a.shape[1])  # built once per shape, outside the loop
            if guide is None:
                for i in range(steps):
                    x_a = self._stage("action_step")(x_a, sigmas[i], sigmas[i + 1], cache, action_ctx, rule, layout)
            elif guide.method == "prefix":  # the executing actions given clean: no guidance, no extra cost
                guide = guide.to(device, dtype)
                clean = prefix_mask(guide.delay, x_a.shape[1])
                for i in range(steps):
                    x_a = guide.pin(x_a)
                    velocity = self.action_velocity(x_a, sigmas[i], cache, action_ctx, rule, layout, clean=clean)
                    x_a = flow.euler_step(x_a, velocity, sigmas[i], sigmas[i + 1])
                x_a = guide.pin(x_a)
            else:  # eager: each step differentiates the action expert once (a vector-Jacobian product)
                guide = guide.to(device, dtype)
                for i in range(steps):
                    sigma = sigmas[i]
                    velocity = guide.guided_velocity(
                        lambda x, s=sigma: self.action_velocity(x, s, cache, action_ctx, rule, layout), x_a,
                        float(sigma), float(sigmas[i + 1]))
                    x_a = flow.euler_step(x_a, velocity, sigma, sigmas[i + 1])
                x_a = guide.pin(x_a)
        if self._compiled:  # a CUDA graph's outputs live in buffers that the next replay overwrites
            x_a, video = x_a.clone(), None if video is None else video.clone()
        return SampleOutput(actions=x_a, video=video if return_video else None)

    def velocities(
        self, x_v, x_a, sigma, video_ctx, action_ctx, rule: VisibilityRule, layout=None
    ) -> list[torch.Tensor]:
        """One full forward over [video | action] (either may be None) at noise level sigma [B] -> velocities.

        Video frame 0 is treated as clean (t = 0). Video velocities come back as latents [B, C, F, H, W].
        """
        streams = []
        if x_v is not None:
            streams.append(self.video.to_stream(x_v, self.video.token_timesteps(x_v, sigma), video_ctx))
        if x_a is not None:
            streams.append(self.action.to_stream(x_a, 1000.0 * sigma, action_ctx))
        outs = self._run(streams, rule, layout=layout)
        result = []
        for stream, out in zip(streams, outs):
            v = stream.expert.head(out, stream.temb)
            result.append(self.video.unpatchify(v, self.video.grid(x_v)) if stream.group == Group.VIDEO else v)
        return result

    # -----------------------------------------------------------------------------------------------------------------
    # Compilation

    def compile_inference(self, mode: str | None = None, backend: str = "inductor") -> None:
        """`torch.compile` every inference stage (condition, prefill, one denoising step of each kind).

        One graph per stage (fullgraph=True: a graph break raises instead of silently running piecewise); a step is
        compiled once and replayed at every denoising step, since the noise levels are tensor inputs. mode defaults to
        "reduce-overhead" on CUDA, which replays the graphs as CUDA graphs: no per-kernel launch cost, which is what
        dominates a batch-1 action loop of small matmuls. The first call compiles (slow); a second batch size compiles
        once more with the batch dimension dynamic (dynamo's automatic dynamic shapes), which then serves every batch
        size (CUDA graphs are still recorded per size, which is cheap). Training is unaffected.
        """
        if mode is None:
            mode = "reduce-overhead" if next(self.parameters()).is_cuda else "default"
        # Each (stage, rule, prefix shape, batch specialisation) is one compiled variant; three modes and two batch
        # graphs each come close to dynamo's default limit of 8 per function.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compile_mode = mode
        self._compiled = {
            name: torch.compile(getattr(self, name), fullgraph=True, dynamic=None, mode=mode, backend=backend)
            for name in INFERENCE_STAGES
        }

    def _stage(self, name: str):
        return self._compiled.get(name) or getattr(self, name)

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "video_expert": count(self.video),
            "action_expert": count(self.action),
            "state_proj": count(self.state_proj),
            "total": count(self),
        }


def prefix_mask(prefix: torch.Tensor, horizon: int) -> torch.Tensor:
    """[B] counts of leading actions -> [B, horizon] bool, True on each row's first `prefix[b]` actions."""
    return torch.arange(horizon, device=prefix.device)[None, :] < prefix[:, None]


def _future_euler_step(x_v: torch.Tensor, v_v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Euler step of video latents [B, C, F, H, W] on the future frames only: frame 0 is the observation."""
    return torch.cat([x_v[:, :, :1], flow.euler_step(x_v[:, :, 1:], v_v[:, :, 1:], sigma, sigma_next)], dim=2)


def _weighted_sample_mean(err: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                          samples: torch.Tensor | None = None) -> torch.Tensor:
    """err [B, N] averaged over each sample's unmasked elements, times the sample's weight [B], averaged over the
    batch. (Video tokens: every latent frame has the same number of tokens, so this is the official mean over a
    frame's (C, H, W) followed by the mean over the sample's valid frames.)

    samples [B] (bool): average over these samples only (the others are selected out, not multiplied by zero, so
    whatever they hold, even NaN, cannot reach the loss or its gradient)."""
    per_sample = (err * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    weighted = per_sample * weight.to(per_sample.dtype)
    if samples is None:
        return weighted.mean()
    keep = samples.to(torch.bool)
    return weighted[keep].sum() / keep.sum().clamp_min(1).to(weighted.dtype)


