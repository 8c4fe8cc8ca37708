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

Further groups (run all by default, or name them: `make_fixtures.py vae clip counts`):
  sampling  fixtures/unet/sdxl_tiny_sampling: 20-step DDIM (trailing) with classifier-free
         guidance of the sdxl_tiny UNet (reads its weights: run after `unet`), float64.
  vae    fixtures/vae/{sdxl_tiny,sd3_tiny}: AutoencoderKL encode (mean, logvar, sample with
         given noise, scaled latents) and decode, float64 reference.
  clip   fixtures/clip/{clip_l_tiny,bigg_tiny}: CLIPTextModel / CLIPTextModelWithProjection
         (last, penultimate and embedding hidden states, pooled, text_embeds), float64;
         fixtures/clip/tokenizer (the real CLIP vocab.json + merges.txt, built from
         open_clip's bpe_simple_vocab_16e6.txt.gz: `pip download open-clip-torch --no-deps`
         and unzip the wheel, or set CLIP_BPE), tokenizer_small/tokenizer.json (first 2000
         merges) and tokens.json (transformers' CLIPTokenizer ids for a few prompts).
  cogvideox_vae  fixtures/cogvideox_vae/tiny: AutoencoderKLCogVideoX decode (one chunk and
         chunked with conv caches), float64; generator in scripts/fixtures_cogvideox_vae.py.
  t5     fixtures/t5/{v1_1_tiny,t5_tiny,tokenizer} and fixtures/sd3_text/tiny (SD3's
         encode_prompt): see scripts/fixtures_t5.py (run after `clip`).
  sdxl_pipeline  fixtures/sdxl: a tiny StableDiffusionXLPipeline folder and its encode_prompt
         and 4-step CFG sampling references (scripts/fixtures_sdxl_pipeline.py; reads
         clip/tokenizer_small: run after `clip`).
  cogvideox  fixtures/cogvideox/{cogvideox_2b_tiny,cogvideox_5b_tiny}: CogVideoXTransformer3DModel
         (scripts/fixtures_cogvideox.py), float64; also prints the published configs' counts.
  sam    fixtures/sam/tiny: SamVisionModel (scripts/fixtures_sam.py), float64; also prints
         the published SAM vision encoders' counts.
  counts prints the tensor / parameter counts of the published VAE and CLIP configs that
         the Rust tests hard-code.
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


SAMPLING_OUT = OUT / "sdxl_tiny_sampling"
SAMPLING_STEPS = 20
SAMPLING_GUIDANCE = 5.0


def make_sampling(seed):
    """fixtures/unet/sdxl_tiny_sampling: a 20-step DDIM run of the sdxl_tiny UNet (its weights
    are read from fixtures/unet/sdxl_tiny, not copied) with classifier-free guidance, float64.

    diffusers' DDIMScheduler with SDXL's betas (scaled_linear 0.00085 -> 0.012, 1000 steps),
    timestep_spacing "trailing", steps_offset 0, eta 0, epsilon prediction, clip_sample off and
    set_alpha_to_one=True: the last step (t = 49 -> prev -1) then returns x0_hat, which is the
    Rust sampler's convention (`ode_step` with s <= 0). Guidance as the SDXL pipeline does it:
    one batch [negative; positive], eps = uncond + scale (cond - uncond).

    inputs.safetensors (float32): noise, encoder_hidden_states, text_embeds, time_ids,
    negative_encoder_hidden_states, negative_text_embeds; outputs.safetensors: timesteps
    (the scheduler's, float64) and latents (the final sample, float64).
    """
    from diffusers import DDIMScheduler

    unet = UNet2DConditionModel.from_pretrained(OUT / "sdxl_tiny").double().eval()
    spec = MODELS["sdxl_tiny"]
    batch, (_, length, width), pooled = 2, spec["context"], spec["pooled"]
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "noise": torch.randn(spec["sample"], generator=g),
        "encoder_hidden_states": torch.randn((batch, length, width), generator=g),
        "text_embeds": torch.randn((batch, pooled), generator=g),
        "time_ids": torch.tensor(
            [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 4.0, 8.0, 64.0, 64.0]]
        ),
        # A negative prompt is a different (smaller) embedding, not zeros.
        "negative_encoder_hidden_states": 0.3 * torch.randn((batch, length, width), generator=g),
        "negative_text_embeds": 0.3 * torch.randn((batch, pooled), generator=g),
    }
    SAMPLING_OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in inputs.items()}, SAMPLING_OUT / "inputs.safetensors")

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    scheduler.set_timesteps(SAMPLING_STEPS)
    d = {k: v.double() for k, v in inputs.items()}
    context = torch.cat([d["negative_encoder_hidden_states"], d["encoder_hidden_states"]])
    added = {
        "text_embeds": torch.cat([d["negative_text_embeds"], d["text_embeds"]]),
        "time_ids": torch.cat([d["time_ids"], d["time_ids"]]),
    }
    latents = d["noise"] * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        both = unet(
            torch.cat([latents, latents]),
            t.double().expand(2 * batch),
            encoder_hidden_states=context,
            added_cond_kwargs=added,
        ).sample
        uncond, cond = both.chunk(2)
        eps = uncond + SAMPLING_GUIDANCE * (cond - uncond)
        latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
    outputs = {
        "timesteps": scheduler.timesteps.double().contiguous(),
        "latents": latents.contiguous(),
    }
    save_file(outputs, SAMPLING_OUT / "outputs.safetensors")
    size = sum(f.stat().st_size for f in SAMPLING_OUT.iterdir())
    print(
        f"sdxl_tiny_sampling: timesteps {scheduler.timesteps.tolist()}, {size / 1024:.0f} KiB, "
        f"|latents| max {latents.abs().max():.4f}, dtype {latents.dtype}"
    )


