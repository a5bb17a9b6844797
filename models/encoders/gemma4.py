"""The Gemma 4 audio encoder as a frozen stage-1 encoder (the Speechless default).

Follows ``../shared/DESIGN.md`` stage 1: the states are the *input* of the audio tower's
``output_proj`` (1024-dim at 25 frames/s for ``google/gemma-4-E2B-it`` / ``google/gemma-4-E4B-it``),
so that stage 3 can push dequantized vectors through ``output_proj`` -> ``embed_audio`` -> LLM.

They are read without hooks of ours: transformers records each ``Gemma4AudioLayer`` output when
``output_hidden_states`` is set, and with ``config.tie_last_hidden_states=False`` the last recorded
state is the final Conformer layer's output, i.e. the input of ``output_proj`` (otherwise the last
entry is replaced by the projected ``last_hidden_state``).

Front end: ``Gemma4AudioFeatureExtractor`` (128-bin log-mel, hop 10 ms, semicausal window) whose
per-frame mask becomes the encoder's output mask after the 4x subsampling. The extractor truncates at
30 s and does not resample, so audio must be 16 kHz and longer items are cut into 30 s pieces
(750 frames each, exactly aligned) and concatenated. The 10 ms window at each cut sees no audio across
the cut, a negligible difference from encoding the whole at once.

Loading from a full multimodal checkpoint reads only the ``*audio_tower*`` tensors out of the
safetensors files, never the multi-GB LLM into memory (the shard files that hold them are still
fetched whole when ``source`` is a hub id).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import Tensor
from transformers import Gemma4AudioConfig, Gemma4AudioFeatureExtractor, Gemma4AudioModel, Gemma4Config
from transformers.utils import cached_file

from .base import FrozenEncoder

__all__ = ["Gemma4AudioEncoder", "load_gemma4_audio_tower"]

log = logging.getLogger(__name__)

_TOWER = "audio_tower."
# One encoder frame is 4 mel hops of 10 ms: 640 samples at 16 kHz.
_SAMPLES_PER_FRAME = 640
_MEL_HOP = 160


def load_gemma4_audio_tower(source: str, *, revision: str | None = None) -> Gemma4AudioModel:
    """Load a ``Gemma4AudioModel`` from a hub id or folder, standalone or inside a full Gemma 4 checkpoint.

    Args:
        source: hub id (``google/gemma-4-E4B-it``) or local folder. Either a standalone
            ``Gemma4AudioModel.save_pretrained`` folder (``model_type: gemma4_audio``) or a full
            ``Gemma4ForConditionalGeneration`` one (``model_type: gemma4``), from which only the tensors
            under ``audio_tower.`` are read.
        revision: hub revision (branch, tag or commit).

    Returns:
        The float32 audio tower in eval mode.

    Raises:
        ValueError: when the checkpoint is another model, has no audio tower (Gemma 4 26B-A4B/31B), or
            its audio tensors do not match the config.
    """
    with open(cached_file(source, "config.json", revision=revision)) as f:
        model_type = json.load(f).get("model_type")
    if model_type == "gemma4_audio":
        return Gemma4AudioModel.from_pretrained(source, revision=revision, dtype=torch.float32).eval()
    if model_type != "gemma4":
        raise ValueError(
            f"{source}: expected a gemma4 or gemma4_audio checkpoint, got model_type={model_type!r}"
        )
    config = Gemma4Config.from_pretrained(source, revision=revision)
    if config.audio_config is None:
        raise ValueError(f"{source} has no audio tower (Gemma 4 audio ships in the E2B and E4B models)")

    index_file = cached_file(
        source, "model.safetensors.index.json", revision=revision, _raise_exceptions_for_missing_entries=False
    )
    if index_file is not None:
        with open(index_file) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted({file for key, file in weight_map.items() if _TOWER in key})
    else:
        files = ["model.safetensors"]
    state: dict[str, Tensor] = {}
    for name in files:
        with safe_open(cached_file(source, name, revision=revision), framework="pt") as f:
            for key in f.keys():
                if _TOWER in key:
                    state[key.split(_TOWER, 1)[1]] = f.get_tensor(key)
    if not state:
        raise ValueError(f"{source}: no '{_TOWER}*' tensors found in {files}")

    model = Gemma4AudioModel(config.audio_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: audio tower tensors do not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.float().eval()


class Gemma4AudioEncoder(FrozenEncoder):
    """Frozen Gemma 4 audio tower giving pre-``output_proj`` states (1024-dim, 25 frames/s when real).

    Args:
        source: hub id or local folder (standalone audio model or full Gemma 4 checkpoint); the
            feature extractor config is read from it when present, else the Gemma 4 defaults are used.
        config: instead of ``source``, a ``Gemma4AudioConfig`` (or a dict of its fields) for random
            weights (tests); see ``demo.tiny.gemma4_audio_debug_config``.
        revision: hub revision for ``source``.
        chunk_seconds: longest piece fed at once; 30 s is the feature extractor's window. Must be a
            multiple of 40 ms so pieces end on frame boundaries.
        dtype: ``"bf16"`` runs under bf16 autocast (states are returned as float32 either way).
        level_db, center_states: per-utterance normalisation, see :class:`FrozenEncoder`.

    Example:
        >>> enc = Gemma4AudioEncoder(source="google/gemma-4-E4B-it", dtype="bf16")  # doctest: +SKIP
        >>> out = enc(audio, lengths)  # states [B, T, 1024], T ~ seconds * 25  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        source: str | None = None,
        config: Gemma4AudioConfig | dict[str, Any] | None = None,
        revision: str | None = None,
        chunk_seconds: float = 30.0,
        dtype: Literal["fp32", "bf16"] = "fp32",
        level_db: float | None = None,
        center_states: bool = False,
    ) -> None:
        super().__init__(dtype=dtype, level_db=level_db, center_states=center_states)
        if (source is None) == (config is None):
            raise ValueError("give exactly one of source= (hub id or folder) or config= (random weights)")
        chunk = round(chunk_seconds * self.sample_rate)
        if chunk <= 0 or chunk % _SAMPLES_PER_FRAME or abs(chunk - chunk_seconds * self.sample_rate) > 1e-6:
            raise ValueError(f"chunk_seconds must be a positive multiple of 0.04 s, got {chunk_seconds}")
        if source is not None:
            model = load_gemma4_audio_tower(source, revision=revision)
            try:
                extractor = Gemma4AudioFeatureExtractor.from_pretrained(source, revision=revision)
            except OSError:
                log.warning("%s has no feature extractor config; using the Gemma 4 defaults", source)
                extractor = Gemma4AudioFeatureExtractor()
        else:
            if isinstance(config, dict):
                config = Gemma4AudioConfig(**config)
            model = Gemma4AudioModel(config).eval()
            extractor = Gemma4AudioFeatureExtractor()
        if extractor.sampling_rate != self.sample_rate or extractor.hop_length != _MEL_HOP:
            raise ValueError(f"expected a 16 kHz extractor with a 10 ms hop, got {extractor.to_dict()}")
        if extractor.feature_size != model.config.subsampling_conv_channels[0]:
            raise ValueError(
                f"feature extractor has {extractor.feature_size} mel bins but the encoder expects "
                f"{model.config.subsampling_conv_channels[0]}"
            )
        # The pre-projection states are hidden_states[-1] only when it is not tied to last_hidden_state.
        model.config.tie_last_hidden_states = False
        self._set_model(model)
        self.extractor = extractor
        self.kind = "gemma4_audio"
        self.source = source
        self.layer = "pre_output_proj"
        self.chunk_samples = chunk

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / _SAMPLES_PER_FRAME

    def _piece_frames(self, n: Tensor) -> Tensor:
        # Valid mel frames need a whole 321-sample window after a 160-sample left pad; each stride-2
        # conv keeps ceil(frames / 2).
        window = self.extractor.frame_length + 1
        mel = torch.div(n + self.extractor.frame_length // 2 - window, _MEL_HOP, rounding_mode="floor") + 1
        mel = mel.clamp_min(0)
        return torch.div(torch.div(mel + 1, 2, rounding_mode="floor") + 1, 2, rounding_mode="floor")

    def num_frames(self, num_samples: Tensor) -> Tensor:
        n = torch.as_tensor(num_samples).long()
        size = self.chunk_samples
        whole = torch.div(n, size, rounding_mode="floor") * (size // _SAMPLES_PER_FRAME)
        return whole + self._piece_frames(n % size)

    def _encode(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        # The extractor is numpy; trimmed items let it build each item's own mask.
        items = [a[:n].cpu().numpy() for a, n in zip(audio.float(), lengths.tolist())]
        feats = self.extractor(
            items,
            sampling_rate=self.sample_rate,
            padding="longest",
            truncation=False,
            max_length=None,
            return_tensors="pt",
        )
        with self._autocast():
            out = self._model(
                feats["input_features"].to(audio.device, self.model_dtype),
                feats["input_features_mask"].to(audio.device),
                output_hidden_states=True,
            )
        return out.hidden_states[-1], out.attention_mask.sum(-1)
