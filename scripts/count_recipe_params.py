"""Counts the parameters of every committed model config (configs/models) with diffusers /
transformers, on the meta device (nothing is allocated). The counts are the constants of
crates/adm-train/tests/recipes.rs: a config that differs from the published one changes them.

The count is that of the checkpoint's tensors (the state dict: parameters and persistent
buffers), which is what adm-models builds; where they differ (SD3's saved position table is a
buffer) the parameters alone are printed too.

    /work/venv/bin/python scripts/count_recipe_params.py
"""

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    CogVideoXTransformer3DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    SamVisionConfig,
    T5Config,
    T5EncoderModel,
)
from transformers.models.sam.modeling_sam import SamVisionEncoder

ROOT = Path(__file__).resolve().parent.parent / "configs" / "models"


def count(module, prefix=None):
    wanted = lambda name: prefix is None or name.startswith(prefix)  # noqa: E731
    # named_parameters counts tied weights (T5's shared / embed_tokens) once.
    params = sum(p.numel() for name, p in module.named_parameters() if wanted(name))
    persistent = module.state_dict().keys()
    buffers = sum(b.numel() for name, b in module.named_buffers() if wanted(name) and name in persistent)
    return params if buffers == 0 else f"{params + buffers} (parameters {params})"


def diffusers_model(cls, path):
    return cls.from_config(cls.load_config(str(path.parent)))


def text(path):
    cfg = json.loads(path.read_text())
    if cfg["architectures"][0] == "T5EncoderModel":
        return T5EncoderModel(T5Config(**cfg))
    cls = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    return cls[cfg["architectures"][0]](CLIPTextConfig(**cfg))


def main():
    with torch.device("meta"):
        for path in sorted(ROOT.glob("*/*/config.json")):
            name = f"{path.parent.parent.name}/{path.parent.name}"
            cfg = json.loads(path.read_text())
            kind = cfg.get("_class_name") or cfg.get("model_type")
            if kind == "UNet2DConditionModel":
                print(name, count(diffusers_model(UNet2DConditionModel, path)))
            elif kind == "SD3Transformer2DModel":
                print(name, count(diffusers_model(SD3Transformer2DModel, path)))
            elif kind == "CogVideoXTransformer3DModel":
                print(name, count(diffusers_model(CogVideoXTransformer3DModel, path)))
            elif kind == "AutoencoderKL":
                print(name, count(diffusers_model(AutoencoderKL, path)))
            elif kind == "AutoencoderKLCogVideoX":
                # adm-models builds the decoder only (the encoder is not needed for training).
                vae = diffusers_model(AutoencoderKLCogVideoX, path)
                print(name, "decoder", count(vae, "decoder."), "full", count(vae))
            elif kind == "sam_vision_model":
                print(name, count(SamVisionEncoder(SamVisionConfig(**cfg))))
            else:
                print(name, count(text(path)))


if __name__ == "__main__":
    main()
