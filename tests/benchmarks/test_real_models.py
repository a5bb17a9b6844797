"""The shipped hub configs (configs/hf) build the real architectures; the padded stand-in tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from demo.tiny import GEMMA4_CHAT_TEMPLATE as CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[2]


def _benchmark_module(name: str):
    """A benchmark script's module, loaded from its file (benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_real_models = _benchmark_module("real_models")
CONFIGS, GEMMA4_NAMED, GEMMA4_SPECIAL = _real_models.CONFIGS, _real_models.GEMMA4_NAMED, _real_models.GEMMA4_SPECIAL
padded_tokenizer, shrink_gemma4_text = _real_models.padded_tokenizer, _real_models.shrink_gemma4_text

# Published sizes (parameters with embeddings): 268M, 1.0B, 5.1B, 8B.
SIZES = {"gemma-3-270m": 0.268e9, "gemma-3-1b-it": 1.0e9, "gemma-4-E2B-it": 5.10e9, "gemma-4-E4B-it": 7.94e9}


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_config_builds_the_published_size(name):
    config = AutoConfig.from_pretrained(CONFIGS / name)
    n = sum(p.numel() for p in _meta_model(config).parameters())
    assert abs(n - SIZES[name]) / SIZES[name] < 0.01, f"{name}: {n / 1e9:.3f}B parameters"
    assert (CONFIGS / name / "generation_config.json").exists()


@pytest.mark.parametrize("name", ["gemma-4-E2B-it", "gemma-4-E4B-it"])
def test_gemma4_audio_tower_is_the_stage1_encoder(name):
    config = AutoConfig.from_pretrained(CONFIGS / name)
    audio = config.audio_config
    assert (audio.hidden_size, audio.num_hidden_layers, audio.subsampling_conv_channels[0]) == (1024, 12, 128)
    assert config.audio_token_id == GEMMA4_SPECIAL["<|audio|>"] and config.boa_token_id == GEMMA4_SPECIAL["<|audio>"]
    assert config.eoa_token_index == GEMMA4_SPECIAL["<audio|>"]
    tower = _meta_model(config).model.audio_tower
    assert 3.0e8 < sum(p.numel() for p in tower.parameters()) < 3.1e8
    assert tower.output_proj.in_features == 1024


def test_shrunk_gemma4_keeps_the_layer_pattern():
    config = json.loads((CONFIGS / "gemma-4-E2B-it" / "config.json").read_text())
    small = shrink_gemma4_text(config, 7)["text_config"]
    assert small["num_hidden_layers"] == 7 and small["layer_types"][-1] == "full_attention"
    assert small["layer_types"][:4] == config["text_config"]["layer_types"][:4]
    assert small["num_kv_shared_layers"] == 2  # 20 of 35 layers scaled is 4, but layers 0-4 hold the only full one
    assert shrink_gemma4_text(config, 12)["text_config"]["num_kv_shared_layers"] == 7
    for n in (2, 4, 7, 12):
        small = {k: v for k, v in shrink_gemma4_text(config, n).items() if k != "model_type"}
        assert len(AutoConfig.for_model("gemma4", **small).text_config.kv_sharing_modes) == n


def test_padded_tokenizer_puts_specials_at_the_real_ids(tmp_path):
    special = {**GEMMA4_SPECIAL, "<|audio|>": 3001, "<|video|>": 3002, "<|image|>": 3000, "<|audio>": 2999,
               "<|image>": 2998, "<image|>": 3003, "<audio|>": 3004}  # same layout, a small vocabulary
    tok = padded_tokenizer(vocab_size=4096, special=special, chat_template=CHAT_TEMPLATE, named=GEMMA4_NAMED, bpe_size=400)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 4096 and tok.audio_token == "<|audio|>" and tok.convert_tokens_to_ids(tok.audio_token) == 3001
    ids = tok("me din de kofi <|audio|><|audio|>", add_special_tokens=True)["input_ids"]
    assert ids[0] == special["<bos>"] and ids[-2:] == [3001, 3001] and max(ids) < 4096
    assert tok.decode(ids[1:-2]).strip() == "me din de kofi"
