"""Checkpoint loading: config layouts, sharded safetensors, clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig, RopeScaling
from model.layers import rope_inv_freq
from model.loader import build_model, iter_safetensors, load_weights

LLAMA = dict(
    model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
)


def test_rope_theta_old_and_new_layouts_agree():
    old = ModelConfig.from_dict({**LLAMA, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_dict({**LLAMA, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}})
    assert old == new
    assert old.rope_theta == 5e5 and old.rope_scaling == RopeScaling(kind="linear", factor=2.0)
    plain = ModelConfig.from_dict(LLAMA)
    assert plain.rope_theta == 10000.0 and plain.rope_scaling.kind == "default"
    assert torch.allclose(rope_inv_freq(8, 5e5, old.rope_scaling) * 2, rope_inv_freq(8, 5e5, RopeScaling()))


def test_llama3_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf = LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = ModelConfig.from_dict({**LLAMA, "rope_parameters": params})
    assert torch.allclose(rope_inv_freq(8, ours.rope_theta, ours.rope_scaling), expected)


def test_unknown_architecture_and_rope_type_are_named():
    with pytest.raises(ValueError, match="falcon"):
        ModelConfig.from_dict({**LLAMA, "model_type": "falcon"})
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_eos_lists_and_qwen_defaults():
    cfg = ModelConfig.from_dict({**LLAMA, "model_type": "qwen2", "eos_token_id": [5, 7]})
    assert cfg.eos_token_ids == (5, 7) and cfg.attention_bias
    assert ModelConfig.from_dict({**LLAMA, "model_type": "qwen3"}).qk_norm


def test_sharded_checkpoint_loads_like_single(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2")
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    config = ModelConfig.from_hf(tmp_path)
    single, sharded = build_model(config), build_model(config)
    load_weights(single, iter_safetensors(src))
    load_weights(sharded, iter_safetensors(tmp_path))
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_and_unexpected_tensors_are_named(tiny_checkpoint):
    src = tiny_checkpoint("llama")
    config = ModelConfig.from_hf(src)
    tensors = dict(iter_safetensors(src))
    without = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_up_proj"):
        load_weights(build_model(config), without.items())
    extra = {**tensors, "model.layers.0.mystery.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mystery\.weight'"):
        load_weights(build_model(config), extra.items())
    wrong = {**tensors, "model.norm.weight": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape"):
        load_weights(build_model(config), wrong.items())
