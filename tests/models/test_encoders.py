"""Frozen speech encoders: one interface, masks, freezing, long audio, and loading from saved folders.

All models are tiny and random (``demo.tiny``); nothing touches the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    Gemma4ForConditionalGeneration,
    HubertModel,
    Wav2Vec2FeatureExtractor,
    WhisperFeatureExtractor,
    WhisperModel,
)

import models.encoders.gemma4 as gemma4_module  # noqa: E402
from demo.tiny import (  # noqa: E402
    gemma4_audio_debug_config,
    gemma4_debug_config,
    hubert_debug_config,
    save_gemma4_audio_debug,
    whisper_debug_config,
)
from models.encoders import (  # noqa: E402
    EncoderOutput,
    FrozenEncoder,
    Gemma4AudioEncoder,
    LogMelEncoder,
    SSLEncoder,
    WhisperEncoder,
    build_encoder,
)
from models.encoders.base import level_gain  # noqa: E402

SR = 16000
DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

# name -> (builder, expected frame rate, expected dim)
BUILDERS = {
    "gemma4": (lambda: Gemma4AudioEncoder(config=gemma4_audio_debug_config()), 25.0, 64),
    "whisper": (lambda: WhisperEncoder(config=whisper_debug_config()), 50.0, 32),
    "whisper_pool2": (lambda: WhisperEncoder(config=whisper_debug_config(), pooling=2), 25.0, 32),
    "whisper_clip": (lambda: WhisperEncoder(config=whisper_debug_config(), window="clip"), 50.0, 32),
    "hubert": (lambda: SSLEncoder(config=hubert_debug_config(), layer=2), 50.0, 32),
    "logmel": (lambda: LogMelEncoder(n_mels=40), 100.0, 40),
}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def encoders() -> dict[str, FrozenEncoder]:
    torch.manual_seed(0)
    return {name: build() for name, (build, _, _) in BUILDERS.items()}


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise audio ``[B, max(lengths)]``; the padding is noise too, which the encoders must ignore."""
    g = torch.Generator().manual_seed(seed)
    audio = 0.1 * torch.randn(len(lengths), max(lengths), generator=g)
    return audio, torch.tensor(lengths)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_shapes_lengths_and_frame_rate(encoders, name):
    enc = encoders[name]
    _, rate, dim = BUILDERS[name]
    audio, lengths = _batch([16000, 9000, 4321])
    out = enc(audio, lengths)
    assert isinstance(out, EncoderOutput)
    assert enc.frame_rate == rate and enc.dim == dim and enc.sample_rate == SR
    assert out.states.dtype == torch.float32 and out.states.shape == (3, int(out.lengths.max()), dim)
    assert out.lengths.tolist() == enc.num_frames(lengths).tolist()
    # Frame counts follow duration * frame_rate (within the window/conv edge effects).
    for n, t in zip(lengths.tolist(), out.lengths.tolist()):
        assert abs(t - n / SR * rate) <= 2
    assert torch.equal(out.mask, torch.arange(out.states.shape[1])[None] < out.lengths[:, None])
    assert out.states[~out.mask].abs().sum() == 0
    assert out.states[out.mask].abs().sum() > 0
    desc = enc.describe()
    assert {"kind", "source", "dim", "frame_rate", "layer", "pooling"} <= set(desc)
    assert desc["dim"] == dim and desc["frame_rate"] == rate


