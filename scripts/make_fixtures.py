#!/usr/bin/env python3
"""Reference fixtures for the Rust UNet2DConditionModel (crates/adm-models/src/unet_2d.rs).

Builds tiny random UNets with diffusers, perturbs every parameter (so norms and biases are
not trivially 1 / 0), runs them in float64 on fixed inputs and writes, per model, under
crates/adm-models/tests/fixtures/unet/<name>/:

  config.json                          diffusers' config (what the Rust Config deserialises)
  diffusion_pytorch_model.safetensors  the weights, float32 (the float64 reference runs on
                                       exactly these values, widened)
  inputs.safetensors                   sample, timestep (per sample), encoder_hidden_states
                                       [, text_embeds, time_ids]   (float32)
  outputs.safetensors                  sample (float64) and the outputs of down_blocks.{i},
                                       mid_block, up_blocks.{i} (float32, via forward hooks)

Models:
  sdxl_tiny  SDXL-like: DownBlock2D + CrossAttnDownBlock2D, text_time added embedding,
             linear projections, transformer_layers_per_block [1, 2], per-block heads.
  sd15_tiny  SD1.5-like: CrossAttnDownBlock2D + DownBlock2D, 1x1 conv projections, no added
             embedding, one head count for all blocks, downsample_padding 0.

Run (developers only; the Rust tests never need Python). Only PyPI is needed:

  python3 -m venv /tmp/fxvenv
  /tmp/fxvenv/bin/pip install -r scripts/requirements.txt
  /tmp/fxvenv/bin/python scripts/make_fixtures.py

The script is deterministic and overwrites the fixture folders; run it from anywhere.
"""

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "unet"

MODELS = {
    "sdxl_tiny": dict(
        config=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            transformer_layers_per_block=[1, 2],
            attention_head_dim=[2, 4],  # diffusers' name for the number of heads
            cross_attention_dim=16,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=12 + 6 * 8,
        ),
        sample=(2, 4, 16, 16),
        context=(2, 7, 16),
        pooled=12,
        timesteps=[999.0, 17.0],
    ),
    "sd15_tiny": dict(
        config=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=2,
            cross_attention_dim=12,
            norm_num_groups=4,
            downsample_padding=0,
        ),
        sample=(2, 4, 8, 8),
        context=(2, 5, 12),
        pooled=None,
        timesteps=[501.0, 3.0],
    ),
}


def make(name, spec, seed):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["config"]).float().eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))

    out_dir = OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    # Weights in float32 with diffusers' layout; the float64 reference uses these exact values.
    unet.save_pretrained(out_dir, safe_serialization=True)

    g = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "sample": torch.randn(spec["sample"], generator=g),
        "timestep": torch.tensor(spec["timesteps"]),
        "encoder_hidden_states": torch.randn(spec["context"], generator=g),
    }
    added = None
    if spec["pooled"] is not None:
        inputs["text_embeds"] = torch.randn((spec["sample"][0], spec["pooled"]), generator=g)
        inputs["time_ids"] = torch.tensor(
            [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 4.0, 8.0, 64.0, 64.0]]
        )
        added = {
            "text_embeds": inputs["text_embeds"].double(),
            "time_ids": inputs["time_ids"].double(),
        }
    save_file({k: v.contiguous() for k, v in inputs.items()}, out_dir / "inputs.safetensors")

    unet = unet.double()
    taps = {}

    def hook(tap):
        def f(_module, _args, output):
            taps[tap] = (output[0] if isinstance(output, tuple) else output).detach()

        return f

    for i, block in enumerate(unet.down_blocks):
        block.register_forward_hook(hook(f"down_blocks.{i}"))
    unet.mid_block.register_forward_hook(hook("mid_block"))
    for i, block in enumerate(unet.up_blocks):
        block.register_forward_hook(hook(f"up_blocks.{i}"))

    with torch.no_grad():
        out = unet(
            inputs["sample"].double(),
            inputs["timestep"].double(),
            encoder_hidden_states=inputs["encoder_hidden_states"].double(),
            added_cond_kwargs=added,
        ).sample

    outputs = {"sample": out.contiguous()}
    # f32 rounding (1e-7 relative) is far below the parity tolerance; it halves the size.
    outputs.update({k: v.float().contiguous() for k, v in taps.items()})
    save_file(outputs, out_dir / "outputs.safetensors")

    n_params = sum(p.numel() for p in unet.parameters())
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"{name}: {n_params} parameters, {size / 1024:.0f} KiB, |out| max {out.abs().max():.4f}")
    print("  taps:", json.dumps({k: list(v.shape) for k, v in taps.items()}))


def main():
    torch.set_grad_enabled(False)
    for seed, (name, spec) in enumerate(MODELS.items()):
        make(name, spec, seed=1000 + 10 * seed)


if __name__ == "__main__":
    main()
