"""Text-teacher distillation of a spoken LLM (as Ultravox trains its adapter).

Every synthetic spoken instruction of Speechless has its text: the transcript stage 2 spoke. The
teacher reads that text where the student hears the audio, with the same response; its next-token
distributions over the response tokens are the targets of a KL term (``KL(teacher || student)``
averaged per response token). The teacher is the frozen base model (``"base"``: LoRA adapters off,
peft's ``disable_adapter()``) or the model being trained (``"self"``: adapters on, no gradient). It
runs in eval mode (no dropout) and without gradient either way.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = ["TEACHERS", "TextTeacher", "response_kl"]

TEACHERS = ("base", "self")


def response_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` of each row's next-token distribution, averaged over the rows.

    Args:
        teacher_logits: ``[n, V]`` logits of the teacher at the response tokens (no gradient needed).
        student_logits: ``[n, V]`` logits of the student at the same tokens, in the same order.

    Returns:
        A scalar (0 with no rows, still in the student's graph).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student logits {tuple(student_logits.shape)}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / student_logits.shape[0]


class TextTeacher:
    """``SpokenLLM``'s teacher: response logits of a text batch with the adapters on or off."""

    @torch.no_grad()
    def teacher_response_logits(self, batch: dict[str, Any], *, teacher: Literal["base", "self"]) -> dict[str, torch.Tensor]:
        """The teacher's logits at the labelled tokens of ``batch`` (a text-only batch), row-major.

        Args:
            batch: ``collate_padded`` output of the teacher examples.
            teacher: ``"base"`` (adapters disabled: the frozen base LLM) or ``"self"`` (adapters on).

        Returns:
            ``{"logits": [n, V], "targets": [n]}``.
        """
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
        model = self.peft_model  # type: ignore[attr-defined]
        modes = [(m, m.training) for m in model.modules()]  # restored one by one: some may be in eval mode
        model.train(False)
        try:
            with model.disable_adapter() if teacher == "base" else nullcontext():
                out = self(batch)  # type: ignore[operator]
        finally:
            for m, training in modes:
                m.training = training
        return {"logits": out["response_logits"], "targets": out["response_targets"]}

    def text_teacher_kl(self, batch: dict[str, Any], student: dict[str, torch.Tensor], *,
                        teacher: Literal["base", "self"]) -> torch.Tensor:  # fmt: skip
        """``KL(teacher || student)`` per response token of the batch's spoken examples (0 without any).

        Args:
            batch: A training batch; ``teacher`` and ``teacher_tokens`` (``collate_instructions``) when it
                has spoken examples with text teachers.
            student: ``forward(batch)``'s output (``response_logits``, ``response_targets``).
            teacher: See :meth:`teacher_response_logits`.

        Raises:
            ValueError: When the student's and the teacher's response tokens differ (count or ids).
        """
        logits = student["response_logits"]
        if batch.get("teacher") is None:
            return logits.sum() * 0.0
        mask = batch["teacher_tokens"].to(logits.device)
        if mask.numel() != logits.shape[0]:
            raise ValueError(f"teacher_tokens marks {mask.numel()} tokens but the batch has {logits.shape[0]} labelled ones")
        target = self.teacher_response_logits(batch["teacher"], teacher=teacher)
        if int(mask.sum()) != target["logits"].shape[0]:
            raise ValueError(f"{int(mask.sum())} spoken response tokens but the text teacher has {target['logits'].shape[0]}")
        if not torch.equal(student["response_targets"][mask], target["targets"]):
            raise ValueError("the text teacher's response tokens differ from the spoken student's")
        return response_kl(target["logits"], logits[mask])
