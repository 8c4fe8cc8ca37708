"""Reference fixtures for the Rust SAM ViT image encoder (crates/adm-models/src/sam.rs), the
`sam` group of scripts/make_fixtures.py.

A tiny random transformers SamVisionModel, every parameter re-drawn (transformers initialises
the linears with std 1e-10 and the position tables with zeros, which would test nothing), run
in float64 on fixed pixels; under crates/adm-models/tests/fixtures/sam/tiny/:

  config.json        transformers' SamVisionConfig (what the Rust Config deserialises)
  model.safetensors  the weights, float32, with SamVisionModel's `vision_encoder.` prefix
                     (the float64 reference runs on exactly these values, widened)
  inputs.safetensors pixel_values (2, 3, 32, 32), float32 (already normalised, as
                     SamProcessor's output would be)
  outputs.safetensors (float64) last_hidden_state: the neck output (B, 16, 8, 8);
                     hidden_states.{i}: transformers' output_hidden_states as (B, C, 8, 8) maps
                     (hidden_states.0 is the patch + position embedding, hidden_states.{i+1}
                     the output of layer i, checked against forward hooks)

The 8x8 token grid is not a multiple of the window (3): windowed layers pad to 9x9, as
transformers' window_partition does. Layers 1 and 3 are global.

Also prints the tensor / parameter counts of the published SAM vision encoders
(facebook/sam-vit-base / -large / -huge) that the Rust test hard-codes.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "sam"

TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    patch_size=4,
    image_size=32,
    window_size=3,
    global_attn_indexes=[1, 3],
    use_rel_pos=True,
    use_abs_pos=True,
    output_channels=16,
    mlp_dim=48,
)

# The vision_config of the published checkpoints (as in the original SAM's build_sam.py);
# everything else is transformers' default (patch 16, image 1024, window 14, 256 channels).
PUBLISHED = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11], mlp_dim=3072),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23], mlp_dim=4096),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31], mlp_dim=5120),
}


def redraw(model, g):
    """Non-trivial values for every parameter: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1²),
    norm scales ~ 1 + N(0, 0.1²), position tables ~ N(0, 0.3²)."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if "rel_pos" in name or "pos_embed" in name:
            p.copy_(0.3 * noise)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif p.dim() >= 2:
            p.copy_(noise / p[0].numel() ** 0.5)
        else:
            p.copy_(0.1 * noise)


def make_tiny(seed):
    from transformers import SamVisionConfig, SamVisionModel

    torch.manual_seed(seed)
    model = SamVisionModel(SamVisionConfig(**TINY)).float().eval()
    g = torch.Generator().manual_seed(seed)
    redraw(model, g)

    out_dir = OUT / "tiny"
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    pixels = torch.randn((2, 3, 32, 32), generator=g)
    save_file({"pixel_values": pixels.contiguous()}, out_dir / "inputs.safetensors")

    model = model.double()
    hooked = []
    for layer in model.vision_encoder.layers:
        layer.register_forward_hook(lambda _m, _a, out: hooked.append(out[0] if isinstance(out, tuple) else out))
    out = model(pixels.double(), output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == TINY["num_hidden_layers"] + 1
    for i, h in enumerate(hooked):
        assert torch.equal(h, hidden[i + 1]), f"hidden_states.{i + 1} is not layer {i}'s output"
    outputs = {"last_hidden_state": out.last_hidden_state.contiguous()}
    for i, h in enumerate(hidden):
        outputs[f"hidden_states.{i}"] = h.permute(0, 3, 1, 2).contiguous()
    save_file(outputs, out_dir / "outputs.safetensors")
    size = sum(q.stat().st_size for q in out_dir.iterdir())
    print(
        f"sam/tiny: {sum(q.numel() for q in model.parameters())} parameters, {size / 1024:.0f} KiB, "
        f"|last_hidden_state| max {out.last_hidden_state.abs().max():.4f}"
    )


def published_counts():
    from transformers import SamVisionConfig, SamVisionModel

    for name, kw in PUBLISHED.items():
        with torch.device("meta"):
            model = SamVisionModel(SamVisionConfig(**kw))
        sd = model.state_dict()
        print(f"sam {name} vision encoder: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters")


def main():
    torch.set_grad_enabled(False)
    make_tiny(seed=5000)
    published_counts()


if __name__ == "__main__":
    main()
