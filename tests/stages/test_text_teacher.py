"""Stage 3's text-teacher distillation: KL(teacher given the text || student given the speech).

Tiny random models built from configs: a Gemma 4 debug model (native audio path, embeddings) and a
Gemma 3 LM with sound tokens (tokens path). Each spoken example's teacher is the same instruction as
text with the same response; the KL runs over the response tokens, padded or packed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer
from transformers import AutoModelForCausalLM

from datamodules.instructions import InstructionDataModule
from datamodules.shards import ShardWriter
from demo.tasks import DIGITS
from demo.tiny import save_gemma3_lm_debug, save_gemma4_llm_debug
from models.chat_format import IGNORE_INDEX, collate_instructions
from models.rvq import ResidualVQ
from models.spoken_llm import SpokenLLM
from models.spoken_llm_teacher import response_kl
from stages.artifacts import ArtifactModule, promote
from stages.stage3 import SpokenInstructionStage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
Q, K = 2, 16


def _artifact(root: Path, dim: int) -> Path:
    init = {"dim": dim, "num_quantizers": Q, "codebook_size": K, "kmeans_init": False}
    rvq = ResidualVQ(**init)
    return promote(stage="stage1", modules={"quantizer": ArtifactModule("models.rvq.ResidualVQ", init, rvq.state_dict())},
                   metrics={}, artifacts_dir=root).path  # fmt: skip


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("text_teacher")
    texts = [" ".join(DIGITS), "What comes after three? four. Answer the spoken question."] * 20
    rng = np.random.default_rng(0)
    with ShardWriter(root / "tokens", prefix="tokens", kind="tokens") as writer:
        for i in range(8):
            codes = rng.integers(0, K, size=(Q, 5 + i)).astype(np.int64)
            meta = {"instruction": f"what comes after {DIGITS[i]}", "response": DIGITS[i + 1], "n_frames": codes.shape[1]}
            writer.write({"__key__": f"u{i}", "json": meta, "codes.npy": codes}, seconds=0.2 + 0.04 * i)
    (root / "text.jsonl").write_text("".join(json.dumps({"instruction": f"What comes after {w}?", "response": n}) + "\n"
                                             for w, n in zip(DIGITS, DIGITS[1:], strict=False)))  # fmt: skip
    return {
        "root": root,
        "gemma4": save_gemma4_llm_debug(root / "llm", seed=0),
        "gemma3": save_gemma3_lm_debug(root / "gemma3", texts, vocab_size=300, hidden_size=32),
        "artifact": _artifact(root / "artifacts", 32),  # the tiny audio tower's pre-projection width
    }


def make_stage(setup_dir, *, tokens: bool = False, **kwargs) -> SpokenInstructionStage:
    if tokens:
        llm = SpokenLLM(model=str(setup_dir["gemma3"]), input_mode="tokens", dtype="fp32", num_levels=Q, codebook_size=K,
                        lora_r=4, lora_dropout=0.0)  # fmt: skip
    else:
        llm = SpokenLLM(model=str(setup_dir["gemma4"]), dtype="fp32", num_levels=Q, codebook_size=K, lora_r=4, lora_dropout=0.0)
    return SpokenInstructionStage(llm=llm, stage1_artifact=str(setup_dir["artifact"]), lr=1e-2, **kwargs)


def perturb_lora(llm: SpokenLLM, seed: int = 0) -> None:
    """Non-zero LoRA B matrices (they start at zero, when adapters on and off would look the same)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def spoken_examples(llm: SpokenLLM) -> list[dict]:
    """Two spoken examples with their text teachers and a text-only one, as the datamodule builds them."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for frames, word, answer in ((6, "two", "three"), (4, "eight", "nine five")):
        ex = llm.example(instruction_text=None, codes=torch.randint(0, K, (Q, frames), generator=gen), response=answer)
        ex["teacher"] = llm.example(instruction_text=f"what comes after {word}", codes=None, response=answer)
        out.append(ex)
    out.insert(1, llm.example(instruction_text="What comes after three?", codes=None, response="four"))
    return out


def test_kl_is_zero_when_the_teacher_sees_the_student_s_input(setup_dir):
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    assert float(response_kl(a, a)) == pytest.approx(0.0, abs=1e-6)
    manual = (F.softmax(a, -1) * (F.log_softmax(a, -1) - F.log_softmax(b, -1))).sum(-1).mean()
    assert float(response_kl(a, b)) == pytest.approx(float(manual), rel=1e-5)
    assert float(response_kl(a, b)) > 0

    stage = make_stage(setup_dir, text_teacher="self")
    perturb_lora(stage.llm)
    # A text-only example as its own teacher: the "self" teacher sees exactly the student's input.
    text = stage.llm.example(instruction_text="What comes after three?", codes=None, response="four")
    for pack in (False, True):
        batch = collate_instructions([{**text, "teacher": text}, text], pad_id=stage.llm.pad_id, pack=pack)
        assert int(batch["teacher_tokens"].sum()) * 2 == batch["teacher_tokens"].numel()
        out = stage.llm(batch)
        assert float(stage.llm.text_teacher_kl(batch, out, teacher="self")) == pytest.approx(0.0, abs=1e-5)
        # The base model (adapters off) answers otherwise than the perturbed adapters: KL > 0.
        assert float(stage.llm.text_teacher_kl(batch, out, teacher="base")) > 1e-3


def test_base_teacher_disables_the_adapters(setup_dir):
    stage = make_stage(setup_dir, text_teacher="base")
    llm = stage.llm
    perturb_lora(llm)
    llm.train()
    batch = collate_instructions(spoken_examples(llm), pad_id=llm.pad_id)
    teacher = batch["teacher"]
    modes = [m.training for m in llm.modules()]
    base = llm.teacher_response_logits(teacher, teacher="base")
    own = llm.teacher_response_logits(teacher, teacher="self")
    assert [m.training for m in llm.modules()] == modes  # the teacher's eval mode is undone, module by module

    raw = AutoModelForCausalLM.from_pretrained(str(setup_dir["gemma4"]), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = raw(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"]).logits[:, :-1]
    keep = teacher["labels"][:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(base["logits"], logits[keep].float(), atol=1e-4, rtol=1e-4)
    assert torch.equal(base["targets"], teacher["labels"][:, 1:][keep])
    assert not torch.allclose(own["logits"], base["logits"], atol=1e-2)
    # The adapters are on again after the base teacher: the student's logits are the adapted ones.
    with torch.no_grad():
        again = llm(teacher)["response_logits"]
    torch.testing.assert_close(again, own["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [False, True], ids=["embeddings", "tokens"])
def test_padded_and_packed_batches_give_the_same_kl(setup_dir, tokens):
    stage = make_stage(setup_dir, tokens=tokens, text_teacher="base")
    llm = stage.llm
    perturb_lora(llm)
    examples = spoken_examples(llm)
    padded = collate_instructions(examples, pad_id=llm.pad_id)
    packed = collate_instructions(examples, pad_id=llm.pad_id, pack=True, max_tokens_per_row=4096)
    assert packed["input_ids"].shape[0] == 1 and padded["teacher"]["input_ids"].shape[0] == 2
    spoken = [e for e in examples if "teacher" in e]
    assert int(packed["teacher_tokens"].sum()) == sum(int((e["labels"] != IGNORE_INDEX).sum()) for e in spoken)
    with torch.no_grad():
        kl_padded = llm.text_teacher_kl(padded, llm(padded), teacher="base")
        kl_packed = llm.text_teacher_kl(packed, llm(packed), teacher="base")
    assert float(kl_padded) > 1e-3
    torch.testing.assert_close(kl_packed, kl_padded, atol=1e-5, rtol=1e-4)
    # A padding batch's example (sample_weight 0) has nothing to distil.
    muted = collate_instructions([{**examples[0], "sample_weight": 0.0}, *examples[1:]], pad_id=llm.pad_id, pack=True)
    assert muted["teacher"]["input_ids"].shape[0] == 1
    # Teacher and student must agree on the response tokens: a mismatch is an error, not a silent KL.
    wrong = {**padded, "teacher_tokens": padded["teacher_tokens"][1:]}
    with pytest.raises(ValueError, match="labelled"), torch.no_grad():
        llm.text_teacher_kl(wrong, llm(padded), teacher="base")


def test_a_batch_without_spoken_rows_gives_kl_zero(setup_dir):
    stage = make_stage(setup_dir, text_teacher="self", text_teacher_weight=2.0)
    llm = stage.llm
    text = [llm.example(instruction_text=f"What comes after {w}?", codes=None, response=n) for w, n in (("one", "two"), ("six", "seven"))]
    batch = collate_instructions(text, pad_id=llm.pad_id, pack=True)
    assert "teacher" not in batch
    out = llm(batch)
    assert float(llm.text_teacher_kl(batch, out, teacher="self")) == 0.0
    loss = stage.training_step(batch, 0)
    torch.testing.assert_close(loss, out["ce"], atol=1e-5, rtol=1e-5)
    loss.backward()  # the zero KL is in the graph: no error


def test_the_datamodule_gives_spoken_rows_their_text_as_teacher(setup_dir):
    llm = make_stage(setup_dir).llm
    for streamed in (True, False):
        data = InstructionDataModule(train_shards=str(setup_dir["root"] / "tokens"), text_jsonl=str(setup_dir["root"] / "text.jsonl"),
                                     text_ratio=0.5, batch_size=4, **({} if streamed else {"global_batch_size": 4}))  # fmt: skip
        data.bind(build_example=llm.example, collate=lambda xs: xs, text_teacher=True)
        data.setup("fit")
        examples = [e for batch in data.train_dataloader() for e in batch]
        spoken, text = [e for e in examples if "codes" in e], [e for e in examples if "codes" not in e]
        assert len(spoken) == 8 and text and not any("teacher" in e for e in text)
        for e in spoken:
            teacher = e["teacher"]
            prompt = llm.tokenizer.decode(teacher["input_ids"][teacher["labels"] == IGNORE_INDEX])
            assert "what comes after" in prompt and not teacher["audio_positions"].any()
            assert torch.equal(e["labels"][e["labels"] != IGNORE_INDEX], teacher["labels"][teacher["labels"] != IGNORE_INDEX])
    data = InstructionDataModule(train_shards=str(setup_dir["root"] / "tokens"), batch_size=4)
    data.bind(build_example=llm.example, collate=lambda xs: xs)  # off: nothing more is built
    data.setup("fit")
    assert not any("teacher" in e for batch in data.train_dataloader() for e in batch)


@pytest.mark.parametrize(("teacher", "pack", "tokens"), [("base", True, False), ("self", False, False), ("base", True, True)],
                         ids=["base-packed", "self-padded", "base-tokens"])  # fmt: skip
def test_fit_with_a_text_teacher_logs_kl_and_trains_lora(setup_dir, tmp_path, teacher, pack, tokens):
    stage = make_stage(setup_dir, tokens=tokens, text_teacher=teacher, text_teacher_weight=0.5, pack=pack)
    before = {k: v.clone() for k, v in stage.llm.trainable_state_dict().items()}
    data = InstructionDataModule(train_shards=str(setup_dir["root"] / "tokens"), text_jsonl=str(setup_dir["root"] / "text.jsonl"),
                                 text_ratio=0.25, batch_size=4)  # fmt: skip
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(stage, datamodule=data)
    metrics = trainer.callback_metrics
    kl = float(metrics["train/kl"])
    assert np.isfinite(kl) and kl > 0
    after = stage.llm.trainable_state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)


@pytest.mark.slow
def test_two_ranks_one_without_spoken_rows_do_not_hang(setup_dir, tmp_path):
    # Rank 0 trains on spoken examples (teacher forward, KL), rank 1 on text-only ones (no teacher):
    # the gradients all-reduce every step and both ranks end with the same LoRA weights.
    script = tmp_path / "ddp_teacher.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch, lightning as L
        from pathlib import Path
        from lightning.pytorch.strategies import DDPStrategy
        from torch.utils.data import DataLoader
        from models.chat_format import collate_instructions
        from models.spoken_llm import SpokenLLM
        from stages.stage3 import SpokenInstructionStage

        class Batches(L.LightningDataModule):
            def train_dataloader(self):
                llm, rank = self.trainer.lightning_module.llm, self.trainer.global_rank
                gen = torch.Generator().manual_seed(rank)
                def spoken(i):
                    ex = llm.example(instruction_text=None, codes=torch.randint(0, {K}, ({Q}, 5 + i), generator=gen), response="two")
                    return {{**ex, "teacher": llm.example(instruction_text="what comes after one", codes=None, response="two")}}
                text = lambda i: llm.example(instruction_text=f"What comes after {{i}}?", codes=None, response="four")
                make = spoken if rank == 0 else text
                batches = [collate_instructions([make(i), make(i + 1)], pad_id=llm.pad_id, pack=True) for i in range(3)]
                return DataLoader(batches, batch_size=None)

        torch.manual_seed(0)
        llm = SpokenLLM(model={str(setup_dir["gemma4"])!r}, dtype="fp32", num_levels={Q}, codebook_size={K}, lora_r=4, lora_dropout=0.0)
        stage = SpokenInstructionStage(llm=llm, stage1_artifact={str(setup_dir["artifact"])!r}, lr=1e-2, text_teacher="base")
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=3,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False, limit_val_batches=0)
        trainer.fit(stage, datamodule=Batches())
        total = sum(float(v.double().abs().sum()) for v in llm.trainable_state_dict().values())
        line = f"lora {{total:.8f}} kl {{float(trainer.callback_metrics['train/kl']):.6f}}"
        (Path(sys.argv[1]) / f"rank{{trainer.global_rank}}.txt").write_text(line)
        for _ in range(1200):  # rank 0 exiting first would end rank 1 (Lightning's launcher) before it writes
            if (Path(sys.argv[1]) / "rank1.txt").exists():
                break
            time.sleep(0.1)
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][1] == ranks[1][1]  # the same LoRA weights on both ranks: the steps all-reduced
    assert float(ranks[0][3]) > 0 and float(ranks[1][3]) == 0.0  # rank 0 distilled, rank 1 had nothing to
