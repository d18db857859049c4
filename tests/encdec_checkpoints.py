"""Tiny random encoder-decoder checkpoints (BART) saved by transformers, with a byte-level BPE
tokenizer whose specials sit where BART's do (<s>=0, <pad>=1, </s>=2) and which wraps a
prompt in <s> ... </s> as BART's does."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.checkpoints import CORPUS, VOCAB

BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
# Weight scales: small random post-LN models repeat one token forever at transformers' usual
# scales; these give outputs that move with the input (the shared embedding is scaled down by
# sqrt(hidden) since scale_embedding multiplies it back).
WEIGHT_STD, NORM_STD, NORM_BIAS_STD = 0.5, 0.5, 0.3


def randomize_bart(model: torch.nn.Module, hidden: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + NORM_STD * noise if name.endswith("weight") else NORM_BIAS_STD * noise)
            else:
                p.copy_(WEIGHT_STD * noise / (hidden**0.5 if "shared" in name else 1.0))
        model.final_logits_bias.copy_(0.1 * torch.randn(model.final_logits_bias.shape, generator=gen))


def build_bart_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=BART_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def build_bart(path: Path, **overrides) -> Path:
    """A random BartForConditionalGeneration (2+2 layers, hidden 64), generation defaults off
    (no forced BOS/EOS, no n-gram blocking) so greedy decoding is plain argmax."""
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    config = tf.BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=96, max_position_embeddings=128,
        forced_eos_token_id=None, forced_bos_token_id=None, scale_embedding=True, **overrides,
    )
    torch.manual_seed(0)
    model = tf.BartForConditionalGeneration(config)
    randomize_bart(model, config.d_model)
    model.save_pretrained(path)
    build_bart_tokenizer(path)
    return path


def load_bart_reference(path: Path):
    import transformers as tf

    return tf.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()


def reference_seq2seq_greedy(model, prompt: list[int], max_new_tokens: int,
                             min_new: int | None = None) -> tuple[list[int], list[float]]:
    """transformers' greedy output tokens (after the decoder start token, through EOS) and
    their raw-logit logprobs; EOS is masked for the first `min_new` tokens (default: all)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, output_logits=True,
            return_dict_in_generate=True, no_repeat_ngram_size=0, repetition_penalty=1.0, min_new_tokens=max_new_tokens if min_new is None else min_new,
        )
    tokens = out.sequences[0, 1:].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


T5_WEIGHT_STD = 0.2  # T5 does not scale q.k by 1/sqrt(d): smaller weights keep the logits float32-exact
T5_VERSIONS = {"v1.0": dict(feed_forward_proj="relu"), "v1.1": dict(feed_forward_proj="gated-gelu",
                                                                      tie_word_embeddings=False)}


def build_t5(path: Path, version: str) -> Path:
    """A random T5ForConditionalGeneration: v1.0 (ReLU, tied + scaled head) or v1.1 (gated GELU)
    with 2+2 layers, hidden 64, d_kv 16, and the BART-style tokenizer (T5's pad = decoder start = 0,
    EOS = 2 here)."""
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    config = tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                         num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, **T5_VERSIONS[version])
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + NORM_STD * noise if "norm" in name else T5_WEIGHT_STD * noise)
    model.save_pretrained(path)
    build_bart_tokenizer(path)
    return path
