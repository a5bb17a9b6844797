"""Real-size model folders with random weights, built from the shipped ``configs/hf/<model>/config.json``.

The hub is out of reach here, so the real-size rehearsal (``benchmarks/real_size.py``) builds each
model the stages load (``google/gemma-3-270m``, ``google/gemma-4-E2B-it``, ...) from its real config,
with random weights, and saves it as a Hugging Face folder (bf16 safetensors, sharded) that
``from_pretrained(folder)`` loads exactly like the hub id. The real tokenizers are not available
either: :func:`padded_tokenizer` trains a small byte-level BPE and pads its vocabulary to the real
size (262,144 ids) with ``<unusedN>`` tokens, with the special tokens at the real checkpoints' ids
(Gemma 3: ``<start_of_turn>`` 105 / ``<end_of_turn>`` 106; Gemma 4: ``<|turn>`` 105, ``<turn|>`` 106,
``<|audio>`` 256000, ``<|audio|>`` 258881, ``<audio|>`` 258883, ...), so the config's token ids are used
unchanged. Texts split into more tokens than with the real tokenizer; nothing else differs.

Folders are cached: a folder whose ``real_size_model.json`` matches the config and options is reused.

    python benchmarks/real_models.py gemma-4-E2B-it --out runs/real_size/models
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]

from demo.tiny import GEMMA4_CHAT_TEMPLATE as GEMMA4_CHAT_TEMPLATE  # noqa: E402
from demo.tiny import GEMMA_CHAT_TEMPLATE  # noqa: E402

__all__ = ["CONFIGS", "build_model", "model_folder", "padded_tokenizer", "sample_texts", "shrink_gemma4_text"]

CONFIGS = ROOT / "configs" / "hf"
_STAMP = "real_size_model.json"

_BASE = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
GEMMA3_SPECIAL = {**_BASE, "<start_of_turn>": 105, "<end_of_turn>": 106}
# Ids of the config's special tokens (boi/boa/image/audio/eoi/eoa/video) and the turn markers; the
# think/channel ids are placeholders (no code here reads them).
GEMMA4_SPECIAL = {
    **_BASE, "<|think|>": 98, "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106,
    "<|image>": 255999, "<|audio>": 256000, "<|image|>": 258880, "<|audio|>": 258881,
    "<image|>": 258882, "<audio|>": 258883, "<|video|>": 258884,
}  # fmt: skip
# Attribute names the Gemma 4 tokenizer exposes (tokenizer.audio_token, ...), read by models/chat_format.py.
GEMMA4_NAMED = {
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>", "image_token": "<|image|>",
    "boi_token": "<|image>", "eoi_token": "<image|>", "sot_token": "<|turn>", "eot_token": "<turn|>",
    "soc_token": "<|channel>", "eoc_token": "<channel|>", "think_token": "<|think|>",
}  # fmt: skip

_WORDS = (
    "me din de kofi akwaaba wo ho te sen na mefi kumasi accra nnipa pii ba ha nnɛ what is the capital of "
    "ghana answer briefly translate this sentence into english please tell me a story about the market "
    "one two three four five six seven eight nine zero today tomorrow weather rain sun farm school"
).split()


def sample_texts(n: int, *, seed: int = 0, min_words: int = 3, max_words: int = 20) -> list[str]:
    """``n`` pseudo-sentences over a small Twi/English word list (tokenizer training, synthetic data)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]


