"""Self-supervised speech encoders (HuBERT, wav2vec 2.0) at a chosen layer, as frozen stage-1 encoders.

Follows SpireLM (Ambilduke et al., "Speech is Text? SpireLM", 2025): HuBERT Large layer-22 features
(1024-dim, 50 frames/s) before k-means. ``layer=i`` picks transformers' ``hidden_states[i]``: 0 is the
input of the first transformer layer, ``i`` the output of layer ``i`` (before the final layer norm of
the stable-layer-norm models, like fairseq's ``output_layer``).

Padded batches: the layer-norm feature encoders (HuBERT Large, wav2vec2 large-lv60) take an attention
mask, so a padded batch gives each item the states it gets alone. The group-norm ones (HuBERT Base,
wav2vec2-base) normalise over the padded time axis and were trained without masks, so they are run
one item at a time to keep every item's states independent of its batch.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModel, PretrainedConfig
from transformers.utils import cached_file

from .base import FrozenEncoder, lengths_to_mask

__all__ = ["SSLEncoder"]


class SSLEncoder(FrozenEncoder):
    """Frozen HuBERT / wav2vec2 encoder read at one layer; ``D = hidden_size``, 50 frames/s.

    Args:
        source: hub id (``facebook/hubert-large-ll60k``) or local folder.
        config: instead of ``source``, a ``HubertConfig``/``Wav2Vec2Config`` or a dict of its fields
            with ``model_type`` (default ``"hubert"``), for random weights.
        layer: hidden-state index, ``0..num_hidden_layers`` (22 as SpireLM with HuBERT Large).
        normalize: zero-mean unit-variance per item over its real samples, as the model's feature
            extractor does. None reads ``do_normalize`` from the source's ``preprocessor_config.json``,
            falling back to True for layer-norm models (the large ones) and False otherwise.
        revision: hub revision for ``source``.
        dtype: ``"bf16"`` runs under bf16 autocast.
        level_db, center_states: per-utterance normalisation, see :class:`FrozenEncoder`.
    """

    def __init__(
        self,
        *,
        source: str | None = None,
        config: PretrainedConfig | dict[str, Any] | None = None,
        layer: int = 22,
        normalize: bool | None = None,
        revision: str | None = None,
        dtype: Literal["fp32", "bf16"] = "fp32",
        level_db: float | None = None,
        center_states: bool = False,
    ) -> None:
        super().__init__(dtype=dtype, level_db=level_db, center_states=center_states)
        if (source is None) == (config is None):
            raise ValueError("give exactly one of source= (hub id or folder) or config= (random weights)")
        if source is not None:
            model = AutoModel.from_pretrained(source, revision=revision, dtype=torch.float32)
        else:
            if isinstance(config, dict):
                config = dict(config)
                config = AutoConfig.for_model(config.pop("model_type", "hubert"), **config)
            model = AutoModel.from_config(config)
        cfg = model.config
        if not hasattr(cfg, "conv_kernel") or not hasattr(cfg, "conv_stride"):
            raise ValueError(
                f"{type(model).__name__} is not a wav2vec2-style model (no conv feature encoder)"
            )
        if not 0 <= layer <= cfg.num_hidden_layers:
            raise ValueError(f"layer must be in [0, {cfg.num_hidden_layers}] for this model, got {layer}")
        self.masked = cfg.feat_extract_norm == "layer"
        if normalize is None:
            normalize = self._source_normalize(source, revision)
            normalize = self.masked if normalize is None else normalize
        self._set_model(model)
        self.normalize = bool(normalize)
        self.kind = cfg.model_type
        self.source = source
        self.layer = layer

    @staticmethod
    def _source_normalize(source: str | None, revision: str | None) -> bool | None:
        if source is None:
            return None
        path = cached_file(
            source, "preprocessor_config.json", revision=revision, _raise_exceptions_for_missing_entries=False
        )
        if path is None:
            return None
        with open(path) as f:
            return json.load(f).get("do_normalize")

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    @property
    def frame_rate(self) -> float:
        hop = 1
        for s in self._model.config.conv_stride:
            hop *= s
        return self.sample_rate / hop

    def num_frames(self, num_samples: Tensor) -> Tensor:
        n = torch.as_tensor(num_samples).long()
        cfg = self._model.config
        for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
            n = (torch.div(n - k, s, rounding_mode="floor") + 1).clamp_min(0)
        return n

    def _encode(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        mask = lengths_to_mask(lengths, audio.shape[1])
        if self.normalize:
            n = lengths[:, None].to(audio.dtype)
            mean = (audio * mask).sum(1, keepdim=True) / n
            var = (((audio - mean) * mask) ** 2).sum(1, keepdim=True) / n
            audio = ((audio - mean) / torch.sqrt(var + 1e-7)) * mask
        frames = self.num_frames(lengths)
        audio = audio.to(self.model_dtype)
        with self._autocast():
            if self.masked:
                out = self._model(audio, attention_mask=mask.long(), output_hidden_states=True)
                return out.hidden_states[self.layer], frames
            states = [
                self._model(a[None, :n], output_hidden_states=True).hidden_states[self.layer][0]
                for a, n in zip(audio, lengths.tolist())
            ]
        return torch.nn.utils.rnn.pad_sequence(states, batch_first=True), frames
