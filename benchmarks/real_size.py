"""Real-size rehearsal: every stage at its real architecture, random weights, a few steps, one table.

Usage::

    python benchmarks/real_size.py                               # CPU: all stages, E2B for stage 3
    python benchmarks/real_size.py --device cuda --stage3-model gemma-4-E4B-it --out runs/real_size/gpu.json
    python benchmarks/real_size.py --stages stage3 --stage3-layers 12   # a shallower E2B (less memory)

Each stage's real model is built with random weights from the shipped ``configs/hf/<model>/config.json``
(``benchmarks/real_models.py``; cached under ``--work``/models, bf16 safetensors) and run through the
same command users run, ``python -m stages fit|predict --config configs/<stage>.yaml``, overriding only
model sources (local folders instead of hub ids), data paths (small synthetic shards written here),
accelerator, devices (1), strategy (``auto`` on one device), precision, batch size and step counts.
For a rehearsal the promotion gates are set to pass (random weights fail them by design), validation
runs once over one batch, stage 3 is not promoted (the merged export loads a second copy of the LLM),
and the stage-1 k-means runs once 2,048 frames are collected (``kmeans_buffer_frames = codebook_size``,
the least allowed, instead of 65,536: the first step of a 600 s GPU batch, a few CPU steps).
The CPU defaults also bound generation (``--gen-frames``) and use fp32 where bf16 is slower on the CPU.

Stages, in chain order: ``stage1`` (RVQ fit over the Gemma 4 audio encoder), ``tokenize`` (stage-1
predict with the shard writer), ``stage2`` (Gemma 3 270M, all levels, fit), ``synthesize`` (stage-2
predict over an instruction JSONL), ``stage3`` (Gemma 4 + LoRA fit on the synthetic spoken
instructions). A stage reads what this run's earlier stages made, else what an earlier run left
under ``--work``, else a stand-in (a random RVQ artifact, random token shards). Each runs in its own process; its peak memory is that
process's peak RSS (CPU; memory-mapped weights count once touched) or ``torch.cuda.max_memory_allocated``
(GPU), read by :class:`stages.profiling.StepTimer`.

Figures: step time is the median over the steps after the first (one step = one micro-batch);
throughput is the median of those steps' rates (work / time). Model FLOP utilisation (GPU only) is
``flops_per_unit * units / time / peak``: stages 2 and 3 use the usual ``6 * N * tokens``, N the
parameters a token passes through (decoder blocks and output heads; not the input embedding tables,
which are lookups, nor the unused towers); for LoRA this counts a full backward, so it is an upper
bound on the work done (the frozen weights get no weight gradients) and ignores the activation
recomputation of gradient checkpointing. Stage 1 (frozen encoder + RVQ) uses ``2 * N_encoder`` per
frame plus the RVQ distances ``2 * Q * K * D``. Peak: ``--peak-tflops`` or 989 TFLOP/s (H100/H200
dense bf16).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

from real_models import model_folder, sample_texts  # noqa: E402

STAGES = ("stage1", "tokenize", "stage2", "synthesize", "stage3")
CONFIG = {"stage1": "stage1_rvq.yaml", "tokenize": "stage1_rvq.yaml", "stage2": "stage2_speechless.yaml",
          "synthesize": "stage2_speechless.yaml", "stage3": "stage3_llm.yaml"}  # fmt: skip
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
Q, K, D = 8, 2048, 1024  # stage-1 RVQ of the real configs
SAMPLE_RATE = 16000


# ---------------------------------------------------------------------------------------------- data
def write_speech(out: Path, *, seconds: float, seed: int, min_s: float = 2.0, max_s: float = 8.0) -> Path:
    """Synthetic speech shards (voiced-like tones + noise) totalling about ``seconds`` of audio.

    A bank of 16 waveforms is encoded once and reused under new keys and texts: the random-weight
    encoder does not care what it hears, and writing an hour for a GPU run stays quick.
    """
    from datamodules.audio import encode_flac
    from datamodules.shards import ShardWriter

    rng = np.random.default_rng(seed)
    bank = []
    for _ in range(16):
        dur = float(rng.uniform(min_s, max_s))
        t = np.arange(int(dur * SAMPLE_RATE)) / SAMPLE_RATE
        f0 = 100 + 80 * rng.random() + 20 * np.sin(2 * np.pi * 0.5 * t)
        wave = sum(np.sin(2 * np.pi * np.cumsum(f0 * k) / SAMPLE_RATE) / k for k in range(1, 6)) * 0.15
        wave = (wave + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
        bank.append((dur, encode_flac(wave)))
    texts = iter(sample_texts(100_000, seed=seed, min_words=4, max_words=30))
    total, i = 0.0, 0
    with ShardWriter(out, prefix="shard", max_samples=200) as writer:
        while total < seconds:
            dur, flac = bank[i % len(bank)]
            meta = {"text": next(texts), "language": "tw", "speaker": f"s{i % 7}", "duration": dur, "source": "synthetic"}
            writer.write({"__key__": f"u{seed}_{i:06d}", "flac": flac, "json": meta}, seconds=dur)
            total, i = total + dur, i + 1
    return out


def write_instructions(path: Path, n: int, seed: int = 3) -> Path:
    """``n`` instruction/response pairs as the JSONL stage-2 synthesis and stage-3 text mixing read."""
    rng = np.random.default_rng(seed)
    ins = sample_texts(n, seed=seed, min_words=4, max_words=16)
    res = sample_texts(n, seed=seed + 1, min_words=3, max_words=20)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"ins{i:05d}", "instruction": ins[i], "response": res[i], "n": int(rng.integers(9))}) + "\n")
    return path


def write_random_tokens(out: Path, *, n: int, frames: tuple[int, int], seed: int, instructions: Path | None = None) -> Path:
    """Stand-in token shards (random codes ``[Q, T]``) when the stage that writes them did not run."""
    from datamodules.shards import ShardWriter

    rng = np.random.default_rng(seed)
    rows = [json.loads(x) for x in instructions.read_text().splitlines()] if instructions else None
    texts = sample_texts(n, seed=seed)
    with ShardWriter(out, prefix="tokens", kind="tokens") as writer:
        for i in range(n):
            t = int(rng.integers(frames[0], frames[1] + 1))
            meta = {"text": texts[i], "n_frames": t, "duration": t / 25}
            if rows:
                r = rows[i % len(rows)]
                meta.update(instruction=r["instruction"], response=r["response"], text=r["instruction"])
            codes = rng.integers(0, K, size=(Q, t)).astype(np.int16)
            writer.write({"__key__": f"r{seed}_{i:05d}", "json": meta, "codes.npy": codes}, seconds=t / 25)
    return out


def random_stage1_artifact(root: Path, encoder_source: str) -> Path:
    """A promoted stage-1 artifact with a random RVQ, when the stage-1 fit did not produce one."""
    import torch

    from models.rvq import ResidualVQ
    from stages.artifacts import ArtifactModule, promote

    init = {"dim": D, "num_quantizers": Q, "codebook_size": K, "kmeans_init": False}
    torch.manual_seed(0)
    rvq = ResidualVQ(**init)
    enc = {"kind": "gemma4_audio", "source": encoder_source, "dim": D, "frame_rate": 25.0, "layer": "pre_output_proj", "pooling": 1}
    return promote(stage="stage1", modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", init, rvq.state_dict())},
                   metrics={}, artifacts_dir=root, info={"num_quantizers": Q, "codebook_size": K, "dim": D, "encoder": enc}).path  # fmt: skip


# ------------------------------------------------------------------------------------------ commands
def shipped_callbacks(stage: str) -> list[dict[str, Any]]:
    return yaml.safe_load((ROOT / "configs" / CONFIG[stage]).read_text())["trainer"].get("callbacks", [])


def rehearsal_callbacks(stage: str, *, artifacts: Path, timer_json: Path, averaging: bool = True) -> list[dict[str, Any]]:
    """The config's own callbacks, gates set to pass, artifacts under the work folder, plus the timer.

    ``averaging=False`` drops ``CheckpointAveraging`` (one full-checkpoint validation less after fit).
    """
    out = []
    for cb in shipped_callbacks(stage):
        cb = json.loads(json.dumps(cb))
        if cb["class_path"].endswith("CheckpointAveraging") and not averaging:
            continue
        if cb["class_path"].endswith("Promote"):
            if stage == "stage3":
                continue  # the merged export would load a second copy of the LLM
            args = cb.setdefault("init_args", {})
            args["artifacts_dir"] = str(artifacts)
            args["gates"] = {name: ({"min": -1e9} if "min" in gate else {"max": 1e9}) for name, gate in (args.get("gates") or {}).items()}
            args["force"] = True
        out.append(cb)
    out.append({"class_path": "stages.profiling.StepTimer", "init_args": {"output": str(timer_json), "label": stage}})
    return out


def trainer_overrides(args, stage: str, *, steps: int, accumulate: int) -> list[str]:
    cuda = args.device == "cuda"
    precision = args.precision or ("bf16-mixed" if cuda or stage == "stage3" else "32-true")
    out = [
        "--trainer.accelerator", "gpu" if cuda else "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.strategy", "auto", "--trainer.precision", precision,
        "--trainer.logger.init_args.save_dir", str(args.work / "logs"), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if stage in ("stage1", "stage2", "stage3"):
        out += [
            "--trainer.max_epochs", "1000", "--trainer.max_steps", str(steps),
            "--trainer.limit_train_batches", str(steps * accumulate), "--trainer.accumulate_grad_batches", str(accumulate),
            "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "1.0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        ]  # fmt: skip
    return out


def run(cmd: list[str], *, log: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``, output to ``log``; return exit code, wall seconds and the child's peak RSS."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not killed and time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "timed_out": killed, "wall_s": time.perf_counter() - t0,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "log": str(log), "command": " ".join(cmd)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- figures
def non_embedding_parameters(folder: Path, *, kind: str) -> int:
    """Parameters a token passes through (see the module docstring), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    skip = ("embed_tokens", "audio_tower", "vision_tower", "embed_vision", "embed_audio")
    n = sum(p.numel() for name, p in model.named_parameters() if not any(s in name for s in skip))
    if kind == "stage2":  # all-levels form: Q output heads [H, K + 1], no LM head
        n += Q * model.config.hidden_size * (K + 1)
    elif kind == "stage3":  # the tied LM head runs on the labelled positions only: not counted
        pass
    return n