def padded_tokenizer(
    *, vocab_size: int, special: dict[str, int], chat_template: str, named: dict[str, str] | None = None,
    bpe_size: int = 1000, texts: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``, its vocabulary padded to ``vocab_size`` ids.

    Args:
        vocab_size: total ids (the real model's embedding rows).
        special: special token -> its id in the real tokenizer.
        chat_template: Jinja chat template.
        named: Gemma 4's named special tokens (``audio_token`` ...), set as tokenizer attributes.
        bpe_size: learnt (non-special) vocabulary size.
        texts: BPE training text.

    Returns:
        A fast tokenizer with ``len(tokenizer) == vocab_size`` and every special token at its id.
    """
    learn = Tokenizer(models.BPE(unk_token="<unk>"))
    learn.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    learn.train_from_iterator(texts or sample_texts(2000, seed=1), trainer=trainer)
    spec = json.loads(learn.to_str())["model"]
    taken = set(special.values())
    free = (i for i in range(vocab_size) if i not in taken)
    vocab = dict(special)
    for token, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]):
        vocab[token] = next(free)
    vocab.update({f"<unused{i}>": i for i in free})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", special["<bos>"])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    extra = [t for t in special if t not in _BASE]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", padding_side="left", extra_special_tokens=dict(named or {}),
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in extra if t not in (named or {}).values()]})
    fast.chat_template = chat_template
    wrong = {t: fast.convert_tokens_to_ids(t) for t, i in special.items() if fast.convert_tokens_to_ids(t) != i}
    if wrong or len(fast) != vocab_size:
        raise RuntimeError(f"padded tokenizer: ids {wrong}, size {len(fast)} != {vocab_size}")
    return fast


def shrink_gemma4_text(config: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """A Gemma 4 config with only the first ``num_layers`` text layers (the others unchanged).

    The layer pattern is kept and KV sharing is scaled with the depth, so a shrunk E2B is E2B's
    layer, embedding and tower shapes at fewer layers (its per-layer embedding table shrinks too).
    """
    cfg = json.loads(json.dumps(config))
    text = cfg["text_config"]
    old = text["num_hidden_layers"]
    if not 2 <= num_layers <= old:
        raise ValueError(f"num_layers must be in [2, {old}], got {num_layers}")
    types = text["layer_types"][:num_layers]
    types[-1] = "full_attention"  # Gemma 4 requires a full-attention last layer
    shared = round(text.get("num_kv_shared_layers", 0) * num_layers / old)
    # Shared layers reuse the last unshared layer of their type: the unshared ones need every type.
    while shared and set(types[: num_layers - shared]) != set(types):
        shared -= 1
    text.update(num_hidden_layers=num_layers, layer_types=types, num_kv_shared_layers=shared)
    text.pop("per_layer_config", None)  # per layer index; rebuilt from layer_types and global_head_dim
    return cfg


def _tokenizer_for(config: dict[str, Any]) -> PreTrainedTokenizerFast:
    if config["model_type"] == "gemma4":
        vocab = config["text_config"]["vocab_size"]
        return padded_tokenizer(vocab_size=vocab, special=GEMMA4_SPECIAL, chat_template=GEMMA4_CHAT_TEMPLATE, named=GEMMA4_NAMED)
    return padded_tokenizer(vocab_size=config["vocab_size"], special=GEMMA3_SPECIAL, chat_template=GEMMA_CHAT_TEMPLATE)


def model_folder(out_root: str | Path, name: str, num_layers: int | None = None) -> Path:
    """Where :func:`build_model` writes ``name`` (``<name>-L<n>`` when shrunk to ``n`` text layers)."""
    return Path(out_root) / (name if num_layers is None else f"{name}-L{num_layers}")


def build_model(
    name: str, out_root: str | Path, *, num_layers: int | None = None, seed: int = 0, device: str = "cpu",
    log=print,
) -> Path:
    """Write (or reuse) ``out_root/<name>[-L<n>]``: random bf16 weights, tokenizer, generation config.

    Args:
        name: a folder of ``configs/hf`` (``gemma-3-270m``, ``gemma-4-E2B-it``, ...).
        out_root: cache folder.
        num_layers: Gemma 4 only: keep the first ``num_layers`` text layers (see :func:`shrink_gemma4_text`).
        seed: torch seed of the random weights.
        device: where the weights are initialised (``cuda`` is much faster for the 5-8B models).
        log: progress printer.

    Returns:
        The model folder.
    """
    src = CONFIGS / name
    config = json.loads((src / "config.json").read_text())
    if num_layers is not None:
        if config["model_type"] != "gemma4":
            raise ValueError("num_layers applies to Gemma 4 configs only")
        config = shrink_gemma4_text(config, num_layers)
    stamp = {"name": name, "num_layers": num_layers, "seed": seed,
             "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()}  # fmt: skip
    out = model_folder(out_root, name, num_layers)
    if (out / _STAMP).exists():
        old = json.loads((out / _STAMP).read_text())
        if {k: old.get(k) for k in stamp} == stamp:
            return out
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: half the memory of fp32, then saved as is
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(default)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp, max_shard_size="2GB")
    del model
    GenerationConfig.from_pretrained(src).save_pretrained(tmp)
    _tokenizer_for(config).save_pretrained(tmp)
    if config["model_type"] == "gemma4":
        from transformers import Gemma4AudioFeatureExtractor

        Gemma4AudioFeatureExtractor().save_pretrained(tmp)
    (tmp / _STAMP).write_text(json.dumps({**stamp, "parameters": n_params}, indent=1))
    tmp.rename(out)
    log(f"[real_models] built {out.name}: {n_params / 1e9:.3f}B parameters in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help=f"folders of {CONFIGS.relative_to(ROOT)}")
    parser.add_argument("--out", default="runs/real_size/models")
    parser.add_argument("--num-layers", type=int, default=None, help="Gemma 4: keep the first N text layers")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for name in args.names:
        print(build_model(name, args.out, num_layers=args.num_layers, device=args.device))


if __name__ == "__main__":
    main()
