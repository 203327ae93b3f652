"""A tiny random-weight Llama built by the test suite: hidden 128, 2 heads (head_dim 64, which
vLLM's CPU attention accepts), a trained byte-level BPE tokenizer and a chat template. Loads in
~30 s; ideal for fast tests and for measuring the serving layer's own overhead."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VERSION = "v1"


def _corpus() -> list[str]:
    words = (
        "the capital of france is paris and the quick brown fox jumps over the lazy dog while "
        "robots write short stories about quantum computing in simple terms for every user who asks"
    ).split()
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)))
    return lines


def build_tiny_llama(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    return _save(path, model, tokenizer, {"chat_template.jinja": CHAT_TEMPLATE})


def _save(path: Path, model, tokenizer, extra_files: dict[str, str] | None = None) -> Path:
    """Written beside `path`, then renamed into place: a build cut short leaves no half model."""
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def tiny_llama_path(cache_root: Path) -> Path:
    path = cache_root / f"tiny-llama-{VERSION}"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_llama(path)
    return path


def build_tiny_reranker(base: Path, path: Path) -> Path:
    """The tiny Llama as a cross-encoder checkpoint, the shape of real rerankers (a
    `LlamaForSequenceClassification` with one label): its `score` head is saved with it, seeded,
    so vLLM loads every weight (a causal LM converted at load time would leave that head unset)."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(str(base), num_labels=1, torch_dtype=torch.bfloat16)
    return _save(path, model, AutoTokenizer.from_pretrained(str(base)))


def tiny_reranker_path(cache_root: Path) -> Path:
    path = cache_root / f"tiny-reranker-{VERSION}"
    if not (path / "config.json").exists():
        build_tiny_reranker(tiny_llama_path(cache_root), path)
    return path


if __name__ == "__main__":
    import sys

    print(tiny_llama_path(Path(sys.argv[1])))
