"""The reference implementation phimm is checked against: transformers' `Phi4MultimodalForCausalLM` with the
checkpoint's peft adapters, one request at a time, the adapter switched by hand as its users do."""

from __future__ import annotations

from pathlib import Path

import torch


class Reference:
    def __init__(self, ckpt: Path, dtype=torch.float32):
        from transformers import Phi4MultimodalProcessor

        from phimm.bench import reference_model

        self.model = reference_model(ckpt, dtype)
        self.processor = Phi4MultimodalProcessor.from_pretrained(str(ckpt))
        self.tokenizer = self.processor.tokenizer

    def inputs(self, prompt: str, images=(), audios=()):
        """`prompt` uses the raw placeholder tokens, as transformers' processor expects."""
        kwargs = {}
        if images:
            kwargs["images"] = list(images)
        if audios:
            kwargs["audio"] = [a for a, _ in audios]
            kwargs["sampling_rate"] = audios[0][1]
        return self.processor(text=prompt, return_tensors="pt", **kwargs)

    def _adapter_ctx(self, adapter):
        import contextlib

        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    @torch.no_grad()
    def first_logits(self, inputs, adapter) -> torch.Tensor:
        with self._adapter_ctx(adapter):
            return self.model(**inputs).logits[0, -1].float()

    @torch.no_grad()
    def generate(self, inputs, adapter, max_new_tokens: int) -> list[int]:
        with self._adapter_ctx(adapter):
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()