def peak_flops(args, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def summarise(stage: str, timer: dict[str, Any], *, flops_per_unit: float | None, peak: float | None) -> dict[str, Any]:
    rows = timer.get("steps") or timer.get("predict_batches") or []
    timed = rows[1:] if len(rows) > 1 else rows
    secs = sum(r["seconds"] for r in timed)
    out: dict[str, Any] = {"steps_timed": len(timed), "step_s_median": statistics.median(r["seconds"] for r in timed) if timed else None,
                           "first_step_s": rows[0]["seconds"] if rows else None}  # fmt: skip
    for key in ("audio_seconds", "frames", "tokens", "tokens_padded", "frames_out", "samples"):
        if timed and key in timed[0]:
            out[f"{key}_per_step"] = sum(r.get(key, 0.0) for r in timed) / len(timed)
            # The median of per-step rates: a one-off step (stage 1's k-means) does not skew it.
            out[f"{key}_per_s"] = statistics.median(r.get(key, 0.0) / r["seconds"] for r in timed)
    out["timed_s"] = secs
    unit = {"stage1": "frames", "stage2": "tokens", "stage3": "tokens"}.get(stage)
    if unit and flops_per_unit and peak and out.get(f"{unit}_per_s"):
        out["mfu"] = flops_per_unit * out[f"{unit}_per_s"] / peak
    return out


def _gb(n: float | None) -> str:
    return "-" if not n else f"{n / 2**30:.1f} GiB"


def _m(n: int | None) -> str:
    return "-" if n is None else (f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else str(n))


def table(results: dict[str, Any]) -> str:
    head = ("| stage | model | params (trainable) | batch | step s (median) | throughput | peak memory (steps) "
            "| peak memory (process) | MFU | wall s | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for stage, r in results["stages"].items():
        s, p = r.get("summary", {}), r.get("parameters", {})
        through = []
        if s.get("audio_seconds_per_s"):
            through.append(f"{s['audio_seconds_per_s']:.1f} audio s/s")
        if s.get("frames_out_per_s"):
            through.append(f"{s['frames_out_per_s']:.0f} frames/s out")
        elif s.get("frames_per_s") and stage in ("stage1", "tokenize"):
            through.append(f"{s['frames_per_s']:.0f} frames/s")
        if s.get("tokens_per_s"):
            through.append(f"{s['tokens_per_s']:.0f} tokens/s")
        mem = r.get("memory", {})
        step_peak = mem.get("cuda_max_allocated_bytes") or mem.get("max_step_rss_bytes")
        mfu = f"{100 * s['mfu']:.1f} %" if s.get("mfu") else "-"
        step = f"{s['step_s_median']:.2f}" if s.get("step_s_median") else "-"
        params = f"{_m(p.get('total'))} ({_m(p.get('trainable'))})" if p else "-"
        if p.get("float_buffers", 0) > 1e6:
            params += f" + {_m(p['float_buffers'])} buffers"
        lines.append(f"| {stage} | {r.get('model', '-')} | {params} | {r.get('batch', '-')} | {step} | "
                     f"{', '.join(through) or '-'} | {_gb(step_peak)} | {_gb(r.get('peak_rss_bytes'))} | {mfu} | {r.get('wall_s', 0):.0f} | {r.get('status', '-')} |")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- stages
class Rehearsal:
    """Builds inputs, runs each stage's CLI command, collects figures."""

    def __init__(self, args) -> None:
        self.args, self.work = args, args.work
        self.cuda = args.device == "cuda"
        self.results: dict[str, Any] = {"stages": {}}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}  # fmt: skip
        if args.threads:
            self.env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        self.paths = {
            "speech_train": self.work / "data" / "speech" / "train", "speech_val": self.work / "data" / "speech" / "val",
            "speech_tok": self.work / "data" / "speech" / "tokenize",
            "tokens": self.work / "data" / "tokens", "instructions": self.work / "data" / "instructions.jsonl",
            "synthetic": self.work / "data" / "synthetic", "artifacts": self.work / "artifacts",
            "timers": self.work / "timers", "logs": self.work / "logs",
        }  # fmt: skip
        self.models: dict[str, Path] = {}

    def log(self, msg: str) -> None:
        print(f"[real_size {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # ---- inputs
    def prepare(self, stages: list[str]) -> None:
        a, p = self.args, self.paths
        # Outputs of the stages that run now are cleared; earlier runs' outputs feed the others.
        made = {"stage1": p["artifacts"] / "stage1", "tokenize": p["tokens"], "stage2": p["artifacts"] / "stage2",
                "synthesize": p["synthetic"]}  # fmt: skip
        for stage in stages:
            if stage in made:
                shutil.rmtree(made[stage], ignore_errors=True)
        for stage in ("stage1", "stage2", "stage3"):  # TensorBoard logs and checkpoints (GBs) of earlier runs
            if stage in stages:
                shutil.rmtree(p["logs"] / stage, ignore_errors=True)
        shutil.rmtree(p["timers"], ignore_errors=True)
        p["timers"].mkdir(parents=True)
        p["logs"].mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        builds = []
        if {"stage1", "tokenize", "stage3"} & set(stages):
            builds.append(("gemma4", a.stage3_model, a.stage3_layers))
        if {"stage2", "synthesize"} & set(stages):
            builds.append(("gemma3", "gemma-3-270m", None))
        for key, name, layers in builds:
            # In a child process: this one stays small, so the stage processes it forks start small
            # (a child's peak RSS counts the parent's pages it was forked with).
            folder = model_folder(self.work / "models", name, layers)
            cmd = [sys.executable, str(ROOT / "benchmarks" / "real_models.py"), name, "--out", str(self.work / "models"),
                   "--device", a.build_device] + (["--num-layers", str(layers)] if layers else [])  # fmt: skip
            self.log(f"model {folder.name} (built once, then reused)")
            out = run(cmd, log=p["logs"] / f"build_{folder.name}.log", timeout=3600, env=self.env)
            self.results.setdefault("builds", {})[folder.name] = out
            if out["rc"] == 0:
                self.models[key] = folder
            else:  # recorded; the stages that need this model are skipped
                self.log(f"building {folder.name} failed (exit {out['rc']}), see {out['log']}")
        # Training audio: several times what the steps read, so the exact epoch's short remainder
        # batches (one per length bucket) are rare among them. Tokenization reads its own, smaller set:
        # what stage 2 trains on.
        b1, b2 = a.stage1_seconds or 600.0, a.stage2_seconds or 600.0
        sets = (("speech_train", 4 * a.stage1_steps * b1, 0), ("speech_val", b1, 1), ("speech_tok", 1.5 * a.steps * b2 + 30, 2))
        for split, seconds, seed in sets:
            index = p[split] / "index.json"
            if not index.exists() or json.loads(index.read_text()).get("seconds", 0) < seconds - 1:
                shutil.rmtree(p[split], ignore_errors=True)
                write_speech(p[split], seconds=seconds, seed=seed)
        write_instructions(p["instructions"], a.instructions)
        self.results["prepare_s"] = time.perf_counter() - t0
        self.log(f"inputs ready in {self.results['prepare_s']:.0f} s")

    def stage1_artifact(self) -> Path:
        current = self.paths["artifacts"] / "stage1" / "current"
        if not current.exists():
            self.log("no stage-1 artifact from this run: promoting a random RVQ as a stand-in")
            source = self.models.get("gemma4", f"google/{self.args.stage3_model}")
            random_stage1_artifact(self.paths["artifacts"], str(source))
            self.results["stand_ins"] = [*self.results.get("stand_ins", []), "stage1 artifact (random RVQ)"]
        return current

    def token_shards(self) -> Path:
        if not (self.paths["tokens"] / "index.json").exists():
            self.log("no token shards from this run: writing random ones as a stand-in")
            write_random_tokens(self.paths["tokens"], n=64 if not self.cuda else 800, frames=(50, 200), seed=5)
            self.results["stand_ins"] = [*self.results.get("stand_ins", []), "token shards (random codes)"]
        return self.paths["tokens"]

    def synthetic_shards(self) -> Path:
        if not (self.paths["synthetic"] / "index.json").exists():
            self.log("no synthetic instruction shards from this run: writing random ones as a stand-in")
            lo = min(50, self.args.gen_frames)
            write_random_tokens(self.paths["synthetic"], n=self.args.instructions, frames=(lo, self.args.gen_frames),
                                seed=6, instructions=self.paths["instructions"])  # fmt: skip
            self.results["stand_ins"] = [*self.results.get("stand_ins", []), "synthetic instruction shards (random codes)"]
        return self.paths["synthetic"]

    # ---- commands
    def command(self, stage: str) -> tuple[list[str], dict[str, Any]]:
        a, p = self.args, self.paths
        timer = p["timers"] / f"{stage}.json"
        sub = "predict" if stage in ("tokenize", "synthesize") else "fit"
        accumulate = 1
        if stage == "stage3":
            shipped = yaml.safe_load((ROOT / "configs" / CONFIG[stage]).read_text())["trainer"].get("accumulate_grad_batches", 1)
            accumulate = a.stage3_accumulate if a.stage3_accumulate is not None else shipped
        steps = {"stage1": a.stage1_steps, "stage3": a.stage3_steps}.get(stage) or a.steps
        cmd = [sys.executable, "-m", "stages", sub, "--config", str(ROOT / "configs" / CONFIG[stage])]
        cmd += trainer_overrides(a, stage, steps=steps, accumulate=accumulate)
        info: dict[str, Any] = {"accumulate_grad_batches": accumulate}
        if sub == "fit":
            # CPU, stage 2: each validation after fit loads a full checkpoint (weights + AdamW state,
            # 3.5 GB) beside the live model and optimizer; without averaging there is one less.
            averaging = self.cuda or stage != "stage2"
            info["averaging"] = averaging
            cbs = rehearsal_callbacks(stage, artifacts=p["artifacts"], timer_json=timer, averaging=averaging)
            cmd += ["--trainer.callbacks=" + json.dumps(cbs)]
        need = {"stage1": "gemma4", "tokenize": "gemma4", "stage3": "gemma4", "stage2": "gemma3"}.get(stage)
        if need and need not in self.models:
            raise RuntimeError(f"its model ({need}) was not built")
        g4 = str(self.models.get("gemma4", ""))
        enc = ["--model.init_args.encoder.init_args.source", g4]
        if not self.cuda:
            enc += ["--model.init_args.encoder.init_args.dtype", "fp32"]  # bf16 matmuls are slower on this CPU
        speech_data = ["--data.init_args.test_shards", "null", "--data.init_args.num_workers", str(a.workers)]
        if stage == "stage1":
            cmd += enc + ["--model.init_args.quantizer.init_args.kmeans_buffer_frames", str(K)]
            cmd += ["--data.init_args.train_shards", str(p["speech_train"]), "--data.init_args.val_shards", str(p["speech_val"])]
            cmd += speech_data + (["--data.init_args.max_batch_seconds", str(a.stage1_seconds)] if a.stage1_seconds else [])
            info.update(model=f"Gemma 4 audio encoder ({Path(g4).name}) + RVQ {Q}x{K}x{D}",
                        batch=f"{a.stage1_seconds or 600:g} s audio")  # fmt: skip
        elif stage == "tokenize":
            cmd += ["--model.init_args.artifact", str(self.stage1_artifact())] + enc
            cmd += ["--data.init_args.predict_shards", str(p["speech_tok"]), "--data.init_args.train_shards", "null",
                    "--data.init_args.val_shards", "null"] + speech_data  # fmt: skip
            cmd += ["--data.init_args.max_batch_seconds", str(a.stage1_seconds)] if a.stage1_seconds else []
            cmd += ["--trainer.callbacks+=stages.writers.ShardPredictionWriter", "--trainer.callbacks.output_dir", str(p["tokens"])]
            info.update(model=f"Gemma 4 audio encoder + RVQ {Q}x{K}", batch=f"{a.stage1_seconds or 600:g} s audio")
        elif stage == "stage2":
            g3 = str(self.models["gemma3"])
            tokens = str(self.token_shards())
            cmd += ["--model.init_args.stage1_artifact", str(self.stage1_artifact()),
                    "--model.init_args.lm.init_args.lm", g3, "--model.init_args.lm.init_args.tokenizer", g3,
                    "--model.init_args.gen_max_frames", str(a.gen_frames)]  # fmt: skip
            cmd += ["--data.init_args.train_shards", tokens, "--data.init_args.val_shards", tokens] + speech_data
            cmd += ["--data.init_args.max_batch_seconds", str(a.stage2_seconds)] if a.stage2_seconds else []
            info.update(model=f"Gemma 3 270M, all_levels {Q}x{K}", batch=f"{a.stage2_seconds or 600:g} s of tokens")
        elif stage == "synthesize":
            art2 = p["artifacts"] / "stage2" / "current"
            if not art2.exists():
                raise RuntimeError("synthesize needs the stage-2 artifact of this run (run stage2 first)")
            cmd += ["--model.init_args.artifact", str(art2), "--model.init_args.stage1_artifact", str(self.stage1_artifact()),
                    "--model.init_args.lm", "null", "--model.init_args.gen_max_frames", str(a.gen_frames),
                    "--data", "datamodules.text.TextInstructionDataModule", "--data.init_args.path", str(p["instructions"]),
                    "--data.init_args.batch_size", str(a.synth_batch),
                    "--trainer.callbacks+=stages.writers.ShardPredictionWriter", "--trainer.callbacks.output_dir", str(p["synthetic"]),
                    "--trainer.callbacks.prefix", "synthetic", "--trainer.callbacks.jsonl_name", "synthetic.jsonl"]  # fmt: skip
            info.update(model="Gemma 3 270M (stage-2 artifact)", batch=f"{a.synth_batch} texts x <= {a.gen_frames} frames")
        elif stage == "stage3":
            syn = str(self.synthetic_shards())
            cmd += ["--model.init_args.stage1_artifact", str(self.stage1_artifact()), "--model.init_args.llm.init_args.model", g4,
                    "--model.init_args.llm.init_args.attn_implementation", "eager",
                    "--data.init_args.train_shards", syn, "--data.init_args.val_shards", syn,
                    "--data.init_args.text_jsonl", str(p["instructions"]), "--data.init_args.num_workers", str(a.workers)]  # fmt: skip
            cmd += ["--data.init_args.batch_size", str(a.stage3_batch)] if a.stage3_batch else []
            shipped_b = yaml.safe_load((ROOT / "configs" / CONFIG[stage]).read_text())["data"]["init_args"]["batch_size"]
            name = Path(g4).name
            info.update(model=f"{name} + LoRA r16" + (" (fewer text layers than the real model)" if a.stage3_layers else ""),
                        batch=f"{a.stage3_batch or shipped_b} x (audio + text), accumulate {accumulate}")  # fmt: skip
        if sub == "predict":
            cmd += ["--trainer.callbacks+=stages.profiling.StepTimer", "--trainer.callbacks.output", str(timer),
                    "--trainer.callbacks.label", stage]  # fmt: skip
        return cmd, info

    def flops_per_unit(self, stage: str, timer: dict[str, Any]) -> float | None:
        if stage in ("stage2", "stage3") and {"stage2": "gemma3", "stage3": "gemma4"}[stage] not in self.models:
            return None
        if stage == "stage1":
            enc = timer["parameters"]["total"] - timer["parameters"]["trainable"]  # the frozen encoder (+ 1 anchor)
            return 2 * enc + 2 * Q * K * D
        if stage == "stage2":
            return 6 * non_embedding_parameters(self.models["gemma3"], kind="stage2")
        if stage == "stage3":
            return 6 * non_embedding_parameters(self.models["gemma4"], kind="stage3")
        return None

    def run_stage(self, stage: str) -> None:
        entry: dict[str, Any] = {}
        self.results["stages"][stage] = entry
        try:
            cmd, info = self.command(stage)
        except Exception as exc:  # a missing input: recorded, the other stages still run
            entry.update(status=f"skipped: {exc}")
            self.log(f"{stage}: skipped ({exc})")
            return
        entry.update(info)
        self.log(f"{stage}: {info.get('model')} ... (log {self.paths['logs'] / (stage + '.log')})")
        out = run(cmd, log=self.paths["logs"] / f"{stage}.log", timeout=self.args.timeout, env=self.env)
        entry.update(out)
        timer_path = self.paths["timers"] / f"{stage}.json"
        if out["rc"] == 0 and timer_path.exists():
            timer = json.loads(timer_path.read_text())
            peak = None
            if timer.get("device_name", "cpu") != "cpu":
                peak = peak_flops(self.args, timer["device_name"])
            entry.update(parameters=timer["parameters"], memory=timer["memory"], torch_threads=timer["torch_threads"],
                         precision=timer["precision"], device_name=timer["device_name"])  # fmt: skip
            fpu = self.flops_per_unit(stage, timer)
            entry["summary"] = summarise(stage, timer, flops_per_unit=fpu, peak=peak)
            entry["flops_per_unit"] = fpu
            entry["status"] = "ok"
        else:
            entry["status"] = "timeout" if out["timed_out"] else f"failed (exit {out['rc']})"
            entry["log_tail"] = Path(out["log"]).read_text()[-3000:]
        self.log(f"{stage}: {entry['status']} in {out['wall_s']:.0f} s")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (default: cpu 4, cuda 6)")
    parser.add_argument("--stage1-steps", type=int, default=None,
                        help="stage-1 steps (default: cpu 6, so k-means (2048 frames) runs before the last steps; cuda --steps)")
    parser.add_argument("--stage1-seconds", type=float, default=None, help="stage-1 padded audio seconds per batch (default: cpu 40, cuda the config's 600)")
    parser.add_argument("--stage2-seconds", type=float, default=None, help="stage-2 batch in seconds of speech (default: cpu 40, cuda the config's 600)")
    parser.add_argument("--synth-batch", type=int, default=None, help="texts per synthesis batch (default: cpu 8, cuda 16)")
    parser.add_argument("--instructions", type=int, default=None, help="instructions to synthesize (default: 2 synthesis batches)")
    parser.add_argument("--gen-frames", type=int, default=None, help="stage-2 generation cap in frames (default: cpu 100, cuda the config's 750)")
    parser.add_argument("--stage3-model", default="gemma-4-E2B-it", help="a configs/hf folder: gemma-4-E2B-it, gemma-4-E4B-it; NAME-L<n> = --stage3-layers n")
    parser.add_argument("--stage3-layers", type=int, default=None, help="keep only the first N text layers (when the full model does not fit)")
    parser.add_argument("--stage3-batch", type=int, default=None, help="stage-3 examples per micro-batch (default: cpu 1, cuda the config's 8)")
    parser.add_argument("--stage3-steps", type=int, default=None, help="stage-3 optimizer steps (default: --steps)")
    parser.add_argument("--stage3-accumulate", type=int, default=None, help="stage-3 accumulate_grad_batches (default: cpu 1, cuda the config's)")
    parser.add_argument("--precision", default=None, help="trainer precision for every stage (default: cuda bf16-mixed; cpu 32-true, stage 3 bf16-mixed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per stage process (default: cpu 1, cuda untouched)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cpu 0, cuda 4)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name, 989 for H100/H200)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per stage process (default: cpu 900, cuda 300)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "real_size", help="models, data, logs, artifacts")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: <work>/results_<device>.json)")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    defaults = dict(steps=4 if cpu else 6, stage1_seconds=40.0 if cpu else None, stage2_seconds=40.0 if cpu else None,
                    synth_batch=8 if cpu else 16, gen_frames=100 if cpu else 750, stage3_batch=1 if cpu else None,
                    stage3_accumulate=1 if cpu else None, threads=1 if cpu else None, workers=0 if cpu else 4,
                    timeout=900.0 if cpu else 300.0)  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.instructions = args.instructions or 2 * args.synth_batch
    args.stage1_steps = args.stage1_steps or (max(args.steps, 6) if cpu else args.steps)
    name, _, layers = args.stage3_model.rpartition("-L")
    if name and layers.isdigit():  # gemma-4-E2B-it-L12: the shrunk fallback, by folder name
        args.stage3_model, args.stage3_layers = name, int(layers)
    args.build_device = "cuda" if not cpu else "cpu"
    args.work = args.work.resolve()
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    stages = [s for s in STAGES if s in args.stages.split(",")]
    t0 = time.perf_counter()
    import torch

    rehearsal = Rehearsal(args)
    results = rehearsal.results
    results.update(
        date=datetime.date.today().isoformat(), device=args.device, host=platform.node(), cpu=platform.processor() or platform.machine(),
        torch=torch.__version__, threads=args.threads, steps=args.steps, gen_frames=args.gen_frames,
        stage3_model=args.stage3_model, stage3_layers=args.stage3_layers,
    )  # fmt: skip
    out = args.out or args.work / f"results_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage, so a run cut short still leaves its figures
        results.update(total_s=time.perf_counter() - t0, table=table(results))
        out.write_text(json.dumps(results, indent=1, default=str))

    if "stage1" in stages and args.stage1_steps * (args.stage1_seconds or 600.0) * 25 < 1.5 * K:
        rehearsal.log(f"warning: {args.stage1_steps} stage-1 steps of {args.stage1_seconds} s may not reach the {K} frames k-means "
                      "needs; an uninitialised RVQ cannot tokenize")  # fmt: skip
    rehearsal.prepare(stages)
    save()
    for stage in stages:
        rehearsal.run_stage(stage)
        save()
    print()
    print(f"Real-size rehearsal, {args.device}, {args.threads or 'default'} torch thread(s), {args.steps} steps a fit "
          f"(stage 1: {args.stage1_steps}) "
          f"(median over steps 2..), {results['total_s'] / 60:.1f} min in all")  # fmt: skip
    print(results["table"])
    for note in results.get("stand_ins", []):
        print(f"stand-in input: {note}")
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