@pytest.mark.parametrize("name", list(BUILDERS))
def test_padded_batch_matches_each_item_alone(encoders, name):
    enc = encoders[name]
    audio, lengths = _batch([12000, 16000, 5000], seed=1)
    out = enc(audio, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = enc(audio[b : b + 1, :n])
        t = int(out.lengths[b])
        assert alone.lengths.item() == t
        torch.testing.assert_close(out.states[b, :t], alone.states[0], atol=1e-4, rtol=1e-4)


class _Parent(nn.Module):
    """What a stage-1 LightningModule looks like to torch: an encoder plus something trainable."""

    def __init__(self, encoder: FrozenEncoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, 4)


@pytest.mark.parametrize("name", ["gemma4", "whisper", "whisper_clip", "hubert", "logmel"])
def test_frozen_and_out_of_checkpoints(name):
    torch.manual_seed(0)
    enc = BUILDERS[name][0]()
    parent = _Parent(enc)
    assert set(parent.state_dict()) == {"head.weight", "head.bias"}
    assert len(list(parent.parameters())) == 2
    parent.train()
    assert not enc.training
    if enc.model is not None:
        assert not any(m.training for m in enc.model.modules())
        assert not any(p.requires_grad for p in enc.model.parameters())
    # .to() reaches the hidden network (as Lightning's bf16-true precision does), and forward still runs.
    parent.to(torch.bfloat16)
    if enc.model is not None:
        assert all(p.dtype == torch.bfloat16 for p in enc.model.parameters())
    assert parent.head.weight.dtype == torch.bfloat16
    audio, lengths = _batch([8000, 6000])
    out = enc(audio, lengths)
    assert out.states.dtype == torch.float32 and not out.states.requires_grad
    loss = parent.head(out.states.bfloat16()).sum()
    loss.backward()  # states work as inputs of a trainable module (no inference-mode tensors)
    assert parent.head.weight.grad is not None


@pytest.mark.parametrize("name", ["gemma4", "whisper", "whisper_clip"])
def test_bf16_autocast_runs_close_to_fp32(encoders, name):
    torch.manual_seed(0)
    enc32 = encoders[name]
    enc16 = BUILDERS[name][0]()
    enc16.model.load_state_dict(enc32.model.state_dict())
    enc16.dtype_name = "bf16"
    audio, lengths = _batch([8000, 5000], seed=2)
    a, b = enc32(audio, lengths), enc16(audio, lengths)
    assert b.states.dtype == torch.float32 and torch.equal(a.lengths, b.lengths)
    assert not torch.equal(a.states, b.states)  # autocast really changed the arithmetic
    cos = nn.functional.cosine_similarity(a.states[a.mask], b.states[b.mask], dim=-1)
    assert cos.min() > 0.95


def test_gemma_long_audio_is_chunked_not_truncated(encoders):
    enc = encoders["gemma4"]
    n_long = int(31.5 * SR) + 77
    audio, lengths = _batch([n_long, 20000], seed=3)
    out = enc(audio, lengths)
    assert out.lengths[0].item() == enc.num_frames(torch.tensor(n_long)).item()
    assert abs(out.lengths[0].item() - n_long / SR * 25) <= 1  # ~788 frames: nothing past 30 s was lost
    first = enc(audio[:1, : 30 * SR])
    assert first.lengths.item() == 750
    torch.testing.assert_close(out.states[0, :750], first.states[0], atol=1e-4, rtol=1e-4)
    rest = enc(audio[:1, 30 * SR : n_long])
    torch.testing.assert_close(out.states[0, 750 : out.lengths[0]], rest.states[0], atol=1e-4, rtol=1e-4)


def test_gemma_states_are_the_input_of_output_proj(encoders):
    enc = encoders["gemma4"]
    audio, lengths = _batch([16000, 7000], seed=4)
    out = enc(audio, lengths)
    items = [a[:n].numpy() for a, n in zip(audio, lengths.tolist())]
    feats = enc.extractor(items, sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        ref = enc.model(feats["input_features"], feats["input_features_mask"])
        projected = enc.model.output_proj(out.states)
    assert torch.equal(ref.attention_mask.sum(-1), out.lengths)
    torch.testing.assert_close(projected[out.mask], ref.last_hidden_state[out.mask], atol=1e-4, rtol=1e-4)


def test_gemma_from_saved_folder_matches_in_memory(tmp_path):
    path = save_gemma4_audio_debug(tmp_path / "tiny", seed=3)
    loaded = Gemma4AudioEncoder(source=str(path))
    torch.manual_seed(3)
    in_memory = Gemma4AudioEncoder(config=gemma4_audio_debug_config())
    audio, lengths = _batch([16000, 9000], seed=5)
    a, b = loaded(audio, lengths), in_memory(audio, lengths)
    torch.testing.assert_close(a.states, b.states, atol=1e-5, rtol=1e-5)
    assert loaded.describe()["source"] == str(path) and loaded.describe() != in_memory.describe()
    with pytest.raises(ValueError, match="exactly one"):
        Gemma4AudioEncoder(source=str(path), config=gemma4_audio_debug_config())


def test_gemma_loads_only_the_audio_tower_of_a_full_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    full = Gemma4ForConditionalGeneration(gemma4_debug_config()).eval()
    full.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()

    read: list[str] = []
    real_safe_open = gemma4_module.safe_open

    class _Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()
            outer = self

            class _Handle:
                def keys(self):
                    return handle.keys()

                def get_tensor(self, key):
                    read.append(key)
                    return handle.get_tensor(key)

            outer.handle = _Handle()
            return outer.handle

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(gemma4_module, "safe_open", _Recording)
    enc = Gemma4AudioEncoder(source=str(tmp_path))
    tower_keys = [k for k in full.state_dict() if "audio_tower." in k]
    assert read and all("audio_tower." in k for k in read)
    assert len(read) == len(set(read)) >= len(tower_keys) // 2

    tower = full.model.audio_tower
    tower.config.tie_last_hidden_states = False
    audio, lengths = _batch([16000, 11000], seed=6)
    out = enc(audio, lengths)
    items = [a[:n].numpy() for a, n in zip(audio, lengths.tolist())]
    feats = enc.extractor(items, sampling_rate=SR, return_tensors="pt")
    with torch.no_grad():
        ref = tower(feats["input_features"], feats["input_features_mask"], output_hidden_states=True)
    torch.testing.assert_close(out.states[out.mask], ref.hidden_states[-1][out.mask], atol=1e-5, rtol=1e-5)


def test_gemma_full_checkpoint_without_audio_is_rejected(tmp_path):
    cfg = gemma4_debug_config()
    cfg.audio_config = None
    Gemma4ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no audio tower"):
        Gemma4AudioEncoder(source=str(tmp_path))


def test_whisper_long_audio_is_chunked_by_window(encoders):
    enc = encoders["whisper"]  # tiny config: a 4 s window
    n = 9 * SR + 1234
    audio, lengths = _batch([n, 3000], seed=9)
    out = enc(audio, lengths)
    assert out.lengths.tolist() == [enc.num_frames(torch.tensor(n)).item(), 10]
    first = enc(audio[:1, : 4 * SR])
    assert first.lengths.item() == 200
    torch.testing.assert_close(out.states[0, :200], first.states[0], atol=1e-4, rtol=1e-4)


def _whisper_pair(pooling: int = 1) -> tuple[WhisperEncoder, WhisperEncoder]:
    """The same tiny random Whisper (4 s window) behind ``window="full"`` and ``window="clip"``."""
    torch.manual_seed(0)
    full = WhisperEncoder(config=whisper_debug_config(), pooling=pooling)
    clip = WhisperEncoder(config=whisper_debug_config(), pooling=pooling, window="clip")
    clip._set_model(full.model)
    return full, clip


def test_whisper_full_window_is_the_library_forward():
    """``window="full"`` (the default) is transformers' encoder on the whole padded window, cut."""
    full, _ = _whisper_pair()
    audio, lengths = _batch([16000, 7000, 333], seed=13)
    out = full(audio, lengths)
    items = [a[:n].numpy() for a, n in zip(audio, lengths.tolist())]
    feats = full.extractor(items, sampling_rate=SR, return_tensors="pt")["input_features"]
    assert feats.shape[-1] == 400  # the whole 4 s window
    with torch.no_grad():
        ref = full.model(feats).last_hidden_state
    assert out.lengths.tolist() == [50, 22, 2]
    torch.testing.assert_close(
        out.states[out.mask], ref[:, : out.states.shape[1]][out.mask], atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("pooling", [1, 2])
def test_whisper_clip_lengths_and_independence_of_the_batch(pooling):
    """Clip mode: right lengths for many lengths in one batch, each clip's states as if it were alone.

    Tolerance 1e-5: padded keys get exactly zero attention weight, so what is left between a clip in
    a batch and the clip alone is float reassociation over other sequence lengths (measured ~5e-7 in
    fp32). The effect the mask removes, attending to padded frames, is four orders larger: the
    full-window states of the same clips differ by more than 1e-2 (asserted below).
    """
    full, clip = _whisper_pair(pooling)
    lengths = [16000, 9000, 4321, 641, 320, 321, 1]
    audio, lengths_t = _batch(lengths, seed=14)
    out = clip(audio, lengths_t)
    step = 320 * pooling
    expected = [(n + step - 1) // step for n in lengths]
    assert out.lengths.tolist() == expected == clip.num_frames(lengths_t).tolist()
    assert out.states.shape == (len(lengths), max(expected), 32)
    assert torch.isfinite(out.states).all() and out.states[~out.mask].abs().sum() == 0
    for b, n in enumerate(lengths):
        alone = clip(audio[b : b + 1, :n])
        assert alone.lengths.item() == expected[b]
        torch.testing.assert_close(out.states[b, : expected[b]], alone.states[0], atol=1e-5, rtol=1e-5)
    # Reordering the batch (other neighbours, another padded length) changes nothing either.
    perm = torch.tensor([3, 0, 6, 1])
    sub = clip(audio[perm, : max(lengths[i] for i in perm.tolist())], lengths_t[perm])
    for row, b in enumerate(perm.tolist()):
        torch.testing.assert_close(
            sub.states[row, : expected[b]], out.states[b, : expected[b]], atol=1e-5, rtol=1e-5
        )
    # Clip mode really changed what the short clips attend to: not the full-window states.
    ref = full(audio, lengths_t)
    assert torch.equal(ref.lengths, out.lengths)
    assert (ref.states[1:] - out.states[1:]).abs().max() > 1e-2


def test_whisper_clip_of_a_whole_window_is_the_full_window():
    """A clip that fills the window has nothing to pad: the hand-run layers equal the library's forward."""
    full, clip = _whisper_pair()
    audio, lengths = _batch([4 * SR, 4 * SR - 5000], seed=15)
    a, b = full(audio, lengths), clip(audio, lengths)
    torch.testing.assert_close(b.states[0], a.states[0], atol=1e-5, rtol=1e-5)
    # The other clip is 0.3 s short of the window: its states move a little (~3e-3), not nothing.
    assert (b.states[1, : b.lengths[1]] - a.states[1, : a.lengths[1]]).abs().max() > 1e-3


def test_whisper_clip_with_trailing_silence():
    """``clip_silence_s``: each clip also attends to that much silence after it, states cut at its end.

    Silence covering the rest of the window is the full window (exactly what it pads with); less
    silence is still independent of the batch; the frame counts never change.
    """
    full, clip = _whisper_pair()
    clip.clip_silence_s = 4.0  # the tiny config's whole window
    audio, lengths = _batch([16000, 7000, 333], seed=17)
    a, b = full(audio, lengths), clip(audio, lengths)
    assert b.lengths.tolist() == a.lengths.tolist() == [50, 22, 2]
    torch.testing.assert_close(b.states[b.mask], a.states[a.mask], atol=1e-5, rtol=1e-5)
    clip.clip_silence_s = 0.5
    some = clip(audio, lengths)
    assert some.states.shape == b.states.shape and some.states[~some.mask].abs().sum() == 0
    for i, n in enumerate(lengths.tolist()):
        alone = clip(audio[i : i + 1, :n])
        torch.testing.assert_close(some.states[i, : some.lengths[i]], alone.states[0], atol=1e-5, rtol=1e-5)
    assert (some.states[1:] - b.states[1:]).abs().max() > 1e-3  # 0.5 s of silence is not the window
    assert clip.describe() == {**full.describe(), "window": "clip", "clip_silence_s": 0.5}
    from stages.stage1 import check_encoder_matches

    with pytest.raises(ValueError, match="clip_silence_s: artifact None vs config 0.5"):
        check_encoder_matches({**full.describe(), "window": "clip"}, clip.describe(), where="artifact")
    with pytest.raises(ValueError, match="clip_silence_s"):
        WhisperEncoder(config=whisper_debug_config(), clip_silence_s=1.0)  # full window: meaningless


def test_whisper_clip_long_audio_is_chunked_by_window():
    full, clip = _whisper_pair()
    n = 9 * SR + 1234  # two whole 4 s windows and a 1.08 s tail
    audio, lengths = _batch([n, 3000], seed=16)
    out = clip(audio, lengths)
    assert out.lengths.tolist() == [clip.num_frames(torch.tensor(n)).item(), 10] == [454, 10]
    # Whole windows: the full-window states; the tail: the tail encoded alone at its own length.
    torch.testing.assert_close(out.states[0, :200], full(audio[:1, : 4 * SR]).states[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.states[0, 200:400], full(audio[:1, 4 * SR : 8 * SR]).states[0], atol=1e-5, rtol=1e-5
    )
    tail = clip(audio[:1, 8 * SR : n])
    assert tail.lengths.item() == 54
    torch.testing.assert_close(out.states[0, 400:454], tail.states[0], atol=1e-5, rtol=1e-5)
    assert (out.states[0, 400:454] - full(audio[:1, 8 * SR : n]).states[0]).abs().max() > 1e-2


def test_whisper_window_is_described_and_checked():
    from stages.stage1 import check_encoder_matches

    full, clip = _whisper_pair()
    assert "window" not in full.describe()  # artifacts from before the option still match
    assert clip.describe() == {**full.describe(), "window": "clip"}
    check_encoder_matches(clip.describe(), clip.describe(), where="artifact")
    with pytest.raises(ValueError, match="window: artifact None vs config 'clip'"):
        check_encoder_matches(full.describe(), clip.describe(), where="artifact")
    with pytest.raises(ValueError, match="window"):
        WhisperEncoder(config=whisper_debug_config(), window="short")


def test_whisper_and_hubert_load_from_saved_folders(tmp_path):
    audio, lengths = _batch([16000, 7000], seed=7)
    torch.manual_seed(11)
    whisper = WhisperModel(whisper_debug_config())
    whisper.save_pretrained(tmp_path / "w")
    WhisperFeatureExtractor(feature_size=80, chunk_length=4).save_pretrained(tmp_path / "w")
    loaded = WhisperEncoder(source=str(tmp_path / "w"), pooling=2)
    reference = WhisperEncoder(config=whisper_debug_config(), pooling=2)
    reference.model.load_state_dict(whisper.encoder.state_dict())
    torch.testing.assert_close(loaded(audio, lengths).states, reference(audio, lengths).states)
    assert loaded.describe()["source"] == str(tmp_path / "w") and loaded.frame_rate == 25.0

    torch.manual_seed(12)
    hubert = HubertModel(hubert_debug_config())
    hubert.save_pretrained(tmp_path / "h")
    Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path / "h")
    loaded = SSLEncoder(source=str(tmp_path / "h"), layer=3)
    assert (
        loaded.normalize is False
    )  # read from preprocessor_config.json (a layer-norm model defaults to True)
    with torch.no_grad():
        ref = hubert.eval()(audio[:1], output_hidden_states=True).hidden_states[3][0]
    torch.testing.assert_close(loaded(audio[:1]).states[0], ref, atol=1e-5, rtol=1e-5)


def test_ssl_layer_and_group_norm_models():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="layer"):
        SSLEncoder(config=hubert_debug_config(), layer=4)
    enc = SSLEncoder(
        config=hubert_debug_config(feat_extract_norm="group", do_stable_layer_norm=False), layer=1
    )
    audio, lengths = _batch([9000, 16000], seed=8)
    out = enc(audio, lengths)
    alone = enc(audio[:1, :9000])
    torch.testing.assert_close(out.states[0, : alone.states.shape[1]], alone.states[0])
    layer0 = SSLEncoder(config={"model_type": "hubert", **hubert_debug_config().to_diff_dict()}, layer=0)
    assert layer0.kind == "hubert" and layer0(audio, lengths).states.shape[-1] == 32


def test_bad_inputs_raise_clear_errors(encoders):
    enc = encoders["logmel"]
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        enc(torch.zeros(16000))
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.zeros(2, 100), torch.tensor([100, 0]))
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.zeros(2, 100), torch.tensor([100, 101]))
    with pytest.raises(ValueError, match="NaN"):
        enc(torch.full((1, 100), float("nan")))
    with pytest.raises(ValueError, match="0.04"):
        Gemma4AudioEncoder(config=gemma4_audio_debug_config(), chunk_seconds=29.99)
    with pytest.raises(ValueError, match="128"):
        gemma4_audio_debug_config(subsampling_conv_channels=[64, 8])
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("nope")
    assert isinstance(build_encoder("logmel", n_mels=8), LogMelEncoder)


@pytest.mark.skipif(not (DATA / "english_clips" / "jfk.flac").exists(), reason="../shared/data not present")
@pytest.mark.parametrize("name", ["gemma4", "whisper_pool2", "whisper_clip", "logmel"])
def test_real_clip_frame_count(encoders, name):
    sf = pytest.importorskip("soundfile")
    soxr = pytest.importorskip("soxr")
    wav, rate = sf.read(DATA / "english_clips" / "jfk.flac", dtype="float32", always_2d=True)
    wav = wav.mean(axis=1)
    if rate != SR:
        wav = soxr.resample(wav, rate, SR)
    enc = encoders[name]
    out = enc(torch.from_numpy(wav)[None])
    expected = len(wav) / SR * enc.frame_rate
    assert abs(out.lengths.item() - expected) <= 2
    assert torch.isfinite(out.states).all()


@pytest.mark.parametrize("name", ["gemma4", "logmel"])
def test_level_and_centering_normalise_each_item(name):
    torch.manual_seed(0)
    plain = BUILDERS[name][0]()
    torch.manual_seed(0)
    norm = type(plain)(config=gemma4_audio_debug_config(), level_db=-20.0, center_states=True) if name == "gemma4" else (
        LogMelEncoder(n_mels=40, level_db=-20.0, center_states=True)
    )
    if name == "gemma4":
        norm._set_model(plain.model)  # the same weights
    audio, lengths = _batch([12000, 16000, 7000], seed=2)
    loud = audio * torch.tensor([[0.05], [3.0], [1.0]])  # the same speech at other levels
    a, b = norm(audio, lengths), norm(loud, lengths)
    torch.testing.assert_close(a.states, b.states, atol=1e-3, rtol=1e-3)
    # Without the level option, the level changes the states.
    assert (plain(audio, lengths).states - plain(loud, lengths).states).abs().max() > 1e-2
    # Centered: every item's real frames average to zero; padding stays zero; a batch equals each alone.
    for i, t in enumerate(a.lengths.tolist()):
        assert a.states[i, :t].mean(0).abs().max() < 1e-4
        assert a.states[i, t:].abs().sum() == 0
        alone = norm(audio[i : i + 1, : int(lengths[i])])
        torch.testing.assert_close(alone.states[0], a.states[i, :t], atol=1e-4, rtol=1e-4)
    # The scaled audio really is at the target level: -20 dBFS RMS.
    gain = level_gain(audio, lengths, -20.0)  # the padding (noise here) is not counted
    for i, n in enumerate(lengths.tolist()):
        rms = (audio[i, :n] * gain[i]).square().mean().sqrt()
        assert abs(20 * torch.log10(rms).item() + 20.0) < 1e-3
    # describe() names the options only when set, so older artifacts still match.
    assert norm.describe()["level_db"] == -20.0 and norm.describe()["center_states"] is True
    assert "level_db" not in plain.describe() and "center_states" not in plain.describe()
    with pytest.raises(ValueError, match="level_db"):
        LogMelEncoder(level_db=6.0)
