"""Tiny random-weight Phi-4-multimodal checkpoints in the transformers-native layout, made by transformers + peft
themselves: for tests, benchmarks and trying a port without downloading anything."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .model import PHI4MM_LORA_TARGETS
from .tokenizer import build_tokenizer, vocab_size_for

CORPUS = [
    "hello world what color is the circle",
    "the red square and the blue star are here",
    "transcribe the audio clip into text",
    "answer the spoken question about the image",
    "zero one two three four five six seven eight nine",
    "how many shapes are there yes no green yellow orange purple black white triangle",
]


def tiny_tokenizer(vocab_size: int = 400):
    return build_tokenizer(CORPUS * 20, vocab_size=vocab_size)


def tiny_config(tokenizer, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 64, vision_hidden: int = 32, vision_layers: int = 1, audio_hidden: int = 32,
                audio_blocks: int = 1, crop_size: int = 448, patch_size: int = 14, **overrides):
    """A small `Phi4MultimodalConfig` whose token ids come from `tokenizer`."""
    from transformers import Phi4MultimodalConfig

    ids = tokenizer.convert_tokens_to_ids
    cfg = dict(
        vocab_size=vocab_size_for(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[ids("<|end|>"), tokenizer.eos_token_id],
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        vision_config=dict(
            hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
            num_attention_heads=2, image_size=crop_size, crop_size=crop_size, patch_size=patch_size,
            image_token_id=ids("<|endoftext10|>"),
        ),
        audio_config=dict(
            hidden_size=audio_hidden, intermediate_size=audio_hidden * 3 // 2, num_blocks=audio_blocks,
            num_attention_heads=2, ext_pw_out_channel=audio_hidden, depthwise_separable_out_channel=audio_hidden,
            nemo_conv_channels=16, bias_max_distance=100, audio_token_id=ids("<|endoftext11|>"),
        ),
    )
    cfg.update(overrides)
    return Phi4MultimodalConfig(**cfg)


def make_tiny_checkpoint(out_dir: str | Path, *, seed: int = 0, lora_ranks: dict[str, int] | None = None,
                         dtype: torch.dtype = torch.float32, lora_targets=PHI4MM_LORA_TARGETS,
                         **config_overrides) -> Path:
    """Write a random tiny model in the transformers-native layout: model, tokenizer, processor, and peft
    adapters `vision-lora/` and `speech-lora/` made by peft with `init_lora_weights=False` (so B != 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM,
                              Phi4MultimodalImageProcessor, Phi4MultimodalProcessor)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    cfg = tiny_config(tok, **config_overrides)
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(cfg).eval()
    # SigLIP / separators start at zero in transformers' init: make them random so the vision path is exercised
    with torch.no_grad():
        emb = model.model.embed_tokens_extend.image_embed
        emb.global_img_feature_extensor.normal_(0, 0.5)
        emb.sub_img_feature_extensor.normal_(0, 0.5)
    model.to(dtype)
    model.save_pretrained(str(out))
    crop = cfg.vision_config.crop_size
    proc = Phi4MultimodalProcessor(
        Phi4MultimodalImageProcessor(size={"height": crop, "width": crop}, patch_size=cfg.vision_config.patch_size),
        Phi4MultimodalFeatureExtractor(),
        tok,
    )
    proc.save_pretrained(str(out))
    ranks = lora_ranks or {"vision": 8, "speech": 6}
    torch.manual_seed(seed + 1)
    peft_model = None
    for name, r in ranks.items():
        lcfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=lora_targets, init_lora_weights=False,
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        if peft_model is None:
            peft_model = get_peft_model(model, lcfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, lcfg)
    # peft keeps adapters in fp32 beside a lower-precision base; the published checkpoint stores them in its dtype
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        for name in ranks:
            src = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
            dst = out / f"{name}-lora"
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*[n for n in ranks if n != name], "README.md"))
    return out
