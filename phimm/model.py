"""Model composition: a frozen base decoder, a vision encoder + projector, a speech encoder + its projectors, and
named LoRA adapters on the decoder's projections, each batch row with its own adapter and audio projector.

The Phi-4-multimodal family reuses transformers' `phi4_multimodal` modules (SigLIP, the conformer, the decoder
and its attention); phimm only decides, per row, which projector and which adapter take part.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adapters import NO_ADAPTER, AdapterDataError, LoraAdapter, LoraLinear, RowAdapters, find_targets, wrap_targets
from routers import AudioProjector

from .errors import AdapterError, PlaceholderError, RouteError
from .types import AudioInput, ImageInput, hd_grid, tensor_digest

def _cache_kwarg_of(decoder: nn.Module) -> str:
    """A decoder's name for its cache argument: `cache` from transformers 5.24 (`past_key_values` is then
    deprecated and warns), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


# Phi-4-multimodal's LoRA targets: the four projections of every decoder layer.
PHI4MM_LORA_TARGETS = r"model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj))"
# What an adapter may target: any linear layer. In the decoder each batch row gets its own adapter; the encoders
# run per prefill group, all of whose rows share one adapter, so a LoRA inside an encoder applies as peft would.
ANY_LINEAR = r".+"
CROPS_PER_CALL = 64  # image crops through the vision encoder in one call, at most


def _vision_tower(hf_model):
    """The SigLIP module of a `Phi4MultimodalForCausalLM`, or None for a model without one."""
    embed = getattr(getattr(hf_model, "model", None), "embed_tokens_extend", None)
    return getattr(getattr(embed, "image_embed", None), "img_processor", None)


def _skip_unused_vision_head(hf_model) -> None:
    """SigLIP's pooling head: Phi-4-multimodal reads hidden_states[-2] and never the head's output, and in bf16 on
    CPU its nn.MultiheadAttention allocates ~5 GB for a moment at full size. Its weights stay in the state dict
    (checkpoints keep their keys); only its forward is skipped."""
    head = getattr(_vision_tower(hf_model), "head", None)
    if head is not None:
        head.forward = lambda hidden_state, attention_mask=None: None


def make_vision_attention_bidirectional(hf_model) -> int:
    """SigLIP attends bidirectionally (the original remote code does), but transformers' Phi-4-multimodal vision
    attention sets `is_causal = True`. With a padding mask its sdpa call ignores that flag; without one (a crop
    with no padding, or a batch of such crops) it runs causal attention, so the same crop is encoded differently
    depending on whether any crop in the batch is padded. phimm clears the flag on every vision attention layer,
    which makes every crop bidirectional as SigLIP is. Returns how many layers were changed."""
    tower = _vision_tower(hf_model)
    n = 0
    for mod in tower.modules() if tower is not None else ():
        if getattr(mod, "is_causal", False) is True:
            mod.is_causal = False
            n += 1
    return n


