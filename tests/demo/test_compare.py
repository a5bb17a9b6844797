"""The comparison's own arithmetic and layout (the whole command is run by hand: README figures)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import demo.run as demo_run
from datamodules.shards import ShardWriter
from demo.compare import TOKENIZERS, one_level_overrides, table, token_rates, tokenizer_track


def _token_shards(out, samples):
    with ShardWriter(out, prefix="tokens", kind="tokens") as writer:
        for i, codes in enumerate(samples):
            codes = np.asarray(codes, dtype=np.int64)
            writer.write({"__key__": f"u{i}", "json": {"text": "x", "n_frames": codes.shape[1]}, "codes.npy": codes}, seconds=1.0)
    return out


def test_token_rates_count_frames_runs_and_bits(tmp_path):
    # One level, 25 frames/s: 50 frames = 2 s; runs: [1,1,2,2,2,3] -> 3, [5]*44 -> 1.
    shards = _token_shards(tmp_path / "t", [[[1, 1, 2, 2, 2, 3]], [[5] * 44]])
    rates = token_rates(str(shards), frame_rate=25.0, codebook_size=2048)
    assert rates["tokens_per_s"] == pytest.approx(25.0)
    assert rates["dedup_tokens_per_s"] == pytest.approx(4 / 2)
    assert rates["bitrate"] == pytest.approx(25 * 11)


def test_token_rates_of_several_levels_collapse_whole_frames(tmp_path):
    # Two levels: a frame repeats only when both codes do (frames 0-1 equal, frame 2 differs at level 1).
    shards = _token_shards(tmp_path / "t", [[[7, 7, 7, 8], [1, 1, 2, 2]]])
    rates = token_rates(str(shards), frame_rate=25.0, codebook_size=256)
    seconds = 4 / 25
    assert rates["tokens_per_s"] == pytest.approx(2 * 4 / seconds)
    assert rates["dedup_tokens_per_s"] == pytest.approx(2 * 3 / seconds)
    assert rates["bitrate"] == pytest.approx(25 * 2 * math.log2(256))


def test_tokenizer_tracks_write_apart_and_size_stages_2_and_3(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_run, "WORK", tmp_path)
    tracks = {t: tokenizer_track(t, "fsdd6") for t in TOKENIZERS}
    assert len({t.artifacts for t in tracks.values()}) == len({t.data for t in tracks.values()}) == len(TOKENIZERS)
    for name, track in tracks.items():
        text = "".join((tmp_path / c).read_text() for c in track.configs)
        assert "data/demo/" not in text and "artifacts/whisper" not in text and "runs/demo" not in text
        assert f"fsdd6/{name}vq" not in text and "stage: stage1_" not in text  # each path moved once, whole
        assert f"save_dir: runs/fsdd6/{name}, name: stage1}}" in text  # stage 1 logs where the demo reads it
        assert f"artifacts_dir: artifacts/fsdd6/{name}" in text and f"data/fsdd6/{name}/tokens/train" in text
        assert "data/fsdd6/shards/val" in text  # the shared shards of the corpus
    _, stage2, stage3 = one_level_overrides(2049, "one_level")
    assert stage2[stage2.index("--model.init_args.lm.init_args.output_form") + 1] == "one_level"
    assert stage2[stage2.index("--model.init_args.lm.init_args.num_levels") + 1] == "1"
    assert stage3[stage3.index("--model.init_args.llm.init_args.codebook_size") + 1] == "2049"
    llm = "--model.init_args.llm.init_args"
    assert stage3[stage3.index(f"{llm}.input_mode") + 1] == "tokens" and stage3[stage3.index(f"{llm}.sound_levels") + 1] == "1"
    _, _, projected = one_level_overrides(2049, "all_levels", "projector")
    assert f"{llm}.input_mode" not in projected and projected[projected.index(f"{llm}.num_levels") + 1] == "1"
    with pytest.raises(ValueError, match="stage3_input"):
        one_level_overrides(2049, "all_levels", "native")


def test_table_prints_a_dash_for_a_missing_figure():
    out = table({"rvq": {"bitrate": 1600.0, "test/real_wer": float("nan")}, "kmeans": {"bitrate": 307.2}})
    line = next(row for row in out.splitlines() if "bitrate" in row)
    assert "1600.000" in line and "307.200" in line
    assert next(row for row in out.splitlines() if "FSDD held-out" in row).split()[-2:] == ["-", "-"]
