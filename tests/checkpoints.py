"""Tiny random checkpoints saved by transformers (the reference implementation).

Weights are drawn with std 0.08 (norm weights around 1, random biases) so greedy decoding
is not a near-tie at every step. A small byte-level BPE tokenizer is saved beside them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

VOCAB = 384
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Working memory holds the conversation; pages are blocks.",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text: café, naïve, 東京, 🙂 emoji!",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    llama_like = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common,
    )
    if arch == "llama":  # GQA + llama3 rope scaling in the transformers-5 layout
        return tf.LlamaConfig(
            **llama_like,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        )
    if arch == "qwen2":
        return tf.Qwen2Config(**{**llama_like, "tie_word_embeddings": True})
    if arch == "qwen3":
        return tf.Qwen3Config(**{**llama_like, "num_key_value_heads": 1}, head_dim=16)
    if arch == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    raise ValueError(arch)


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.08 * noise)
            else:
                p.copy_(0.08 * noise)


def build_checkpoint(arch: str, path: Path) -> Path:
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    config = _config(arch)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    randomize(model)
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


def load_reference(path: Path):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers greedy tokens and their raw-logit logprobs."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)
    ]
    return tokens, logprobs


def bf16_copy(checkpoint: Path, dest: Path) -> Path:
    """`checkpoint` (a safetensors directory) with its weights rounded to bf16 and stored so."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, dest, dirs_exist_ok=True)
    weights = load_file(checkpoint / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, dest / "model.safetensors",
              metadata={"format": "pt"})
    return dest
