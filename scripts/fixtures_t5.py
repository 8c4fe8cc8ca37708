"""Reference fixtures for the Rust T5 encoder (crates/adm-models/src/t5.rs) and SD3's triple
text-encoder conditioning (crates/adm-models/src/sd3_text.rs). Called by make_fixtures.py
(group `t5`; run the `clip` group first: the SD3 fixture reads the tiny CLIP encoders).

Writes under crates/adm-models/tests/fixtures/t5/:
  v1_1_tiny/   T5EncoderModel, T5 v1.1 (gated-gelu, gelu_new), 8 relative-attention buckets
               with max_distance 20 (so sequences of 24 reach the clamped last bucket)
  t5_tiny/     T5EncoderModel, original T5 (relu, default 32 buckets / 128)
    config.json, model.safetensors (transformers' layout, float32), inputs.safetensors
    (input_ids int64 (3, 24), attention_mask for a padded batch) and outputs.safetensors
    (last_hidden_state with the mask, last_hidden_state_no_mask, float64 reference)
  tokenizer/   a tiny SentencePiece-unigram T5 tokenizer.json (transformers' T5Tokenizer built
               from a hand-made vocabulary) and tokens.json (its ids for a few prompts,
               padded / truncated to 12 as diffusers' _get_t5_prompt_embeds asks)
and under crates/adm-models/tests/fixtures/sd3_text/tiny/: diffusers'
StableDiffusion3Pipeline.encode_prompt (the real method, float64) with clip_l_tiny (given a
text projection, saved as clip_l_projection.safetensors: SD3's text_encoder is a
CLIPTextModelWithProjection), bigg_tiny and v1_1_tiny; the tokenizers are stand-ins that return
fixed ids (inputs.safetensors), since the tiny CLIP vocabularies are not real ones. Outputs:
prompt_embeds, pooled_prompt_embeds, and both without text_encoder_3 (T5 replaced by zeros).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "crates" / "adm-models" / "tests" / "fixtures"
T5_OUT = FIXTURES / "t5"
SD3_OUT = FIXTURES / "sd3_text"

T5_MODELS = {
    "v1_1_tiny": dict(
        vocab_size=120,
        d_model=80,
        d_kv=8,
        num_heads=4,
        d_ff=56,
        num_layers=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
    ),
    "t5_tiny": dict(
        vocab_size=120,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=48,
        num_layers=2,
        feed_forward_proj="relu",
        layer_norm_epsilon=1e-6,
    ),
}

T5_LENGTH = 24
T5_LENGTHS = [24, 9, 15]


def t5_ids(lengths, length, vocab_size, g):
    """T5 tokenizer-like ids: tokens, eos (1), pad (0)."""
    ids = torch.zeros((len(lengths), length), dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, : n - 1] = torch.randint(2, vocab_size, (n - 1,), generator=g)
        ids[b, n - 1] = 1
    return ids


def build_t5(spec, seed):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.T5Config(**spec)
    model = transformers.T5EncoderModel(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_t5_model(name, spec, seed):
    model = build_t5(spec, seed)
    out_dir = T5_OUT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)

    g = torch.Generator().manual_seed(seed + 1)
    ids = t5_ids(T5_LENGTHS, T5_LENGTH, spec["vocab_size"], g)
    mask = (torch.arange(T5_LENGTH)[None, :] < torch.tensor(T5_LENGTHS)[:, None]).long()
    inputs = {"input_ids": ids, "attention_mask": mask}
    save_file(inputs, out_dir / "inputs.safetensors")

    model = model.double()
    outputs = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        masked = model(**inputs).last_hidden_state
        plain = model(input_ids=ids).last_hidden_state
        if outputs:
            # Both attention implementations agree (the position bias reaches both).
            assert torch.allclose(masked, outputs["last_hidden_state"], atol=1e-10)
            assert torch.allclose(plain, outputs["last_hidden_state_no_mask"], atol=1e-10)
        else:
            outputs = {"last_hidden_state": masked, "last_hidden_state_no_mask": plain}
    save_file({k: v.contiguous() for k, v in outputs.items()}, out_dir / "outputs.safetensors")
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    n = sum(p.numel() for p in model.parameters())
    print(f"t5/{name}: {n} parameters, {size / 1024:.0f} KiB")


TOKENIZER_PROMPTS = [
    "a photo of a cat",
    "A  cat on the mat, photo!",
    "",
    "the cat sat on the mat of the photo of a cat on a mat",
    "zebra xylophone",
]


def make_t5_tokenizer():
    """transformers' T5Tokenizer (SentencePiece unigram via `tokenizers`) on a tiny vocabulary:
    <pad> 0, </s> 1, <unk> 2, then whole words and single characters with unigram scores."""
    import transformers

    words = ["a", "photo", "of", "cat", "the", "on", "mat", "sat", "at", "ph", "oto"]
    letters = "abcdefghijklmnopqrstuvwxyz,!"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -3.0 - 0.1 * i) for i, w in enumerate(words)]
    vocab += [(c, -6.0 - 0.01 * i) for i, c in enumerate(letters)]
    tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    out_dir = T5_OUT / "tokenizer"
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    for extra in ("tokenizer_config.json", "special_tokens_map.json", "spiece.model"):
        (out_dir / extra).unlink(missing_ok=True)
    max_length = 12
    ids = tok(TOKENIZER_PROMPTS, padding="max_length", max_length=max_length, truncation=True,
              add_special_tokens=True).input_ids
    tokens = {"prompts": TOKENIZER_PROMPTS, "max_length": max_length, "ids": ids,
              "vocab_size": len(tok)}
    (out_dir / "tokens.json").write_text(json.dumps(tokens))
    print(f"t5 tokenizer: {len(tok)} tokens; {ids[0]}")


class FixedIdsTokenizer:
    """Stands in for a tokenizer in StableDiffusion3Pipeline: returns prepared ids per prompt."""

    def __init__(self, ids_by_prompt, model_max_length):
        self.ids_by_prompt = ids_by_prompt
        self.model_max_length = model_max_length

    def __call__(self, prompt, max_length=None, **_):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        ids = torch.stack([self.ids_by_prompt[p] for p in prompts])
        if max_length is not None:
            assert ids.shape[1] == max_length, (ids.shape, max_length)
        return SimpleNamespace(input_ids=ids)


def clip_ids(lengths, length, bos, eos, pad, g):
    ids = torch.full((len(lengths), length), pad, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, 0] = bos
        ids[b, 1 : n - 1] = torch.randint(3, 290, (n - 2,), generator=g)
        ids[b, n - 1] = eos
    return ids


def make_sd3_conditioning(seed):
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    clip_dir = FIXTURES / "clip"
    clip_l = transformers.CLIPTextModelWithProjection.from_pretrained(clip_dir / "clip_l_tiny")
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(0.2 * torch.randn_like(clip_l.text_projection.weight))
    clip_g = transformers.CLIPTextModelWithProjection.from_pretrained(clip_dir / "bigg_tiny")
    t5 = transformers.T5EncoderModel.from_pretrained(T5_OUT / "v1_1_tiny")
    encoders = [m.double().eval() for m in (clip_l, clip_g, t5)]
    joint_dim = t5.config.d_model
    pooled_dim = clip_l.config.projection_dim + clip_g.config.projection_dim
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=joint_dim, caption_projection_dim=16,
        pooled_projection_dim=pooled_dim, out_channels=4, pos_embed_max_size=8,
    )

    prompts = ["a photo of a cat", "an astronaut riding a horse"]
    clip_length, t5_length = clip_l.config.max_position_embeddings, 20
    g = torch.Generator().manual_seed(seed + 1)
    ids = {
        "clip_l_ids": clip_ids([6, 16], clip_length, 598, 599, 599, g),
        "clip_g_ids": clip_ids([6, 16], clip_length, 300, 301, 0, g),
        "t5_ids": t5_ids([7, 20], t5_length, t5.config.vocab_size, g),
    }

    def tokenizer(key):
        return FixedIdsTokenizer(dict(zip(prompts, ids[key])), clip_length)

    outputs = {}
    for suffix, text_encoder_3 in (("", encoders[2]), ("_no_t5", None)):
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
            text_encoder=encoders[0], tokenizer=tokenizer("clip_l_ids"),
            text_encoder_2=encoders[1], tokenizer_2=tokenizer("clip_g_ids"),
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer("t5_ids"),
        )
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=torch.device("cpu"),
            do_classifier_free_guidance=False, max_sequence_length=t5_length,
        )
        assert embeds.dtype == torch.float64
        outputs["prompt_embeds" + suffix] = embeds
        outputs["pooled_prompt_embeds" + suffix] = pooled

    out_dir = SD3_OUT / "tiny"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"text_projection.weight": clip_l.text_projection.weight.float().contiguous()},
              out_dir / "clip_l_projection.safetensors")
    save_file(ids, out_dir / "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in outputs.items()}, out_dir / "outputs.safetensors")
    (out_dir / "config.json").write_text(json.dumps(
        {"joint_attention_dim": joint_dim, "max_sequence_length": t5_length}, indent=2))
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    print(f"sd3_text/tiny: prompt_embeds {tuple(outputs['prompt_embeds'].shape)}, "
          f"pooled {tuple(outputs['pooled_prompt_embeds'].shape)}, {size / 1024:.0f} KiB")


def make_t5_fixtures():
    for seed, (name, spec) in enumerate(T5_MODELS.items()):
        make_t5_model(name, spec, seed=4000 + 10 * seed)
    make_t5_tokenizer()
    make_sd3_conditioning(seed=4100)
