"""``speechless-init``: splits, values derived from the shard index, clear errors, and the whole chain.

The end-to-end test is the README's "your own data" path: a small Swahili corpus (espeak-ng), ``init
--tiny``, then every printed command, unchanged, through stage 3 and ``speechless-infer`` on the real
speech of the held-out test speaker (about 1.5 min on 2 CPU cores).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from stages import init

SWAHILI = (
    "Habari ya asubuhi.", "Leo ni siku nzuri.", "Mtoto anasoma kitabu.", "Mvua inanyesha sana.",
    "Tunakwenda sokoni kesho.", "Chakula kiko tayari.", "Mwalimu anafundisha darasa.", "Jua linawaka leo.",
    "Ninapenda kunywa chai.", "Ndege wanaimba asubuhi.", "Gari limefika mjini.", "Asante kwa msaada wako.",
)  # fmt: skip


def tone_corpus(root: Path, *, seconds: float, speakers: int = 3, per_speaker: int = 4, **extra: str) -> Path:
    """Harmonic tones of ``seconds`` (+- 10 %) as wavs and a TSV manifest (audio text speaker [extra])."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    header = ["audio", "text", "speaker", *extra]
    lines = ["\t".join(header)]
    for s in range(speakers):
        for i in range(per_speaker):
            n = int(seconds * rng.uniform(0.9, 1.1) * 16000)
            t = np.arange(n) / 16000
            wave = (
                0.3 * np.sin(2 * np.pi * (120 + 30 * i + 7 * s) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            )
            sf.write(root / f"s{s}_{i}.wav", wave.astype(np.float32), 16000)
            lines.append(
                "\t".join([f"s{s}_{i}.wav", f"maneno {i} ya mzungumzaji", f"spk{s}", *extra.values()])
            )
    (root / "manifest.tsv").write_text("\n".join(lines) + "\n")
    return root / "manifest.tsv"


def corpus_of(durations: dict[str, list[float]]) -> init.Corpus:
    return init.Corpus(
        durations={s: durations.get(s, durations["train"]) for s in init.SPLITS}, language="sw"
    )


def templates(kind: str) -> dict[str, dict]:
    return {
        f"stage{i + 1}": yaml.safe_load((init.ROOT / init.TEMPLATES[kind][i]).read_text()) for i in range(3)
    }


# ---- splits ------------------------------------------------------------------------------------


def test_splits_hold_out_whole_speakers_then_sessions_then_utterances():
    rows = [{"key": f"u{i}", "speaker": f"spk{i % 10}"} for i in range(100)]
    splits, how = init.assign_splits(rows, seed=0)
    assert how == "speaker"
    by_speaker: dict[str, set[str]] = {}
    for row, split in zip(rows, splits, strict=True):
        by_speaker.setdefault(row["speaker"], set()).add(split)
    assert all(len(s) == 1 for s in by_speaker.values())  # no speaker in two splits
    assert sorted(splits.count(s) for s in ("val", "test")) == [10, 10]  # one speaker of ten each
    assert init.assign_splits(rows, seed=0) == (splits, how)  # seeded

    one_speaker = [{"key": f"u{i}", "speaker": "reader", "session": f"day{i % 3}"} for i in range(30)]
    splits, how = init.assign_splits(one_speaker)
    assert how == "session" and {s for r, s in zip(one_speaker, splits, strict=True) if r["session"] == "day0"} in (
        {"train"}, {"val"}, {"test"})  # fmt: skip
    assert set(splits) == {"train", "val", "test"}

    unknown = [{"key": f"u{i}", "speaker": "unknown"} for i in range(20)]
    splits, how = init.assign_splits(unknown, val_fraction=0.1, test_fraction=0.2)
    assert how == "utterance" and (splits.count("val"), splits.count("test"), splits.count("train")) == (
        2,
        4,
        14,
    )

    with pytest.raises(init.InitError, match="at least 3"):
        init.assign_splits(unknown[:2])
    with pytest.raises(init.InitError, match="sum to less than 1"):
        init.assign_splits(unknown, val_fraction=0.5, test_fraction=0.5)


# ---- derived values ----------------------------------------------------------------------------


def test_derived_values_follow_the_corpus():
    short = corpus_of({"train": [0.6, 0.8, 1.0, 0.7] * 10, "val": [0.9] * 6, "test": [1.1] * 6})
    long = corpus_of({"train": [12.0, 15.0, 17.5, 14.0] * 10, "val": [16.0] * 6, "test": [19.0] * 6})
    for kind, tiny in (("gemma4-tiny", True), ("real", False)):
        ds = init.derive(short, tiny=tiny, template=templates(kind), epochs=None)
        dl = init.derive(long, tiny=tiny, template=templates(kind), epochs=None)
        # generation guard: the longest utterance (19 s = 475 frames at 25/s) with a margin
        assert dl["stage2 gen_max_frames"][0] >= 19.0 * 25 > ds["stage2 gen_max_frames"][0] >= 1.1 * 25
        assert "19.00 s" in dl["stage2 gen_max_frames"][1]
        assert ds["stage2 bucket_boundaries"][0] != dl["stage2 bucket_boundaries"][0]
        for d in (ds, dl):
            assert isinstance(d["stage2 gen_batches"][0], int) and d["stage2 gen_batches"][0] >= 1
        if tiny:  # batches hold ~16 (stage 1) / ~8 (stage 2) utterances of the corpus's own length
            assert dl["stage1 max_batch_seconds"][0] > 10 * ds["stage1 max_batch_seconds"][0]
            assert (
                dl["stage2 max_batch_seconds"][0] >= 8 * 17.5 > ds["stage2 max_batch_seconds"][0] >= 8 * 1.0
            )
            # long utterances: fewer per batch, so more batches are needed for the same generated set
            assert dl["stage2 gen_batches"][0] > ds["stage2 gen_batches"][0]
        else:
            assert dl["stage1 max_batch_seconds"][0] == ds["stage1 max_batch_seconds"][0] == 600.0
        # k-means cannot wait for more frames than an epoch has (short corpus: 31 s = 775 frames)
        assert ds["stage1 kmeans_buffer_frames"][0] <= 0.9 * 31 * 25 < dl["stage1 kmeans_buffer_frames"][0]


def test_configs_point_into_the_run_folder_and_repeat_on_real_speech(tmp_path):
    out = tmp_path / "runs" / "sw"
    corpus = corpus_of({"train": [2.0, 3.0, 2.5] * 4, "val": [2.2] * 3, "test": [2.4] * 3})
    folders = {s: s for s in init.SPLITS}
    for tiny, encoder in ((True, "gemma4-tiny"), (True, "whisper-tiny"), (False, "gemma4-tiny")):
        models = {"encoder": "m/enc", "stage2_lm": "m/lm", "stage3_llm": "m/llm"} if tiny else {}
        configs, derived = init.stage_configs(out=out, corpus=corpus, folders=folders, tiny=tiny, encoder=encoder,
                                              models=models, epochs=2, max_steps=None, text_jsonl=None)  # fmt: skip
        s1, s2, s3 = (configs[f"stage{i}"] for i in (1, 2, 3))
        paths = [s1["data"]["init_args"][f"{s}_shards"] for s in init.SPLITS]
        paths += [s2["data"]["init_args"][f"{s}_shards"] for s in init.SPLITS]
        paths += [s3["data"]["init_args"]["train_shards"], s3["data"]["init_args"]["val_shards"]]
        paths += [s2["model"]["init_args"]["stage1_artifact"], s3["model"]["init_args"]["stage1_artifact"]]
        paths += [s3["model"]["init_args"]["eval_audio_shards"]]
        for c in configs.values():
            paths.append(c["trainer"]["logger"]["init_args"]["save_dir"])
            paths += [
                cb["init_args"]["artifacts_dir"]
                for cb in c["trainer"]["callbacks"]
                if "Promote" in cb["class_path"]
            ]
            assert c["trainer"]["max_epochs"] == 2
        assert all(p.startswith(str(out)) for p in paths), paths
        m2 = s2["model"]["init_args"]
        assert m2["gen_max_frames"] == derived["stage2 gen_max_frames"][0] >= 3.0 * 25
        assert m2["gen_batches"] == derived["stage2 gen_batches"][0]
        assert s2["trainer"]["check_val_every_n_epoch"] <= 2  # validates (and so can promote) within 2 epochs
        m3 = s3["model"]["init_args"]
        assert (m3["eval_task"], m3["eval_language"], m3["eval_audio_shards"]) == (
            "repeat",
            "sw",
            str(out / "shards/val"),
        )
        assert (
            s3["data"]["init_args"]["closed_task"] == "repeat"
            and s3["data"]["init_args"]["response_key"] is None
        )
        gates = [
            cb["init_args"]["gates"] for cb in s3["trainer"]["callbacks"] if "Promote" in cb["class_path"]
        ][0]
        assert "val/spoken_accuracy" not in gates  # a digit-task gate
        monitor = [
            cb["init_args"] for cb in s3["trainer"]["callbacks"] if "ModelCheckpoint" in cb["class_path"]
        ][0]
        assert (monitor["monitor"], monitor["mode"]) == ("val/spoken_wer", "min")
        if tiny:
            assert s1["model"]["init_args"]["encoder"]["init_args"]["source"] == "m/enc"
            assert m3["llm"]["init_args"]["model"] == "m/llm"
        else:  # the real configs' hub models stay
            assert m3["llm"]["init_args"]["model"] == "google/gemma-4-E4B-it"
        if encoder == "whisper-tiny":  # Whisper tiny.en cannot score Swahili
            assert m2["asr_decoder"] is None


def test_init_without_tiny_writes_configs_commands_and_summary(tmp_path, capsys, monkeypatch):
    manifest = tone_corpus(tmp_path / "corpus", seconds=1.5)
    monkeypatch.chdir(tmp_path)
    assert (
        init.main(
            [
                "--manifest",
                str(manifest),
                "--language",
                "sw",
                "--out",
                "runs/x",
                "--no-progress",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "runs/x/init.json").read_text())
    assert record["split"]["split_by"] == "speaker" and record["samples"] == {"train": 4, "val": 4, "test": 4}
    assert record["split"]["rows"] == {"test": 4, "train": 4, "val": 4}
    commands = (tmp_path / "runs/x/commands.sh").read_text().splitlines()[3:]
    assert [c for c in commands if c] == record["commands"]
    for cmd in record["commands"]:
        assert f"  {cmd}\n" in printed  # printed as written, in order
    assert record["commands"][0] == "lightning fit --config runs/x/configs/stage1_rvq.yaml"
    assert record["commands"][-1].startswith("speechless-infer --artifact runs/x/artifacts/stage3/current")
    assert "gen_max_frames" in printed and "where it came from" in printed
    stage2 = (tmp_path / "runs/x/configs/stage2_speechless.yaml").read_text()
    assert "digit" not in stage2.lower() and yaml.safe_load(stage2)["model"]["init_args"]["gen_batches"] >= 1
    assert (
        yaml.safe_load(stage2)["model"]["init_args"]["gen_max_frames"]
        == record["derived"]["stage2 gen_max_frames"]["value"]
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "runs/x/raw/instructions_train.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and all(r["instruction"] == r["response"] == r["instruction"].strip() for r in rows)


def test_a_manifest_split_column_is_kept(tmp_path, capsys):
    manifest = tone_corpus(tmp_path / "corpus", seconds=1.0, speakers=2, per_speaker=3)
    lines = manifest.read_text().splitlines()
    lines = [lines[0] + "\tsplit"] + [
        f"{line}\t{'train' if i < 4 else 'dev'}" for i, line in enumerate(lines[1:])
    ]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert (
        init.main(["--manifest", str(manifest), "--language", "sw", "--out", str(out), "--no-progress"]) == 0
    )
    record = json.loads((out / "init.json").read_text())
    assert record["split"]["split_by"] == "manifest" and record["samples"] == {
        "train": 4,
        "val": 2,
        "test": 2,
    }
    assert record["folders"]["test"] == "val" and "no test split" in capsys.readouterr().out


# ---- bad input ---------------------------------------------------------------------------------


def _rows(manifest: Path, keep, extra: str = "") -> None:
    lines = manifest.read_text().splitlines()
    manifest.write_text(
        "\n".join([lines[0] + extra] + [keep(i, line) for i, line in enumerate(lines[1:])]) + "\n"
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "cannot read manifest"),
        ("no_audio_column", "has no 'audio' column"),
        ("mixed_splits", "have no split while others do"),
        ("no_val", "needs 'train' and 'val'"),
        ("all_files_missing", "init needs train and val"),
        ("too_few", "at least 3"),
    ],
)
def test_a_bad_manifest_gives_a_clear_error(tmp_path, capsys, case, message):
    manifest = tone_corpus(tmp_path / "corpus", seconds=1.0, speakers=1, per_speaker=4)
    if case == "missing":
        manifest = tmp_path / "nope.tsv"
    elif case == "no_audio_column":
        manifest.write_text(manifest.read_text().replace("audio\t", "wav\t", 1))
    elif case == "mixed_splits":
        _rows(manifest, lambda i, line: line + ("\ttrain" if i else "\t"), "\tsplit")
    elif case == "no_val":
        _rows(manifest, lambda i, line: line + "\ttrain", "\tsplit")
    elif case == "all_files_missing":
        _rows(manifest, lambda i, line: line.replace(".wav", "_gone.wav"))
    elif case == "too_few":
        manifest.write_text("\n".join(manifest.read_text().splitlines()[:3]) + "\n")  # two utterances
    code = init.main(
        ["--manifest", str(manifest), "--language", "sw", "--out", str(tmp_path / "run"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("speechless-init: error: ") and message in err, err


def test_speechless_init_is_the_same_command(tmp_path, capsys):
    from stages.cli import main as cli_main

    code = cli_main(["init", "--manifest", str(tmp_path / "nope.tsv"), "--language", "sw", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("speechless-init: error: ") and "nope.tsv" in err, err


# ---- the whole chain ---------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, *, timeout: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{shlex.join(cmd)}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-5000:]}"
    )
    return out


def test_tiny_chain_on_a_swahili_corpus(tmp_path, offline_env):
    from demo.tts import synthesize

    raw = tmp_path / "my_corpus"
    raw.mkdir()
    lines = ["audio\ttext\tspeaker\tlanguage"]
    for v, (voice, pitch, rate) in enumerate(
        (("sw", 50, 160), ("sw+f3", 60, 170), ("sw+m3", 40, 150), ("sw+f2", 55, 165))
    ):
        for i, text in enumerate(SWAHILI):
            sf.write(
                raw / f"spk{v}_{i:02d}.wav", synthesize(text, voice=voice, pitch=pitch, rate_wpm=rate), 16000
            )
            lines.append(f"spk{v}_{i:02d}.wav\t{text}\tspk{v}\tsw")
    (raw / "manifest.tsv").write_text("\n".join(lines) + "\n")

    setup = _run([sys.executable, "-m", "stages.init", "--manifest", "my_corpus/manifest.tsv", "--language", "sw",
                  "--out", "runs/sw", "--tiny", "--epochs", "2", "--no-progress"], tmp_path, timeout=300, env=offline_env())  # fmt: skip
    block = setup.stdout.split("run these commands in order", 1)[1].split("\n\n", 2)[1]
    commands = [line.strip() for line in block.splitlines() if line.strip()]
    assert commands == json.loads((tmp_path / "runs/sw/init.json").read_text())["commands"]
    assert [c.split()[:2] for c in commands] == [["lightning", "fit"]] + [["lightning", "predict"]] * 3 + [
        ["lightning", "fit"], ["lightning", "test"], ["lightning", "predict"], ["lightning", "predict"],
        ["lightning", "fit"], ["speechless-infer", "--artifact"]]  # fmt: skip
    entry = {
        "lightning": [sys.executable, "-m", "stages"],
        "speechless-infer": [sys.executable, "-m", "stages.infer"],
        "python": [sys.executable],
    }
    # --tiny: init prints (and records) the command that builds the demo-size models, to run first
    for command in json.loads((tmp_path / "runs/sw/init.json").read_text())["setup_commands"]:
        assert f"  {command}\n" in setup.stdout
        program, *rest = shlex.split(command)
        _run(entry[program] + rest, tmp_path, timeout=300, env=offline_env())
    results = []
    for command in commands:
        program, *rest = shlex.split(command)
        results.append(_run(entry[program] + rest, tmp_path, timeout=600, env=offline_env()))
    for stage in ("stage1", "stage2", "stage3"):
        current = tmp_path / "runs/sw/artifacts" / stage / "current"
        assert (current / "config.json").is_file() and (current / "provenance.json").is_file(), stage
    assert (tmp_path / "runs/sw/artifacts/stage3/current/llm/adapter").is_dir()
    # the held-out speaker's real speech (12 utterances), scored by WER after the basic (non-English) normaliser
    score = re.search(r"\[infer\] 12 scored: wer (\d+\.\d+), cer (\d+\.\d+)", results[-1].stderr)
    assert score, results[-1].stderr[-3000:]
    answers = [
        json.loads(line) for line in (tmp_path / "runs/sw/infer/test_answers.jsonl").read_text().splitlines()
    ]
    assert sorted(a["reference"] for a in answers) == sorted(SWAHILI)
    assert "val/spoken_wer" in (tmp_path / "runs/sw/configs/stage3_llm.yaml").read_text()


def test_a_hugging_face_dataset_with_a_validation_split(tmp_path):
    import datasets

    manifest = tone_corpus(tmp_path / "corpus", seconds=1.0, speakers=2, per_speaker=3)
    rows = [
        dict(zip(["audio", "text", "speaker"], line.split("\t"), strict=True))
        for line in manifest.read_text().splitlines()[1:]
    ]
    for row in rows:
        row["audio"] = str(tmp_path / "corpus" / row["audio"])
    parts = {"train": rows[:4], "validation": rows[4:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(
        str(tmp_path / "hf")
    )
    out = tmp_path / "run"
    assert (
        init.main(
            ["--hf-dataset", str(tmp_path / "hf"), "--language", "sw", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    record = json.loads((out / "init.json").read_text())
    assert record["folders"] == {"train": "train", "val": "validation", "test": "validation"}
    stage1 = yaml.safe_load((out / "configs/stage1_rvq.yaml").read_text())["data"]["init_args"]
    assert stage1["val_shards"] == str(out / "shards/validation") and record["samples"]["train"] == 4
