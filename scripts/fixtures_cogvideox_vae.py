"""Reference fixtures for the Rust CogVideoX VAE decoder (crates/adm-models/src/cogvideox_vae.rs).

Called by make_fixtures.py (group `cogvideox_vae`). Writes
crates/adm-models/tests/fixtures/cogvideox_vae/tiny/:

  config.json                          diffusers' AutoencoderKLCogVideoX config
  diffusion_pytorch_model.safetensors  the FULL checkpoint (encoder too: the Rust loader must
                                       skip encoder tensors by name), float32, perturbed
  inputs.safetensors                   latent (2, 4, 3, 4, 3): one decode chunk;
                                       latent_4 (1, 4, 4, 2, 2), latent_5 (1, 4, 5, 2, 2):
                                       chunked decodes with conv caches (float32)
  outputs.safetensors                  (float64) decoded, decoded_4, decoded_5: diffusers'
                                       `decode` (2 latent frames per chunk, the first chunk
                                       taking the odd remainder); decoded_5_whole: latent_5
                                       decoded as one chunk (num_latent_frames_batch_size = 5),
                                       which differs (group-norm statistics and the
                                       first-frame rule are per chunk)

The tiny model has three up blocks (two spatial x2 upsamplers) and temporal compression 4,
so a 3-frame chunk becomes 1 + 4 * 2 = 9 frames as in the real CogVideoX VAE.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "cogvideox_vae"

TINY = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 3,
    up_block_types=("CogVideoXUpBlock3D",) * 3,
    block_out_channels=(4, 8, 8),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
    sample_height=16,
    sample_width=16,
    scaling_factor=0.7,
)


def make_tiny(seed):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(**TINY).float().eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out_dir = OUT / "tiny"
    out_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out_dir, safe_serialization=True)

    g = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "latent": torch.randn((2, 4, 3, 4, 3), generator=g),
        "latent_4": torch.randn((1, 4, 4, 2, 2), generator=g),
        "latent_5": torch.randn((1, 4, 5, 2, 2), generator=g),
    }
    save_file({k: v.contiguous() for k, v in inputs.items()}, out_dir / "inputs.safetensors")

    vae = vae.double()
    assert vae.num_latent_frames_batch_size == 2
    outputs = {
        "decoded": vae.decode(inputs["latent"].double()).sample,
        "decoded_4": vae.decode(inputs["latent_4"].double()).sample,
        "decoded_5": vae.decode(inputs["latent_5"].double()).sample,
    }
    vae.num_latent_frames_batch_size = 5
    outputs["decoded_5_whole"] = vae.decode(inputs["latent_5"].double()).sample
    chunking = (outputs["decoded_5"] - outputs["decoded_5_whole"]).abs().max()
    save_file({k: v.contiguous() for k, v in outputs.items()}, out_dir / "outputs.safetensors")

    n_dec = sum(p.numel() for n, p in vae.named_parameters() if n.startswith("decoder."))
    n_all = sum(p.numel() for p in vae.parameters())
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    shapes = {k: list(v.shape) for k, v in outputs.items()}
    print(
        f"cogvideox_vae/tiny: {n_all} parameters ({n_dec} decoder), {size / 1024:.0f} KiB, "
        f"outputs {shapes}, chunked vs whole max |diff| {chunking:.3e}"
    )


def published_counts():
    """Decoder tensor / parameter counts of the published CogVideoX VAE (2b and 5b share the
    architecture; only scaling_factor differs), for the Rust test."""
    from diffusers import AutoencoderKLCogVideoX

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX()
    sd = {k: v for k, v in vae.state_dict().items() if k.startswith("decoder.")}
    print(f"cogvideox vae decoder: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters")


def main(seed=4000):
    torch.set_grad_enabled(False)
    make_tiny(seed)
    published_counts()
