#!/usr/bin/env python3
"""PyTorch eager CPU timings of diffusers' CogVideoXTransformer3DModel, the counterpart of
crates/adm-models/examples/cogvideox_bench.rs (same configs, input shapes and timing rule as
scripts/bench_unet.py).

f32, random weights, batch 2, per-sample timesteps. The rotary tables (mid config) are made
once outside the timed call, as the diffusers pipeline does (the Rust model makes them in
every forward). `forward` runs under torch.no_grad(); `forward+backward` runs
`model(...).sample.sum().backward()` reaching every parameter (grads cleared between calls).

  /work/venv/bin/python scripts/bench_cogvideox.py [--threads 2] [tiny|mid]
"""

import argparse
import json
from pathlib import Path

import torch
from bench_unet import median_ms
from diffusers import CogVideoXTransformer3DModel
from fixtures_cogvideox import rotary_tables

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "crates/adm-models/tests/fixtures/cogvideox/cogvideox_2b_tiny/config.json"

# The mid-size config (cogvideox_bench.rs `mid_config` is the same dict).
MID = {
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "time_embed_dim": 128,
    "text_embed_dim": 256,
    "num_layers": 4,
    "sample_width": 16,
    "sample_height": 16,
    "sample_frames": 9,
    "max_text_seq_length": 32,
    "use_rotary_positional_embeddings": True,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("only", nargs="?")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    print(f"pytorch {torch.__version__} eager, torch.set_num_threads({torch.get_num_threads()})")
    cases = [("tiny", json.loads(TINY.read_text()), (3, 8, 8), 8), ("mid", MID, (3, 16, 16), 32)]
    for name, cfg, (f, h, w), length in cases:
        if args.only and args.only != name:
            continue
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        model = CogVideoXTransformer3DModel(**cfg).float()
        model.train(False)
        params = sum(p.numel() for p in model.parameters())
        batch = 2
        latents = torch.randn(batch, f, model.config.in_channels, h, w)
        t = torch.tensor([880.0, 42.0])
        context = torch.randn(batch, length, model.config.text_embed_dim)
        rotary = rotary_tables(model, h, w, f) if model.config.use_rotary_positional_embeddings else None

        def forward():
            with torch.no_grad():
                model(latents, context, t, image_rotary_emb=rotary)

        def forward_backward():
            model.zero_grad(set_to_none=True)
            out = model(latents, context, t, image_rotary_emb=rotary).sample
            out.sum().backward()
            assert all(p.grad is not None for p in model.parameters())

        fwd, n_fwd = median_ms(forward)
        bwd, n_bwd = median_ms(forward_backward)
        print(
            f"{name}: {params} params, latents {list(latents.shape)}: forward {fwd:.2f} ms "
            f"(n={n_fwd}), forward+backward {bwd:.2f} ms (n={n_bwd})"
        )


if __name__ == "__main__":
    main()
