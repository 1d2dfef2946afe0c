"""Stand-in tokenizers built offline with `tokenizers`: tests, random checkpoints and the embedded model need a
tokenizer, and none can be downloaded. They use Phi-4-multimodal's special tokens and chat format, either at the
published ids (`PHI4MM_SPECIAL_TOKENS`) or packed right after a small trained vocabulary."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The published checkpoint's ids (shared/phi4mm-reference/added_tokens.reconstructed.json and the configs).
PHI4MM_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 199999,
    "<|endoftext10|>": 200010,  # image placeholder
    "<|endoftext11|>": 200011,  # audio placeholder
    "<|assistant|>": 200019,
    "<|end|>": 200020,
    "<|user|>": 200021,
    "<|system|>": 200022,
    "<|tool|>": 200023,
    "<|/tool|>": 200024,
    "<|tool_call|>": 200025,
    "<|/tool_call|>": 200026,
    "<|tool_response|>": 200027,
    "<|tag|>": 200028,
}
PHI4MM_VOCAB_SIZE = 200064
IMAGE_TOKEN = "<|endoftext10|>"
AUDIO_TOKEN = "<|endoftext11|>"

# Phi-4-multimodal's chat format: <|system|>...<|end|><|user|>...<|end|><|assistant|>
PHI4MM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 512,
    special_tokens: Mapping[str, int] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and add Phi-4-multimodal's special tokens.

    `special_tokens` maps token -> id; the default packs them right after the trained vocabulary (a small model).
    Pass `PHI4MM_SPECIAL_TOKENS` for the published ids (a full-size stand-in).
    """
    n_special = len(PHI4MM_SPECIAL_TOKENS)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - n_special, 257),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    spec = json.loads(bpe.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    if special_tokens is None:
        start = max(vocab.values()) + 1
        special_tokens = {tok: start + i for i, tok in enumerate(PHI4MM_SPECIAL_TOKENS)}
    clash = {t: i for t, i in special_tokens.items() if i in set(vocab.values())}
    if clash:
        raise ValueError(f"special token ids collide with the trained vocabulary: {clash}")
    vocab.update(special_tokens)
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t, i in sorted(special_tokens.items(), key=lambda kv: kv[1])
    ]
    return wrap_tokenizer(Tokenizer.from_str(json.dumps(spec)))


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer with Phi-4-multimodal's roles, placeholders and chat template."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN},
    )
    tok.chat_template = PHI4MM_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids of the Phi-4-multimodal special tokens this tokenizer has."""
    out = {}
    for tok in PHI4MM_SPECIAL_TOKENS:
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is not None and i != tokenizer.unk_token_id or tok == tokenizer.unk_token:
            out[tok] = i
    return out


def vocab_size_for(tokenizer, multiple: int = 64) -> int:
    """The smallest model vocabulary (a multiple of `multiple`) that holds every id of `tokenizer`."""
    top = max(tokenizer.get_vocab().values()) + 1
    return -(-top // multiple) * multiple
