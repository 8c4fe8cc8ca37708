"""Reference fixtures for the Rust CogVideoXTransformer3DModel (crates/adm-models/src/cogvideox.rs),
the `cogvideox` group of scripts/make_fixtures.py.

Tiny random models built by diffusers, every parameter perturbed (so norms, biases and the
adaptive-norm projections are not trivially 1 / 0 / default), run in float64 on fixed inputs;
per model, under crates/adm-models/tests/fixtures/cogvideox/<name>/:

  config.json                          diffusers' config (what the Rust Config deserialises)
  diffusion_pytorch_model.safetensors  the weights, float32 (the float64 reference runs on
                                       exactly these values, widened)
  inputs.safetensors                   hidden_states (B, F, C, H, W), timestep (B,),
                                       encoder_hidden_states (B, L, D_text)   (float32)
  outputs.safetensors                  sample (float64, (B, F, C_out, H, W)) and the video
                                       tokens after each block as 3D maps (B, C, F, H/p, W/p)
                                       named transformer_blocks.{i} (float32, forward hooks)

Models:
  cogvideox_2b_tiny  CogVideoX-2B-like: 3D sin-cos position embedding (not stored in the
                     checkpoint: computed), no rotary; sample_* sized like the input.
  cogvideox_5b_tiny  CogVideoX-5B-like: 3D rotary embedding on the video tokens (computed as
                     diffusers' CogVideoXPipeline._prepare_rotary_positional_embeddings does),
                     no absolute position embedding; the input (8 x 12) differs from the
                     sample size (8 x 8), so the rotary grid uses the resize-crop region.
  cogvideox_5b_i2v_tiny  CogVideoX-5B-I2V-like: rotary plus the learned position embedding
                     (stored as patch_embed.pos_embedding), 8 input / 4 output channels.

Also prints the tensor / parameter counts of the published CogVideoX-2b / -5b transformer
configs that the Rust test hard-codes.
"""

from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "cogvideox"

TINY = dict(
    num_attention_heads=2,
    in_channels=4,
    out_channels=4,
    time_embed_dim=16,
    text_embed_dim=12,
    num_layers=2,
    sample_width=8,
    sample_height=8,
    sample_frames=9,  # (3 latent frames - 1) * temporal_compression_ratio + 1
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=8,
)

MODELS = {
    "cogvideox_2b_tiny": dict(
        config=dict(TINY, attention_head_dim=8, use_rotary_positional_embeddings=False),
        hidden_states=(2, 3, 4, 8, 8),
        timesteps=[999.0, 17.0],
    ),
    # Rotary needs head_dim % 16 == 0 (t / h / w get head_dim / 4, 3/8, 3/8, each even).
    "cogvideox_5b_tiny": dict(
        config=dict(TINY, attention_head_dim=16, use_rotary_positional_embeddings=True),
        hidden_states=(2, 3, 4, 8, 12),
        timesteps=[501.0, 3.0],
    ),
    # CogVideoX-5B-I2V-like: rotary plus the learned position embedding the checkpoint
    # stores (patch_embed.pos_embedding, text and video tokens); more input than output
    # channels (the image latent is concatenated to the noisy one).
    "cogvideox_5b_i2v_tiny": dict(
        config=dict(
            TINY,
            attention_head_dim=16,
            in_channels=8,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,
        ),
        hidden_states=(2, 3, 8, 8, 8),
        timesteps=[250.0, 750.0],
    ),
}

# Published transformer configs (THUDM/CogVideoX-2b and -5b, transformer/config.json).
PUBLISHED = {
    "2b": dict(num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False),
    "5b": dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
}


def rotary_tables(model, height, width, frames):
    """diffusers' CogVideoXPipeline._prepare_rotary_positional_embeddings for latent (H, W)."""
    cfg = model.config
    p = cfg.patch_size
    grid_h, grid_w = height // p, width // p
    crops = get_resize_crop_region_for_grid(
        (grid_h, grid_w), cfg.sample_width // p, cfg.sample_height // p
    )
    return get_3d_rotary_pos_embed(
        embed_dim=cfg.attention_head_dim,
        crops_coords=crops,
        grid_size=(grid_h, grid_w),
        temporal_size=frames,
    )


def make(name, spec, seed):
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**spec["config"]).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if model.config.use_learned_positional_embeddings:
            # A checkpoint buffer (not a parameter): diffusers fills it with the sin-cos
            # table and zeros for the text tokens; make it distinguishable from both.
            table = model.patch_embed.pos_embedding
            table.add_(0.1 * torch.randn_like(table))

    out_dir = OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    cfg = model.config
    b, f, _, h, w = spec["hidden_states"]
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "hidden_states": torch.randn(spec["hidden_states"], generator=g),
        "timestep": torch.tensor(spec["timesteps"]),
        "encoder_hidden_states": torch.randn(
            (b, cfg.max_text_seq_length, cfg.text_embed_dim), generator=g
        ),
    }
    save_file({k: v.contiguous() for k, v in inputs.items()}, out_dir / "inputs.safetensors")

    model = model.double()
    p = cfg.patch_size
    taps = {}

    def hook(tap):
        def fn(_module, _args, output):
            video = output[0].detach()  # (B, F*h*w, C): the video tokens
            maps = video.reshape(b, f, h // p, w // p, -1).permute(0, 4, 1, 2, 3)
            taps[tap] = maps.float().contiguous()

        return fn

    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(hook(f"transformer_blocks.{i}"))

    rotary = rotary_tables(model, h, w, f) if cfg.use_rotary_positional_embeddings else None
    out = model(
        inputs["hidden_states"].double(),
        inputs["encoder_hidden_states"].double(),
        inputs["timestep"].double(),
        image_rotary_emb=rotary,
    ).sample

    outputs = {"sample": out.contiguous(), **taps}
    save_file(outputs, out_dir / "outputs.safetensors")
    n_params = sum(q.numel() for q in model.parameters())
    size = sum(q.stat().st_size for q in out_dir.iterdir())
    print(f"cogvideox/{name}: {n_params} parameters, {size / 1024:.0f} KiB, |out| max {out.abs().max():.4f}")


def published_counts():
    for name, kw in PUBLISHED.items():
        with torch.device("meta"):
            model = CogVideoXTransformer3DModel(**kw)
        sd = model.state_dict()
        print(f"cogvideox {name}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters")


def main():
    torch.set_grad_enabled(False)
    for seed, (name, spec) in enumerate(MODELS.items()):
        make(name, spec, seed=4000 + 10 * seed)
    published_counts()


if __name__ == "__main__":
    main()
