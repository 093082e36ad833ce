"""A tiny real chat tokenizer made on the fly: byte-level BPE trained by the `tokenizers` library on a small
fixed corpus, with ChatML special tokens and a ChatML chat template (the Qwen2 layout). It is saved as vocab.json
+ merges.txt + tokenizer.json + tokenizer_config.json, so transformers 5 loads it next to a `qwen2` config as a
Qwen2Tokenizer rebuilt from vocab and merges, exactly as it loads a real Qwen checkpoint. Nothing reaches the
network."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS_WORDS = ("the model answers every question with care and a short proof; numbers such as 12, 345 and "
                "6789 appear in code like def add(a, b): return a + b, while algebra asks to solve x^2 - 4 = 0 "
                "for x. You are a helpful assistant. system user assistant").split()


def corpus(lines: int = 400) -> list[str]:
    """Deterministic training text: rotations of the word list."""
    words = list(CORPUS_WORDS)
    return [" ".join(words[i % len(words):] + words[:i % len(words)]) for i in range(lines)]


def save_chat_tokenizer(path: Path, *, vocab_size: int = 384) -> int:
    """Train and save the tokenizer into `path` (made if missing); returns the size of its vocabulary, which
    the model's vocab_size must cover."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus(), trainer=trainer)
    backend.save(str(path / "tokenizer.json"))
    backend.model.save(str(path))  # vocab.json + merges.txt
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "add_prefix_space": False,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(backend.token_to_id(token)): {"content": token, "special": True, "lstrip": False,
                                              "rstrip": False, "normalized": False, "single_word": False}
            for token in SPECIAL_TOKENS
        },
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return backend.get_vocab_size()