VAE_OUT = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "vae"

VAE_MODELS = {
    # SDXL-like: 4 latent channels, quant convs, mid-block attention.
    "sdxl_tiny": dict(
        config=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
            scaling_factor=0.13025,
        ),
        image=(2, 3, 16, 16),
    ),
    # SD3-like: 16 latent channels, no quant convs, shift factor, three blocks, two layers.
    "sd3_tiny": dict(
        config=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 8, 16),
            layers_per_block=2,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        image=(1, 3, 16, 8),
    ),
}


def make_vae(name, spec, seed):
    """AutoencoderKL fixture: weights, inputs (image, noise, latent), f64 outputs.

    outputs.safetensors: mean, logvar (encode), sample (mean + std * noise), decoded (decode
    of the input `latent`, float64), scaled (the pipeline's (sample - shift) * scaling).
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**spec["config"]).float().eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out_dir = VAE_OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out_dir, safe_serialization=True)

    cfg = vae.config
    g = torch.Generator().manual_seed(seed + 1)
    b, _, h, w = spec["image"]
    f = 2 ** (len(cfg.block_out_channels) - 1)
    latent_shape = (b, cfg.latent_channels, h // f, w // f)
    inputs = {
        "image": torch.rand(spec["image"], generator=g) * 2 - 1,
        "noise": torch.randn(latent_shape, generator=g),
        "latent": torch.randn(latent_shape, generator=g),
    }
    save_file({k: v.contiguous() for k, v in inputs.items()}, out_dir / "inputs.safetensors")

    vae = vae.double()
    with torch.no_grad():
        posterior = vae.encode(inputs["image"].double()).latent_dist
        sample = posterior.mean + posterior.std * inputs["noise"].double()
        decoded = vae.decode(inputs["latent"].double()).sample
    shift = cfg.shift_factor or 0.0
    outputs = {
        "mean": posterior.mean,
        "logvar": posterior.logvar,
        "sample": sample,
        "scaled": (sample - shift) * cfg.scaling_factor,
        "decoded": decoded,
    }
    save_file({k: v.contiguous() for k, v in outputs.items()}, out_dir / "outputs.safetensors")
    n_params = sum(p.numel() for p in vae.parameters())
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"vae/{name}: {n_params} parameters, {size / 1024:.0f} KiB, decoded {list(decoded.shape)}")


def published_vae_counts():
    """Tensor and parameter counts of the published VAE configs (for the Rust test)."""
    from diffusers import AutoencoderKL

    base = dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
    )
    for name, extra in [
        ("sdxl", dict(latent_channels=4)),
        ("sd3", dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)),
    ]:
        vae = AutoencoderKL(**base, **extra)
        sd = vae.state_dict()
        print(f"vae {name}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters")


CLIP_OUT = ROOT / "crates" / "adm-models" / "tests" / "fixtures" / "clip"
# open_clip's BPE file; pip download open-clip-torch --no-deps, unzip the wheel (or set
# CLIP_BPE to the file). The tokenizer fixtures are skipped when it is missing.
CLIP_BPE_DEFAULT = Path("/tmp/oclip/open_clip/bpe_simple_vocab_16e6.txt.gz")

CLIP_PROMPTS = [
    "a photo of a cat",
    "A   Photo of an ASTRONAUT riding a horse, 4k, highly-detailed!!",
    "",
    "it's a dog's life; they're we've i'm you'll he'd",
    "café crème brûlée 日本 🙂 <|endoftext|> x",
    # Longer than 77 tokens: truncated to 75 + bos + eos.
    " ".join(["a very long prompt about many things"] * 12),
]


def bytes_to_unicode():
    """GPT-2 / CLIP byte-to-unicode table (byte value -> printable character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_merges(bpe_path, n_merges=None):
    """CLIP's vocab (HF names and order) and merges from open_clip's BPE file; with
    n_merges, only the first n merges (a small vocabulary with the same id scheme)."""
    import gzip

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    if n_merges is not None:
        merges = merges[:n_merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def make_clip_tokenizers():
    """tokenizer/ (full CLIP vocab.json + merges.txt, as SD/SDXL repos ship them),
    tokenizer_small/tokenizer.json (first 2000 merges), and tokens.json with the ids
    transformers' CLIPTokenizer gives for CLIP_PROMPTS (max_length 77, padding to it)."""
    import os

    from transformers import CLIPTokenizer

    bpe = Path(os.environ.get("CLIP_BPE", CLIP_BPE_DEFAULT))
    if not bpe.is_file():
        print(f"clip tokenizer fixtures skipped: {bpe} not found")
        return
    tokens = {"prompts": CLIP_PROMPTS}

    full_dir = CLIP_OUT / "tokenizer"
    full_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_merges(bpe)
    assert len(vocab) == 49408
    (full_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (full_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    for name, pad in [("full_pad_eos", "<|endoftext|>"), ("full_pad_bang", "!")]:
        tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad)
        ids = tok(CLIP_PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        tokens[name] = ids
    # SD / SDXL's tokenizer_config.json settings that matter here.
    (full_dir / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>", "do_lower_case": True}, indent=1)
    )
    # Well-known CLIP ids: "a photo of a cat".
    assert tokens["full_pad_eos"][0][:7] == [49406, 320, 1125, 539, 320, 2368, 49407], tokens[
        "full_pad_eos"
    ][0][:7]

    small_dir = CLIP_OUT / "tokenizer_small"
    small_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_merges(bpe, n_merges=2000)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!")
    tok.backend_tokenizer.save(str(small_dir / "tokenizer.json"))
    tokens["small_pad_bang"] = tok(
        CLIP_PROMPTS, padding="max_length", max_length=77, truncation=True
    ).input_ids
    tokens["small_vocab_size"] = len(vocab)
    (CLIP_OUT / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False))
    size = sum(f.stat().st_size for d in (full_dir, small_dir) for f in d.iterdir())
    print(f"clip tokenizers: {size / 1024:.0f} KiB")


CLIP_MODELS = {
    # CLIP-L-like (SD / SDXL text_encoder): CLIPTextModel, quick_gelu, legacy eos_token_id 2
    # (pooled = argmax of the ids).
    "clip_l_tiny": dict(
        cls="CLIPTextModel",
        config=dict(
            vocab_size=600,
            hidden_size=32,
            intermediate_size=48,
            projection_dim=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=16,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        # bos 598, eos 599 (the largest id), pad with eos.
        bos=598,
        eos=599,
        pad=599,
        mask=False,
    ),
    # OpenCLIP-bigG-like (SDXL text_encoder_2): CLIPTextModelWithProjection, gelu, a real
    # eos_token_id (pooled = first eos), ids above eos so argmax would pick the wrong token,
    # an attention mask over the padding.
    "bigg_tiny": dict(
        cls="CLIPTextModelWithProjection",
        config=dict(
            vocab_size=600,
            hidden_size=40,
            intermediate_size=56,
            projection_dim=24,
            num_hidden_layers=4,
            num_attention_heads=5,
            max_position_embeddings=16,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=300,
            eos_token_id=301,
            pad_token_id=0,
        ),
        bos=300,
        eos=301,
        pad=0,
        mask=True,
    ),
}


def make_clip_model(name, spec, seed):
    """CLIP text encoder fixture: config.json + model.safetensors (transformers layout),
    inputs (input_ids int64 (B, 12)[, attention_mask]) and f64 outputs: last_hidden_state,
    penultimate (hidden_states[-2]), hidden_states.0 (embeddings), pooled[, text_embeds]."""
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, spec["cls"])
    cfg = transformers.CLIPTextConfig(**spec["config"])
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out_dir = CLIP_OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    g = torch.Generator().manual_seed(seed + 1)
    length, lengths = 12, [7, 12, 3]
    ids = torch.full((len(lengths), length), spec["pad"], dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, 0] = spec["bos"]
        ids[b, 1 : n - 1] = torch.randint(3, 590, (n - 2,), generator=g)
        ids[b, n - 1] = spec["eos"]
    inputs = {"input_ids": ids}
    if spec["mask"]:
        inputs["attention_mask"] = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    save_file(inputs, out_dir / "inputs.safetensors")

    model = model.double()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == cfg.num_hidden_layers + 1
    outputs = {
        "last_hidden_state": out.last_hidden_state,
        "penultimate": hs[-2],
        "hidden_states.0": hs[0],
    }
    if hasattr(out, "pooler_output") and out.pooler_output is not None:
        outputs["pooled"] = out.pooler_output
    if getattr(out, "text_embeds", None) is not None:
        outputs["text_embeds"] = out.text_embeds
        # transformers' WithProjection output has no pooled output: recompute it.
        eos_pos = (ids == cfg.eos_token_id).int().argmax(-1)
        outputs["pooled"] = out.last_hidden_state[torch.arange(len(lengths)), eos_pos]
    if spec["mask"]:
        with torch.no_grad():
            plain = model(input_ids=ids).last_hidden_state
        outputs["last_hidden_state_no_mask"] = plain
    save_file({k: v.contiguous() for k, v in outputs.items()}, out_dir / "outputs.safetensors")
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"clip/{name}: {sum(p.numel() for p in model.parameters())} parameters, {size / 1024:.0f} KiB")


def published_clip_counts():
    import transformers

    for name, cls, kw in [
        ("clip_l", "CLIPTextModel", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, projection_dim=768)),
        ("bigg", "CLIPTextModelWithProjection", dict(hidden_size=1280, intermediate_size=5120,
                                                     num_hidden_layers=32, num_attention_heads=20,
                                                     projection_dim=1280, hidden_act="gelu")),
    ]:
        with torch.device("meta"):
            m = getattr(transformers, cls)(transformers.CLIPTextConfig(**kw))
        sd = m.state_dict()
        print(f"clip {name}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} parameters")


GROUPS = ("unet", "sampling", "vae", "clip", "t5", "cogvideox_vae", "sdxl_pipeline", "cogvideox", "sam")


def main():
    import sys

    groups = sys.argv[1:] or GROUPS
    unknown = set(groups) - set(GROUPS) - {"counts"}
    if unknown:
        raise SystemExit(f"unknown fixture groups {sorted(unknown)}; choose from {GROUPS}")
    torch.set_grad_enabled(False)
    if "unet" in groups:
        for seed, (name, spec) in enumerate(MODELS.items()):
            make(name, spec, seed=1000 + 10 * seed)
    if "sampling" in groups:
        make_sampling(seed=1500)
    if "vae" in groups:
        for seed, (name, spec) in enumerate(VAE_MODELS.items()):
            make_vae(name, spec, seed=2000 + 10 * seed)
    if "clip" in groups:
        make_clip_tokenizers()
        for seed, (name, spec) in enumerate(CLIP_MODELS.items()):
            make_clip_model(name, spec, seed=3000 + 10 * seed)
    if "cogvideox_vae" in groups:
        import fixtures_cogvideox_vae

        fixtures_cogvideox_vae.main()
    if "t5" in groups:
        from fixtures_t5 import make_t5_fixtures
        make_t5_fixtures()
    if "sdxl_pipeline" in groups:
        from fixtures_sdxl_pipeline import make_sdxl_pipeline
        make_sdxl_pipeline(seed=4000)
    if "cogvideox" in groups:
        import fixtures_cogvideox
        fixtures_cogvideox.main()
    if "sam" in groups:
        import fixtures_sam
        fixtures_sam.main()
    if "counts" in groups:
        published_vae_counts()
        published_clip_counts()


if __name__ == "__main__":
    main()
