#!/usr/bin/env python3
"""PyTorch eager CPU timings of diffusers' SD3Transformer2DModel, the counterpart of
crates/adm-models/examples/mmdit_bench.rs (same configs, input shapes and timing rule).

f32, random weights, batch 2. `forward` runs under torch.no_grad(); `forward+backward` runs
`model(...).sample.sum().backward()` (grads cleared between calls). Each measurement: 2
warm-up calls, then calls until 30 are timed or about 3 s have passed (at least 5); the
median is reported.

  /work/venv/bin/python scripts/bench_mmdit.py [--threads 2] [tiny|mid]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "mmdit" / "sd3_tiny" / "config.json"

# The mid-size config (mmdit_bench.rs `mid_config` is the same dict).
MID = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 4,
    "joint_attention_dim": 256,
    "caption_projection_dim": 256,
    "pooled_projection_dim": 128,
    "out_channels": 16,
    "pos_embed_max_size": 32,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}


def median_ms(f):
    for _ in range(2):
        f()
    times = []
    start = time.perf_counter()
    while len(times) < 30 and (len(times) < 5 or time.perf_counter() - start < 3.0):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), len(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("only", nargs="?")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    print(f"pytorch {torch.__version__} eager, torch.set_num_threads({torch.get_num_threads()})")
    cases = [("tiny", json.loads(TINY.read_text()), 16, 5), ("mid", MID, 32, 77)]
    for name, cfg, size, length in cases:
        if args.only and args.only != name:
            continue
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        model = SD3Transformer2DModel(**cfg).float()
        model.train(False)
        params = sum(p.numel() for p in model.parameters())
        batch = 2
        x = torch.randn(batch, cfg["in_channels"], size, size)
        t = torch.tensor([880.0, 42.0])
        context = torch.randn(batch, length, cfg["joint_attention_dim"])
        pooled = torch.randn(batch, cfg["pooled_projection_dim"])

        def run():
            return model(
                hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled
            ).sample

        def forward():
            with torch.no_grad():
                run()

        def forward_backward():
            model.zero_grad(set_to_none=True)
            run().sum().backward()

        fwd, n_fwd = median_ms(forward)
        bwd, n_bwd = median_ms(forward_backward)
        print(
            f"{name}: {params} params, latent {list(x.shape)}, context {list(context.shape)}: "
            f"forward {fwd:.2f} ms (n={n_fwd}), forward+backward {bwd:.2f} ms (n={n_bwd})"
        )


if __name__ == "__main__":
    main()
