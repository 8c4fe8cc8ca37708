"""Reference fixtures for the Rust DINOv2 image encoder (crates/adm-models/src/dinov2.rs), the
`dinov2` group of scripts/make_fixtures.py.

Tiny random transformers Dinov2Models, every parameter re-drawn (transformers initialises
biases with zeros, layer scales and norm scales with ones, the mask token with zeros, which
would test little), run in float64; under crates/adm-models/tests/fixtures/dinov2/<name>/:

  config.json        transformers' Dinov2Config (what the Rust Config deserialises)
  model.safetensors  the weights, float32, with the published checkpoints' names (transformers
                     5 renames them on load and back on save); the float64 reference runs on
                     exactly these values, widened
  inputs.safetensors pixel_values (2, 3, 24, 24): the 6x6 grid the position embedding was
                     made for; (tiny only:) pixel_values_interp (1, 3, 34, 22): an 8x5 grid (the conv drops
                     the 2 leftover pixels), so the position embedding is resized (bicubic);
                     resize_in (1, 2, 10, 7): for the image resize (float32, already normalised)
  outputs.safetensors (float64) last_hidden_state (after `layernorm`) and hidden_states.{i}
                     (transformers' output_hidden_states, checked against forward hooks:
                     hidden_states.0 the embeddings, hidden_states.{i+1} layer i's output) for
                     pixel_values, the same with an `interp.` prefix for pixel_values_interp (tiny only);
                     resize_down / resize_up: F.interpolate(resize_in, bilinear,
                     antialias=True) to 4x3 and to 13x16, bicubic_down / bicubic_up the same
                     with mode="bicubic" (what transformers uses on the position embedding)
                     (tiny only)

Models: tiny (GELU MLP, 3 layers), tiny_swiglu (SwiGLU FFN as dinov2-giant, 2 layers).
Also prints the tensor / parameter counts of facebook/dinov2-{small,base,large,giant} (built on
the meta device) that the Rust test hard-codes.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "dinov2"

BASE = dict(hidden_size=16, num_attention_heads=2, patch_size=4, image_size=24, mlp_ratio=4, layer_norm_eps=1e-6)
MODELS = {
    "tiny": dict(BASE, num_hidden_layers=3),
    "tiny_swiglu": dict(BASE, num_hidden_layers=2, use_swiglu_ffn=True),
}

# facebook/dinov2-*'s config.json (image 518, patch 14, everything else transformers' default).
PUBLISHED = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, use_swiglu_ffn=True),
}


def redraw(model, g):
    """Weights ~ N(0, 1/fan_in); biases, mask token ~ N(0, 0.1²); norm scales ~ 1 + N(0, 0.1²);
    layer scales ~ 0.5 + N(0, 0.2²); CLS token and position embedding ~ N(0, 0.5²)."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if "cls_token" in name or "position_embeddings" in name:
            p.copy_(0.5 * noise)
        elif "lambda1" in name:
            p.copy_(0.5 + 0.2 * noise)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif p.dim() >= 2 and "mask_token" not in name:
            p.copy_(noise / p[0].numel() ** 0.5)
        else:
            p.copy_(0.1 * noise)


def run(model, pixels, prefix):
    hooked = []
    handles = [
        layer.register_forward_hook(lambda _m, _a, out: hooked.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.encoder.layer
    ]
    out = model(pixels.double(), output_hidden_states=True)
    for h in handles:
        h.remove()
    hidden = out.hidden_states
    assert len(hidden) == len(model.encoder.layer) + 1
    for i, h in enumerate(hooked):
        assert torch.equal(h, hidden[i + 1]), f"hidden_states.{i + 1} is not layer {i}'s output"
    outputs = {f"{prefix}last_hidden_state": out.last_hidden_state.contiguous()}
    for i, h in enumerate(hidden):
        outputs[f"{prefix}hidden_states.{i}"] = h.contiguous()
    return outputs


def make(name, kw, seed):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**kw)).float().eval()
    g = torch.Generator().manual_seed(seed)
    redraw(model, g)

    out_dir = OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    inputs = {"pixel_values": torch.randn((2, 3, 24, 24), generator=g)}
    model = model.double()
    outputs = run(model, inputs["pixel_values"], "")
    if name == "tiny":
        inputs["pixel_values_interp"] = torch.randn((1, 3, 34, 22), generator=g)
        outputs.update(run(model, inputs["pixel_values_interp"], "interp."))
        x = torch.randn((1, 2, 10, 7), generator=g)
        inputs["resize_in"] = x
        for key, size in [("down", (4, 3)), ("up", (13, 16))]:
            outputs[f"resize_{key}"] = F.interpolate(x.double(), size=size, mode="bilinear", align_corners=False, antialias=True)
            outputs[f"bicubic_{key}"] = F.interpolate(x.double(), size=size, mode="bicubic", align_corners=False)
    save_file({k: v.contiguous() for k, v in inputs.items()}, out_dir / "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in outputs.items()}, out_dir / "outputs.safetensors")
    size = sum(q.stat().st_size for q in out_dir.iterdir())
    print(f"dinov2/{name}: {sum(q.numel() for q in model.parameters())} parameters, {size / 1024:.0f} KiB")


def published_counts():
    from transformers import Dinov2Config, Dinov2Model

    for name, kw in PUBLISHED.items():
        with torch.device("meta"):
            model = Dinov2Model(Dinov2Config(image_size=518, patch_size=14, **kw))
        sd = model.state_dict()
        print(f"dinov2-{name}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters")


def main():
    torch.set_grad_enabled(False)
    for i, (name, kw) in enumerate(MODELS.items()):
        make(name, kw, seed=6000 + 10 * i)
    published_counts()


if __name__ == "__main__":
    main()