class FeatureCache:
    """Encoder + projector outputs of recently seen media (a multi-turn chat about one image encodes it once).
    Keyed by a hash of the processed input, so a hit returns exactly what the encoder would."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(*parts) -> bytes:
        return tensor_digest(*parts)

    def clear(self) -> None:
        self.entries.clear()

    def get(self, key: bytes) -> torch.Tensor | None:
        hit = self.entries.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return hit

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)



class MixtureModel(nn.Module):
    """What every model phimm runs shares: a frozen causal LM (`hf`, a transformers `...ForCausalLM`) whose
    linear layers take named LoRA adapters, each batch row with its own (`row_adapters`), and media features
    merged where a row's placeholder tokens are (`embed_inputs`). Subclasses say how images and audio become
    features (`image_features`, `audio_features`) and which token ids hold their place."""

    family = "mixture"

    def __init__(self, hf_model: nn.Module, adapters: Mapping[str, LoraAdapter] = (),
                 lora_targets: str = ANY_LINEAR):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config
        self.lora_targets = lora_targets
        self.adapter_names: list[str] = []
        self.adapter_info: dict[str, LoraAdapter] = {}
        self._targets: dict[str, LoraLinear] = {}
        self.feature_cache = FeatureCache()
        self.weight_format = "dense"  # or "packed", "int8": set by phimm.quant
        self.cache_kwarg = _cache_kwarg_of(self.decoder)
        from . import attention, norm  # decode steps: GQA against the cache without per-head K/V copies

        if attention.ENABLED:
            attention.use_for_decoder(hf_model)
        if norm.ENABLED:  # the decoder's RMSNorms in one pass over each row
            norm.use_for_decoder(self.decoder)
        for adapter in dict(adapters).values():
            self.add_adapter(adapter)

    @property
    def decoder(self) -> nn.Module:
        """The decoder stack (`embed_tokens`, `layers`, `norm`, `rotary_emb`) under the LM head."""
        return self.hf.model

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def mixed_steps(self) -> bool:
        """Whether one decoder forward may prefill joining rows while it decodes the running ones
        (`phimm.step.MixedStep`): only on phimm's attention function, which hands such a forward's attention to
        the step."""
        from . import attention

        return getattr(self.hf.config, "_attn_implementation", None) == attention.NAME

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def embedding(self) -> nn.Module:
        """The decoder's input embedding module (looked up once: a step asks for it, and for `device`, often)."""
        emb = self.__dict__.get("_embedding")
        if emb is None:
            emb = self.__dict__["_embedding"] = self.hf.get_input_embeddings()
        return emb

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
        self._targets.update(wrap_targets(self.hf, adapter.weights.keys()))
        index = len(self.adapter_names)
        for path, (a, b) in adapter.weights.items():
            self._targets[path].set_adapter_weights(index, a, b, adapter.scale)
        self.adapter_names.append(adapter.name)
        self.adapter_info[adapter.name] = adapter

    def adapter_index(self, name: str | None) -> int | None:
        return None if name is None else self.adapter_names.index(name)

    def row_adapters(self, names: Sequence[str | None]) -> RowAdapters:
        """The per-row adapter argument of one forward: `names[i]` is row i's adapter (None: the base alone)."""
        index = {n: i for i, n in enumerate(self.adapter_names)}
        index[None] = None
        info = [self.adapter_info[n] for n in self.adapter_names]
        weight = self.embedding.weight
        return RowAdapters.for_rows([index[n] for n in names], [a.r for a in info], [a.scale for a in info],
                                    device=weight.device, dtype=weight.dtype)

    def export_adapter(self, name: str) -> LoraAdapter:
        """The adapter as loaded (its original tensors), for saving."""
        return self.adapter_info[name]

    # ---- embeddings ----------------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def image_features(self, images: Sequence[ImageInput], rows: RowAdapters = NO_ADAPTER) -> list[torch.Tensor]:
        """`[num_tokens, hidden]` LM embeddings for each image, all of them through the encoder in one call
        (`_image_features`), recently seen ones from the feature cache. `rows`: one adapter for all (it matters
        only where an adapter targets the encoder)."""
        keys = [self.feature_cache.key(img.digest(), rows.uniform)
                for img in images]
        return self._cached(keys, images, self._image_features, rows)

    def _cached(self, keys: Sequence[bytes], items: Sequence, encode, rows: RowAdapters) -> list[torch.Tensor]:
        """Each item's features: from the feature cache, or `encode(missing items)` in one call on `rows`."""
        hits = [self.feature_cache.get(k) for k in keys]
        todo = [x for x, h in zip(items, hits) if h is None]
        fresh = iter([])
        if todo:
            with rows.active():
                fresh = iter(encode(todo))
        out = []
        for k, h in zip(keys, hits):
            if h is None:
                h = next(fresh)
                self.feature_cache.put(k, h)
            out.append(h)
        return out

    def audio_features(self, audio: AudioInput, projector: AudioProjector,
                       rows: RowAdapters = NO_ADAPTER) -> torch.Tensor:
        """`[num_tokens, hidden]` LM embeddings of one clip through the chosen projector."""
        return self.audio_features_batch([audio], projector, rows)[0]

    def audio_features_batch(self, audios: Sequence[AudioInput], projector: AudioProjector,
                             rows: RowAdapters = NO_ADAPTER) -> list[torch.Tensor]:
        """`audio_features` of several clips of equal length in one encoder call (each also cached)."""
        keys = [self.feature_cache.key(a.digest(), projector.value, rows.uniform) for a in audios]
        return self._cached(keys, audios, lambda todo: self._audio_features(todo, projector), rows)

    def _image_features(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Each image's `[num_tokens, hidden]` features (the encoder and projector, no cache)."""
        raise NotImplementedError(f"{type(self).__name__} takes no images")

    def _audio_features(self, audios: Sequence[AudioInput], projector: AudioProjector) -> list[torch.Tensor]:
        """Each clip's `[num_tokens, hidden]` features through `projector` (clips of one length; no cache)."""
        raise NotImplementedError(f"{type(self).__name__} takes no audio")

    def prefetch_media(self, rows: Sequence[tuple[Sequence[ImageInput], Sequence[AudioInput], AudioProjector | None,
                                                  str | None]]) -> dict:
        """Encode the media of several rows (each `(images, audios, audio projector, adapter name)`) in as few
        encoder calls as possible: every image of the rows on one adapter through SigLIP together, every clip of
        one length, projector and adapter through the conformer together (equal lengths: no padding, so each
        clip's features are those it gets alone). Returns what `embed_inputs(..., prefetched=)` takes."""
        out: dict = {}
        images: dict = {}
        clips: dict = {}
        for imgs, auds, projector, adapter in rows:
            images.setdefault(adapter, []).extend(imgs)
            if projector is not None:
                for a in auds:
                    clips.setdefault((adapter, projector, tuple(a.features.shape), a.num_tokens), []).append(a)
        for adapter, imgs in images.items():
            if imgs:
                rows_arg = self.row_adapters([adapter])
                for img, f in zip(imgs, self.image_features(imgs, rows_arg)):
                    out[("image", id(img), rows_arg.uniform)] = f
        for (adapter, projector, _, _), auds in clips.items():
            rows_arg = self.row_adapters([adapter])
            for a, f in zip(auds, self.audio_features_batch(auds, projector, rows_arg)):
                out[("audio", id(a), projector, rows_arg.uniform)] = f
        return out

    def embed_inputs(self, input_ids: torch.Tensor, media: Sequence[tuple[Sequence[ImageInput],
                     Sequence[AudioInput], AudioProjector | None]], rows: RowAdapters = NO_ADAPTER,
                     prefetched: dict | None = None) -> torch.Tensor:
        """`[k, T, D]` input embeddings of `k` rows of token ids `[k, T]`, with each row's media features put
        where its placeholder tokens are. `media[j]`: row j's (images, audios, audio projector). All images of
        all rows go through the vision encoder in one call. `prefetched`: features `prefetch_media` made for
        these media (what it lacks is encoded here). Raises `PlaceholderError` when a row's placeholder count
        differs from its features' rows."""
        placeholders = (input_ids == self.image_token_id) | (input_ids == self.audio_token_id)
        # placeholder ids added to a base model's tokenizer lie beyond its embeddings: looked up as id 0, replaced
        emb = self.embed_tokens(input_ids.masked_fill(placeholders, 0))  # [k, T, D]
        pre = prefetched or {}
        images = [img for imgs, _, _ in media for img in imgs]
        have = [pre.get(("image", id(img), rows.uniform)) for img in images]
        if images and any(h is None for h in have):
            have = self.image_features(images, rows)
        image_feats = iter(have) if images else None
        for j, (imgs, auds, projector) in enumerate(media):
            for kind, token_id, items in (("image", self.image_token_id, imgs), ("audio", self.audio_token_id, auds)):
                if not items:
                    continue
                if kind == "image":
                    feats = torch.cat([next(image_feats) for _ in items])
                else:
                    if projector is None:
                        raise RouteError("a row with audio needs an audio projector in its route")
                    parts = []
                    for a in items:
                        f = pre.get(("audio", id(a), projector, rows.uniform))
                        parts.append(f if f is not None else self.audio_features(a, projector, rows))
                    feats = torch.cat(parts)
                where = input_ids[j] == token_id
                n = int(where.sum())
                if n != feats.shape[0]:
                    raise PlaceholderError(f"row {j} has {n} {kind} placeholder tokens but its {len(items)} "
                                           f"{kind}(s) give {feats.shape[0]} feature rows")
                emb[j, where] = feats.to(emb.dtype)
        return emb

    # ---- decoder -------------------------------------------------------------------------------------------
    def decode(self, inputs_embeds, attention_mask, position_ids, cache, rows: RowAdapters = NO_ADAPTER
               ) -> torch.Tensor:
        """Run the frozen decoder with each row's LoRA as `rows` says (`row_adapters(names)`); returns the last
        hidden states `[B, T, D]`."""
        with rows.active():
            out = self.decoder(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
        return out.last_hidden_state

    @torch.inference_mode()
    def route_features(self, prepared) -> torch.Tensor:
        """A learned router's input: the base model's (no adapter) last hidden states over the prompt, media
        through the projectors the modalities choose, averaged over the positions: `[hidden]`, float32, CPU."""
        from routers import projector_for

        ids = torch.tensor([prepared.input_ids], dtype=torch.long, device=self.device)
        media = [(prepared.images, prepared.audios, projector_for(prepared.route_input))]
        embeds = self.embed_inputs(ids, media, NO_ADAPTER)
        out = self.decoder(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=False)
        return out.last_hidden_state[0].float().mean(0).cpu()

    def logits(self, hidden: torch.Tensor, rows: RowAdapters = NO_ADAPTER) -> torch.Tensor:
        """The output head on `hidden`, each row with its adapter where one targets the head."""
        with rows.active():
            return self.hf.lm_head(hidden)


class Phi4MMComposition(MixtureModel):
    """The Phi-4-multimodal family: transformers' `Phi4MultimodalForCausalLM` as the module tree (so its
    checkpoints load as they are), its SigLIP with the HD crop layout and its conformer with the speech and
    vision-speech projectors, per-row LoRA and per-row audio projectors added around it."""

    family = "phi4_multimodal"

    def __init__(self, hf_model: nn.Module, adapters: Mapping[str, LoraAdapter] = (),
                 lora_targets: str = ANY_LINEAR):
        _skip_unused_vision_head(hf_model)
        make_vision_attention_bidirectional(hf_model)
        super().__init__(hf_model, adapters, lora_targets)

    @property
    def image_token_id(self) -> int:
        return self.config.vision_config.image_token_id

    @property
    def audio_token_id(self) -> int:
        return self.config.audio_config.audio_token_id

    def _image_features(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        emb = self.decoder.embed_tokens_extend.image_embed
        dtype = emb.img_processor.embeddings.patch_embedding.weight.dtype
        crops = torch.cat([img.pixel_values for img in images]).to(self.device, dtype)
        masks = torch.cat([img.attention_mask for img in images]).to(self.device, torch.bool)
        # [crops, f*f, C], at most CROPS_PER_CALL crops per SigLIP call: a prefill bucket's images together must
        # not hold every crop's attention at once
        feats = torch.cat([emb.get_img_features(crops[i:i + CROPS_PER_CALL], attention_mask=masks[i:i + CROPS_PER_CALL])
                           for i in range(0, crops.shape[0], CROPS_PER_CALL)])
        f = int(round(feats.shape[1] ** 0.5))
        C = feats.shape[-1]
        crop = emb.crop_size
        out, start = [], 0
        for img in images:
            n = img.pixel_values.shape[0]
            h_ratio, w_ratio, useful_h, useful_w = hd_grid(img.attention_mask, img.size, crop, f)
            own = feats[start : start + n]
            start += n
            glb = own[0].reshape(f, f, C)
            glb = torch.cat([glb, emb.sub_img_feature_extensor[0].expand(f, 1, C)], dim=1).reshape(-1, C)
            sub = own[1 : 1 + h_ratio * w_ratio].reshape(h_ratio, w_ratio, f, f, C)
            sub = sub.transpose(1, 2).reshape(h_ratio * f, w_ratio * f, C)
            sub = sub[:useful_h, :useful_w]
            sub = torch.cat([sub, emb.sub_img_feature_extensor[0].expand(useful_h, 1, C)], dim=1).reshape(-1, C)
            layout = torch.cat([sub, emb.global_img_feature_extensor[0], glb])  # [num_tokens, C]
            proj = emb.img_projection_down(nn.functional.gelu(emb.img_projection_up(layout.contiguous())))
            if proj.shape[0] != img.num_tokens:
                raise RouteError(f"image features give {proj.shape[0]} tokens, the prompt has {img.num_tokens}")
            out.append(proj)
        return out


    def _audio_features(self, audios: Sequence[AudioInput], projector: AudioProjector) -> list[torch.Tensor]:
        emb = self.decoder.embed_tokens_extend.audio_embed
        b, n = len(audios), audios[0].num_tokens
        ids = torch.full((b, n), self.audio_token_id, device=self.device)
        zeros = torch.zeros(b, n, self.config.hidden_size, dtype=self.dtype, device=self.device)
        mode = "speech" if projector is AudioProjector.SPEECH else "vision"
        feats = emb(ids, zeros, audio_input_features=torch.stack([a.features for a in audios]).to(self.device),
                    audio_embed_sizes=torch.tensor([n] * b, device=self.device), audio_attention_mask=None,
                    audio_projection_mode=mode)
        return list(feats)
