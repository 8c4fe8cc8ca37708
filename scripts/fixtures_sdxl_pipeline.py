"""Fixture group `sdxl_pipeline` of make_fixtures.py: a tiny StableDiffusionXLPipeline folder and
its float64 references, for crates/adm-models/src/sdxl.rs and the SDXL collection of
adm-collect-ode-pairs.

Writes crates/adm-models/tests/fixtures/sdxl/:

  pipeline_tiny/            the pipeline as diffusers' save_pretrained writes it (model_index.json,
                            scheduler/, text_encoder/, text_encoder_2/, unet/; no vae: collection
                            never decodes), float32 weights, WITHOUT the tokenizer folders: both
                            tokenizers are fixtures/clip/tokenizer_small/tokenizer.json, which the
                            tests copy in, with tokenizer_config.json padding as SDXL's do
                            (tokenizer: `<|endoftext|>`, tokenizer_2: `!`).
  reference.safetensors     float64: for PROMPTS, diffusers' encode_prompt outputs (prompt_embeds,
                            pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds
                            with force_zeros_for_empty_prompt = false, so the negative is the encoded
                            ""), add_time_ids, the noise (float32 values) and the latents of a
                            STEPS-step pipeline call with guidance GUIDANCE (DDIMScheduler,
                            trailing timesteps, set_alpha_to_one: the last step returns x0_hat, as
                            adm-diffusion's sampler does).
  reference.json            the prompts and settings the references were made with.

The noise is an input, noise.safetensors (`noise`, float32 (2, 4, 8, 8)): adm's own
`noise_for_index(7, i)` of pairs 0 and 1 (ChaCha12 + ziggurat, not reproducible in torch), taken
from the first shard of an `adm-collect-ode-pairs` collection with `ode_pairs.seed = 7` and
`ode_pairs.dtype = "f32"` (the collector's sdxl_collect test writes one). That test checks bit
for bit that the collector still draws this noise, then compares its stored samples with
`latents`.

The weights are a seeded random init perturbed by 0.1 N(0, 1), as the other fixtures.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "crates" / "adm-models" / "tests" / "fixtures"
OUT = FIXTURES / "sdxl"
TOKENIZER = FIXTURES / "clip" / "tokenizer_small" / "tokenizer.json"

PROMPTS = ["a photo of a cat", "An astronaut riding a horse, highly detailed!"]
STEPS = 4
GUIDANCE = 5.0
RESOLUTION = 64  # latents 8 x 8 (the pipeline's vae_scale_factor is 8 without a vae)

VOCAB = 2514  # tokenizer_small's vocabulary
TEXT_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    # SD / SDXL's legacy ids: eos_token_id 2 means "pool at the largest id".
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
TEXT_ENCODER_2 = dict(TEXT_ENCODER, hidden_size=16, hidden_act="gelu", projection_dim=8)
UNET = dict(
    sample_size=RESOLUTION // 8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    transformer_layers_per_block=1,
    attention_head_dim=2,  # diffusers' name for the number of heads
    cross_attention_dim=16 + 16,  # both encoders' widths, concatenated
    norm_num_groups=4,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=8 + 6 * 4,  # text_embeds + 6 time ids x 4
)


def perturb(model, generator_seed):
    torch.manual_seed(generator_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def tokenizer(pad):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(tokenizer_file=str(TOKENIZER), pad_token=pad, model_max_length=77)


def make_sdxl_pipeline(seed):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoder = perturb(CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)).float().eval(), seed + 1)
    text_encoder_2 = perturb(
        CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)).float().eval(), seed + 2
    )
    torch.manual_seed(seed + 3)
    unet = perturb(UNet2DConditionModel(**UNET).float().eval(), seed + 4)
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
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer("<|endoftext|>"),
        tokenizer_2=tokenizer("!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )

    folder = OUT / "pipeline_tiny"
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        folder.mkdir(parents=True)
        shutil.copy(Path(tmp) / "model_index.json", folder)
        for component in ("scheduler", "text_encoder", "text_encoder_2", "unet"):
            shutil.copytree(Path(tmp) / component, folder / component)

    pipe = pipe.to(torch.float64)
    (embeds, negative, pooled, negative_pooled) = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    add_time_ids = pipe._get_add_time_ids(
        (RESOLUTION, RESOLUTION),
        (0, 0),
        (RESOLUTION, RESOLUTION),
        dtype=torch.float64,
        text_encoder_projection_dim=TEXT_ENCODER_2["projection_dim"],
    )
    noise = load_file(OUT / "noise.safetensors")["noise"]
    assert noise.shape == (len(PROMPTS), 4, RESOLUTION // 8, RESOLUTION // 8), noise.shape
    latents = pipe(
        PROMPTS,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=noise.double(),
        output_type="latent",
    ).images
    reference = {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": negative,
        "negative_pooled_prompt_embeds": negative_pooled,
        "add_time_ids": add_time_ids,
        "noise": noise,  # a copy, so the tests read one file
        "latents": latents,
        "timesteps": pipe.scheduler.timesteps.double(),
    }
    save_file({k: v.contiguous() for k, v in reference.items()}, OUT / "reference.safetensors")
    settings = dict(prompts=PROMPTS, steps=STEPS, guidance_scale=GUIDANCE, resolution=RESOLUTION)
    (OUT / "reference.json").write_text(json.dumps(settings, indent=1) + "\n")
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(
        f"sdxl/pipeline_tiny: unet {sum(p.numel() for p in unet.parameters())} parameters, "
        f"{size / 1024:.0f} KiB in all, prompt_embeds {list(embeds.shape)}, "
        f"|latents| max {latents.abs().max():.4f}, timesteps {pipe.scheduler.timesteps.tolist()}"
    )
