"""Reference fixtures for the Rust SD3Transformer2DModel (crates/adm-models/src/mmdit.rs),
the `sd3` group of scripts/make_fixtures.py.

Builds tiny random SD3 / SD3.5 MMDiTs with diffusers, perturbs every parameter and the saved
position-embedding buffer (so norms, biases and the position table are not what a fresh
model would compute), runs them in float64 on fixed inputs and writes, per model, under
crates/adm-models/tests/fixtures/mmdit/<name>/:

  config.json                          diffusers' config
  diffusion_pytorch_model.safetensors  the weights, float32 (the float64 reference runs on
                                       exactly these values, widened)
  inputs.safetensors                   hidden_states, timestep (per sample),
                                       encoder_hidden_states, pooled_projections (float32)
  outputs.safetensors                  sample (float64) and the image tokens after each
                                       transformer block as maps (B, C, H/p, W/p), named
                                       transformer_blocks.{i} (float64, forward hooks)

Models:
  sd3_tiny          SD3-Medium-like: 3 joint blocks, the last context_pre_only.
  sd35_large_tiny   SD3.5-Large-like: qk_norm = rms_norm.
  sd35_medium_tiny  SD3.5-Medium-like (MMDiT-X): dual_attention_layers = (0,), qk_norm, a
                    non-square 16x12 input (the position crop is off-centre in width).

and sd3_tiny_sampling (run after sd3_tiny, whose weights it reads): an 8-step
FlowMatchEulerDiscreteScheduler run (shift 3.0) with classifier-free guidance, float64.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "mmdit"

BASE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    out_channels=4,
    pos_embed_max_size=10,
)

MODELS = {
    "sd3_tiny": dict(config=BASE, hw=(16, 16)),
    "sd35_large_tiny": dict(config=dict(BASE, qk_norm="rms_norm"), hw=(16, 16)),
    "sd35_medium_tiny": dict(
        config=dict(BASE, num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0,)),
        hw=(16, 12),
    ),
}

CONTEXT_LEN = 5
TIMESTEPS = [937.5, 42.25]


def make(name, spec, seed):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**spec["config"]).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        # The saved buffer, not a recomputed sin-cos table, must be what the Rust side uses.
        model.pos_embed.pos_embed.add_(0.1 * torch.randn_like(model.pos_embed.pos_embed))

    out_dir = OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    cfg = model.config
    g = torch.Generator().manual_seed(seed + 1)
    h, w = spec["hw"]
    batch = len(TIMESTEPS)
    inputs = {
        "hidden_states": torch.randn((batch, cfg.in_channels, h, w), generator=g),
        "timestep": torch.tensor(TIMESTEPS),
        "encoder_hidden_states": torch.randn(
            (batch, CONTEXT_LEN, cfg.joint_attention_dim), generator=g
        ),
        "pooled_projections": torch.randn((batch, cfg.pooled_projection_dim), generator=g),
    }
    save_file({k: v.contiguous() for k, v in inputs.items()}, out_dir / "inputs.safetensors")

    model = model.double()
    p = cfg.patch_size
    taps = {}

    def hook(tap):
        def f(_module, _args, output):
            tokens = output[1].detach()  # (encoder_hidden_states, hidden_states)
            taps[tap] = tokens.reshape(batch, h // p, w // p, -1).permute(0, 3, 1, 2)

        return f

    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(hook(f"transformer_blocks.{i}"))
    with torch.no_grad():
        out = model(
            hidden_states=inputs["hidden_states"].double(),
            timestep=inputs["timestep"].double(),
            encoder_hidden_states=inputs["encoder_hidden_states"].double(),
            pooled_projections=inputs["pooled_projections"].double(),
        ).sample
    outputs = {"sample": out, **taps}
    save_file({k: v.contiguous() for k, v in outputs.items()}, out_dir / "outputs.safetensors")
    n_params = sum(q.numel() for q in model.parameters())
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"mmdit/{name}: {n_params} parameters, {size / 1024:.0f} KiB, sample {list(out.shape)}")


SAMPLING_STEPS = 8
SAMPLING_GUIDANCE = 5.0


def make_sampling(seed):
    """fixtures/mmdit/sd3_tiny_sampling: the sd3_tiny transformer (weights read from its
    fixture folder) sampled with diffusers' FlowMatchEulerDiscreteScheduler (1000 training
    steps, shift 3.0) and guidance as the SD3 pipeline does it: one batch [negative; positive],
    v = uncond + scale (cond - uncond), the scheduler's timesteps (1000 sigma) handed to the
    transformer as they are.

    The sigmas are passed explicitly as linspace(1, 1/N, N) (the scheduler shifts them):
    the unit times the Rust sampler uses. (StableDiffusion3Pipeline's default instead spaces
    the steps linearly between the shifted training sigmas 1 and shift(1/1000).)

    inputs.safetensors (float32): noise, encoder_hidden_states, pooled_projections,
    negative_encoder_hidden_states, negative_pooled_projections; outputs.safetensors:
    timesteps (the scheduler's) and latents (the final sample, float64).
    """
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(OUT / "sd3_tiny").double().eval()
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    batch, (h, w) = 2, MODELS["sd3_tiny"]["hw"]
    context = (batch, CONTEXT_LEN, cfg.joint_attention_dim)
    pooled = (batch, cfg.pooled_projection_dim)
    inputs = {
        "noise": torch.randn((batch, cfg.in_channels, h, w), generator=g),
        "encoder_hidden_states": torch.randn(context, generator=g),
        "pooled_projections": torch.randn(pooled, generator=g),
        # A negative prompt is a different (smaller) embedding, not zeros.
        "negative_encoder_hidden_states": 0.3 * torch.randn(context, generator=g),
        "negative_pooled_projections": 0.3 * torch.randn(pooled, generator=g),
    }
    out_dir = OUT / "sd3_tiny_sampling"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in inputs.items()}, out_dir / "inputs.safetensors")

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / SAMPLING_STEPS, SAMPLING_STEPS))
    d = {k: v.double() for k, v in inputs.items()}
    both_context = torch.cat([d["negative_encoder_hidden_states"], d["encoder_hidden_states"]])
    both_pooled = torch.cat([d["negative_pooled_projections"], d["pooled_projections"]])
    latents = d["noise"]
    for t in scheduler.timesteps:
        both = model(
            hidden_states=torch.cat([latents, latents]),
            timestep=t.double().expand(2 * batch),
            encoder_hidden_states=both_context,
            pooled_projections=both_pooled,
        ).sample
        uncond, cond = both.chunk(2)
        velocity = uncond + SAMPLING_GUIDANCE * (cond - uncond)
        latents = scheduler.step(velocity, t, latents).prev_sample
    outputs = {
        "timesteps": scheduler.timesteps.double().contiguous(),
        "latents": latents.contiguous(),
    }
    save_file(outputs, out_dir / "outputs.safetensors")
    print(
        f"mmdit/sd3_tiny_sampling: timesteps {[round(x, 2) for x in scheduler.timesteps.tolist()]}, "
        f"|latents| max {latents.abs().max():.4f}, dtype {latents.dtype}"
    )


def published_counts():
    """Tensor and parameter counts of the published configs (for the Rust test)."""
    from diffusers import SD3Transformer2DModel

    base = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64,
                joint_attention_dim=4096, pooled_projection_dim=2048, out_channels=16)
    for name, kw in [
        ("sd3_medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                            pos_embed_max_size=192)),
        ("sd35_large", dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                            pos_embed_max_size=192, qk_norm="rms_norm")),
        ("sd35_medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                             pos_embed_max_size=384, qk_norm="rms_norm",
                             dual_attention_layers=tuple(range(13)))),
    ]:
        with torch.device("meta"):
            m = SD3Transformer2DModel(**base, **kw)
        sd = m.state_dict()
        print(f"mmdit {name}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} numbers")


def make_all():
    for seed, (name, spec) in enumerate(MODELS.items()):
        make(name, spec, seed=4000 + 10 * seed)
    make_sampling(seed=4500)
