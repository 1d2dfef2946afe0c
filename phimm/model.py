"""Model composition: a frozen base decoder, a vision encoder + projector, a speech encoder + its projectors, and
named LoRA adapters on the decoder's projections, each batch row with its own adapter and audio projector.

The Phi-4-multimodal family reuses transformers' `phi4_multimodal` modules (SigLIP, the conformer, the decoder
and its attention); phimm only decides, per row, which projector and which adapter take part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adapters import AdapterDataError, LoraAdapter, LoraLinear, RowAdapters, find_targets, wrap_targets
from routers import AudioProjector

from .errors import AdapterError, RouteError

# Phi-4-multimodal's LoRA targets: the four projections of every decoder layer.
PHI4MM_LORA_TARGETS = r"model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj))"


@dataclass
class ImageInput:
    """One processed image: HD crops (global first), their patch masks, the padded HD size, its token count."""

    pixel_values: torch.Tensor  # [crops, 3, crop, crop]
    attention_mask: torch.Tensor  # [crops, crop/patch, crop/patch]
    size: tuple[int, int]  # (height, width) after the HD transform
    num_tokens: int


@dataclass
class AudioInput:
    """One processed audio clip: log-mel features and how many LM tokens the encoder makes of them."""

    features: torch.Tensor  # [frames, mel]
    num_tokens: int
    seconds: float


class Phi4MMComposition(nn.Module):
    """The Phi-4-multimodal family: transformers' `Phi4MultimodalForCausalLM` as the module tree (so its
    checkpoints load as they are), with per-row LoRA and per-row audio projectors added around it."""

    family = "phi4_multimodal"

    def __init__(self, hf_model: nn.Module, adapters: Mapping[str, LoraAdapter] = (), lora_targets: str = PHI4MM_LORA_TARGETS):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config
        self.lora_targets = lora_targets
        self.rows = RowAdapters()
        self.adapter_names: list[str] = []
        self.adapter_info: dict[str, LoraAdapter] = {}
        self._targets: dict[str, LoraLinear] = {}
        for adapter in dict(adapters).values():
            self.add_adapter(adapter)

    # ---- parts -------------------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.hf.model

    @property
    def image_token_id(self) -> int:
        return self.config.vision_config.image_token_id

    @property
    def audio_token_id(self) -> int:
        return self.config.audio_config.audio_token_id

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def audio_projectors(self) -> set[AudioProjector]:
        return {AudioProjector.SPEECH, AudioProjector.VISION_SPEECH}

    # ---- adapters ----------------------------------------------------------------------------------------
    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Attach `adapter` (validated against the base first: nothing changes if it does not fit)."""
        if adapter.name in self.adapter_info:
            raise AdapterError(f"an adapter named {adapter.name!r} is already loaded")
        modules = find_targets(self.hf, self.lora_targets)
        try:
            adapter.validate(modules)
        except AdapterDataError as e:
            raise AdapterError(str(e)) from e
        self._targets.update(wrap_targets(self.hf, adapter.weights.keys(), self.rows))
        index = len(self.adapter_names)
        for path, (a, b) in adapter.weights.items():
            self._targets[path].set_adapter_weights(index, a, b, adapter.scale)
        self.adapter_names.append(adapter.name)
        self.adapter_info[adapter.name] = adapter
        self.rows.ranks.append(adapter.r)
        for mod in self._targets.values():
            mod._stacked = None

    def adapter_index(self, name: str | None) -> int | None:
        return None if name is None else self.adapter_names.index(name)

    def set_row_adapters(self, names: Sequence[str | None]) -> None:
        self.rows.set([self.adapter_index(n) for n in names], device=self.device, dtype=self.dtype)

    def export_adapter(self, name: str) -> LoraAdapter:
        """The adapter as loaded (its original tensors), for saving."""
        return self.adapter_info[name]

    # ---- embeddings ----------------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def image_features(self, image: ImageInput) -> torch.Tensor:
        """`[num_tokens, hidden]` LM embeddings of one image (SigLIP -> HD arrangement -> projector)."""
        emb = self.decoder.embed_tokens_extend.image_embed
        n = image.num_tokens
        ids = torch.full((1, n), self.image_token_id, device=self.device)
        zeros = torch.zeros(1, n, self.config.hidden_size, dtype=self.dtype, device=self.device)
        out = emb(
            ids,
            zeros,
            image_pixel_values=image.pixel_values.unsqueeze(0).to(self.device),
            image_sizes=torch.tensor([image.size], device=self.device),
            image_attention_mask=image.attention_mask.unsqueeze(0).to(self.device),
        )
        return out[0]

    def audio_features(self, audio: AudioInput, projector: AudioProjector) -> torch.Tensor:
        """`[num_tokens, hidden]` LM embeddings of one clip through the chosen projector."""
        emb = self.decoder.embed_tokens_extend.audio_embed
        n = audio.num_tokens
        ids = torch.full((1, n), self.audio_token_id, device=self.device)
        zeros = torch.zeros(1, n, self.config.hidden_size, dtype=self.dtype, device=self.device)
        mode = "speech" if projector is AudioProjector.SPEECH else "vision"
        out = emb(
            ids,
            zeros,
            audio_input_features=audio.features.unsqueeze(0).to(self.device),
            audio_embed_sizes=torch.tensor([n], device=self.device),
            audio_attention_mask=None,
            audio_projection_mode=mode,
        )
        return out[0]

    # ---- decoder -------------------------------------------------------------------------------------------
    def decode(self, inputs_embeds, attention_mask, position_ids, cache) -> torch.Tensor:
        """Run the frozen decoder (LoRA per row as set by `set_row_adapters`); returns last hidden states."""
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(hidden)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def check_route(self, adapter: str | None, projector: AudioProjector | None) -> None:
        if adapter is not None and adapter not in self.adapter_info:
            from .errors import UnknownAdapterError

            raise UnknownAdapterError(
                f"unknown adapter {adapter!r}; this model has {self.adapter_names or 'no adapters'}"
            )
        if projector is not None and projector not in self.audio_projectors():
            raise RouteError(f"this checkpoint has no {projector.value} audio projector")
