"""Inference on long audio: recordings over the 30 s window are heard whole, not truncated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.audio import split_at_silence


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from demo.tiny import save_gemma4_llm_debug
    from models.spoken_llm import SpokenLLM

    path = save_gemma4_llm_debug(tmp_path_factory.mktemp("gemma4"), seed=0)
    torch.manual_seed(0)
    return SpokenLLM(model=str(path), dtype="fp32", lora_r=2, num_levels=2, codebook_size=8)


def test_long_audio_fills_one_block_with_every_frame(tiny_llm):
    rng = np.random.default_rng(0)
    seconds = 41.0
    wave = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    wave[int(20 * 16000) : int(20.5 * 16000)] = 0.0  # a pause to cut at
    short = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    pieces = [wave[a:b] for a, b in split_at_silence(wave, 16000, max_seconds=30.0)]
    assert len(pieces) == 2 and sum(len(p) for p in pieces) == len(wave)
    batch = tiny_llm.prompts_from_audio([*pieces, short], pieces_per_item=[len(pieces), 1])
    audio_id = tiny_llm.base.config.audio_token_id
    per_row = (batch["input_ids"] == audio_id).sum(1).tolist()
    assert abs(per_row[0] - seconds * 25) <= 3, per_row  # 25 frames/s over the whole 41 s
    assert abs(per_row[1] - 25) <= 2
    answers = tiny_llm.generate(batch, max_new_tokens=2)
    assert len(answers) == 2


def test_pieces_must_match_waveforms(tiny_llm):
    with pytest.raises(ValueError, match="pieces_per_item"):
        tiny_llm.prompts_from_audio([np.zeros(16000, np.float32)], pieces_per_item=[2])


def test_repeat_is_an_open_task_scored_by_wer_with_the_language_s_normaliser():
    from datamodules.instructions import CLOSED_TASKS, OPEN_TASKS
    from stages.tasks import score

    assert "repeat" in OPEN_TASKS and "next_digit" not in OPEN_TASKS
    assert CLOSED_TASKS["repeat"]("  the  cat sat ") == "the cat sat"
    with pytest.raises(ValueError, match="empty"):
        CLOSED_TASKS["repeat"]("   ")
    # Twi keeps its letters under the basic normaliser; English gets Whisper's English one.
    assert score(["ɔkɔɔ fie"], ["Ɔkɔɔ fie!"], mode="transcription", language="tw") == {"wer": 0.0, "cer": 0.0}
    assert score(["it is ten dollars"], ["It's $10."], mode="transcription", language="en")["wer"] == 0.0
    assert score(["the cat"], ["the cat sat"], mode="transcription", language="tw")["wer"] == pytest.approx(1 / 3)


# ---- inputs, references, joined recordings, normaliser by language -----------------------------


def _wav(path, seconds: float, seed: int = 0):
    import soundfile as sf

    wave = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)
    sf.write(path, wave, 16000)
    return path


def _pieces_shards(out):
    """A recording cut into 3 pieces by preparation (pieces spread over two shards), a whole one, and a
    cut one whose first piece is not in these shards."""
    from datamodules.audio import encode_flac
    from datamodules.shards import ShardWriter

    def piece(key, parent, segment, seconds, text, whole_seconds):
        wave = np.full(int(seconds * 16000), 0.01 * (segment + 1), np.float32)
        return {"__key__": key, "flac": encode_flac(wave), "json": {
            "text": "", "parent_text": text, "text_scope": "parent", "parent": parent, "segment": segment,
            "duration": seconds, "parent_duration": whole_seconds, "language": "sw", "speaker": "a", "source": "x"}}

    with ShardWriter(out, prefix="test", max_samples=2) as writer:
        writer.write(piece("long-000", "long", 0, 1.0, "Habari ya asubuhi, Prof. Juma", 2.5))
        writer.write(piece("long-001", "long", 1, 1.0, "Habari ya asubuhi, Prof. Juma", 2.5))
        writer.write({"__key__": "short", "flac": encode_flac(np.zeros(8000, np.float32)),
                      "json": {"text": "Asante", "language": "sw", "speaker": "a", "source": "x", "duration": 0.5}})
        writer.write(piece("long-002", "long", 2, 0.5, "Habari ya asubuhi, Prof. Juma", 2.5))
        writer.write(piece("gap-001", "gap", 1, 0.5, "Karibu", 1.0))  # fmt: skip
    return out


def test_shards_hear_cut_recordings_whole_against_the_whole_transcript(tmp_path):
    from stages.infer import load_inputs, references

    items = load_inputs(audio=[], manifest=None, shards=str(_pieces_shards(tmp_path / "shards")))
    assert [it["id"] for it in items] == ["long", "short", "gap"]
    long = items[0]
    assert long["pieces"] == 3 and long["complete"] and len(long["wave"]) == int(2.5 * 16000)
    # joined in segment order: 1 s of piece 0, 1 s of piece 1, 0.5 s of piece 2
    assert np.allclose(long["wave"][[0, 16000, 32000]], [0.01, 0.02, 0.03], atol=1e-3)
    assert long["text"] == "Habari ya asubuhi, Prof. Juma" and long["language"] == "sw"
    assert not items[2]["complete"]
    notes = references(items, closed_task=None, transcribe=True)
    assert [it["reference"] for it in items] == ["Habari ya asubuhi, Prof. Juma", "Asante", None]
    assert len(notes) == 1 and "pieces missing" in notes[0] and "gap" in notes[0]


@pytest.mark.parametrize("kind", ["tsv", "jsonl"])
def test_manifests_are_read_as_preparation_reads_them_with_references(tmp_path, kind):
    from stages.infer import load_inputs, references

    (tmp_path / "clips").mkdir()
    _wav(tmp_path / "clips" / "a.wav", 0.5)
    _wav(tmp_path / "clips" / "b.wav", 0.7, seed=1)
    rows = [{"audio": "clips/a.wav", "text": "Habari", "reference": "Habari yako", "language": "sw", "id": "a"},
            {"audio": "clips/b.wav", "text": "Asante sana", "language": "sw", "id": "b"}]  # fmt: skip
    if kind == "tsv":
        header = ["audio", "text", "reference", "language", "id"]
        lines = ["\t".join(header)] + ["\t".join(str(r.get(h, "")) for h in header) for r in rows]
        manifest = tmp_path / "manifest.tsv"
        manifest.write_text("\n".join(lines) + "\n")
    else:
        import json

        manifest = tmp_path / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_inputs(audio=[], manifest=str(manifest), shards=None)
    assert [(it["id"], it["text"], it["language"]) for it in items] == [("a", "Habari", "sw"), ("b", "Asante sana", "sw")]
    assert len(items[1]["wave"]) == int(0.7 * 16000)
    # --transcribe: a row's reference when it has one, else its transcript.
    assert references(items, closed_task=None, transcribe=True) == []
    assert [it["reference"] for it in items] == ["Habari yako", "Asante sana"]


def test_a_bad_manifest_row_is_a_clear_error(tmp_path):
    from stages.infer import load_inputs

    manifest = tmp_path / "m.tsv"
    manifest.write_text("audio\ttext\nmissing.wav\n")  # one field where the header has two
    with pytest.raises(ValueError, match="m.tsv:2: 1 fields, header has 2"):
        load_inputs(audio=[], manifest=str(manifest), shards=None)


def test_asking_for_scores_without_references_says_so(tmp_path):
    from stages.infer import load_inputs, references

    items = load_inputs(audio=[str(_wav(tmp_path / "q.wav", 0.4))], manifest=None, shards=None)
    notes = references(items, closed_task=None, transcribe=True)
    assert len(notes) == 1 and "--transcribe asked for scores, but none of the inputs" in notes[0]
    assert "nothing is scored" in notes[0]
    assert references(items, closed_task=None, transcribe=False) == []  # not asked: nothing to say


def test_the_normaliser_follows_the_language_english_only_for_en():
    from stages.tasks import score

    # Whisper's English normaliser respells "Prof." as "professor": right for English only.
    assert score(["Professor Juma"], ["Prof. Juma"], mode="transcription", language="en")["wer"] == 0.0
    assert score(["Professor Juma"], ["Prof. Juma"], mode="transcription", language="sw")["wer"] == 0.5
    # One language per input: each pair normalised for its own.
    per_item = score(["Professor Juma", "Professor Juma"], ["Prof. Juma", "Prof. Juma"], mode="transcription",
                     language=["en", "sw"])  # fmt: skip
    assert per_item["wer"] == pytest.approx(1 / 4)


def test_speechless_infer_scores_a_tsv_manifest_and_warns_without_references(tiny_llm, tmp_path, capsys):
    from stages.infer import main

    model_dir = tiny_llm.model_name
    (tmp_path / "clips").mkdir()
    _wav(tmp_path / "clips" / "a.wav", 0.5)
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("audio\ttext\tlanguage\nclips/a.wav\tHabari ya Prof. Juma\tsw\n")
    out = tmp_path / "answers.jsonl"
    common = ["--model", str(model_dir), "--dtype", "fp32", "--max-new-tokens", "2", "--output", str(out)]
    assert main([*common, "--manifest", str(manifest), "--transcribe"]) == 0
    err = capsys.readouterr().err
    assert "[infer] 1 scored: wer" in err and "[infer] warning" not in err
    assert '"reference": "Habari ya Prof. Juma"' in out.read_text()
    assert main([*common, "--audio", str(tmp_path / "clips" / "a.wav"), "--transcribe"]) == 0
    err = capsys.readouterr().err
    assert "none of the inputs have a reference" in err and "scored:" not in err
