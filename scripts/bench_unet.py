#!/usr/bin/env python3
"""PyTorch eager CPU timings of diffusers' UNet2DConditionModel, the counterpart of
crates/adm-models/examples/unet_bench.rs (same configs, input shapes and timing rule).

f32, random weights, batch 2. `forward` runs under torch.no_grad(); `forward+backward` runs
`unet(...).sample.sum().backward()` reaching every parameter (grads cleared between calls).
Each measurement: 2 warm-up calls, then calls until 30 are timed or about 3 s have passed
(at least 5); the median is reported.

  /tmp/fxvenv/bin/python scripts/bench_unet.py [--threads 2] [tiny|mid]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "unet" / "sdxl_tiny" / "config.json"

# The mid-size config (unet_bench.rs `mid_config` is the same dict).
MID = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [64, 128, 256],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [1, 2, 4],
    "cross_attention_dim": 256,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 32,
    "projection_class_embeddings_input_dim": 128 + 6 * 32,
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
    cases = [("tiny", json.loads(TINY.read_text()), 16, 7), ("mid", MID, 32, 77)]
    for name, cfg, size, length in cases:
        if args.only and args.only != name:
            continue
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        unet = UNet2DConditionModel(**cfg).float()
        unet.train(False)
        params = sum(p.numel() for p in unet.parameters())
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        batch = 2
        sample = torch.randn(batch, cfg["in_channels"], size, size)
        t = torch.tensor([880.0, 42.0])
        context = torch.randn(batch, length, cfg["cross_attention_dim"])
        s = float(size * 8)
        added = {
            "text_embeds": torch.randn(batch, pooled),
            "time_ids": torch.tensor([[s, s, 0, 0, s, s], [s, s, 8, 8, s, s]]),
        }

        def forward():
            with torch.no_grad():
                unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added)

        def forward_backward():
            unet.zero_grad(set_to_none=True)
            out = unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            out.sum().backward()
            assert all(p.grad is not None for p in unet.parameters())

        fwd, n_fwd = median_ms(forward)
        bwd, n_bwd = median_ms(forward_backward)
        print(
            f"{name}: {params} params, sample {list(sample.shape)}: forward {fwd:.2f} ms "
            f"(n={n_fwd}), forward+backward {bwd:.2f} ms (n={n_bwd})"
        )


if __name__ == "__main__":
    main()
