"""Tiny random BERT-family checkpoints saved by transformers, with a WordPiece tokenizer
and (optionally) a sentence-transformers pooling config beside them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.checkpoints import CORPUS, randomize

ENCODER_VOCAB = 200
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=ENCODER_VOCAB, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"cls_token": "[CLS]", "sep_token": "[SEP]",
                                                            "pad_token": "[PAD]"}))


def write_pooling(path: Path, mode_key: str, normalize: bool, max_seq_length: int | None = None) -> None:
    """modules.json + 1_Pooling/config.json (+ sentence_bert_config.json) as sentence-transformers saves them."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    keys = ["pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
            "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_lasttoken"]
    (path / "1_Pooling" / "config.json").write_text(json.dumps({k: k == mode_key for k in keys}))
    if max_seq_length is not None:
        (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))


def build_encoder(arch: str, path: Path, **config_overrides) -> Path:
    """arch: bert | roberta. A random BertModel / RobertaModel saved with save_pretrained."""
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    build_wordpiece_tokenizer(path)
    common = dict(vocab_size=ENCODER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, **config_overrides)
    if arch == "bert":
        model = tf.BertModel(tf.BertConfig(**common, type_vocab_size=2, pad_token_id=0))
    elif arch == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(**common, type_vocab_size=1, pad_token_id=0,
                                                 hidden_act="gelu_new"))
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    randomize(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # randomize() keys norms on "norm"/"ln_": BERT's are "LayerNorm"
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    return path


def reference_hidden(path: Path, inputs: list[list[int]]) -> list[torch.Tensor]:
    """transformers' last hidden states, one input at a time (no padding): [len, hidden] each."""
    import transformers as tf

    model = tf.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).last_hidden_state[0] for ids in inputs]
