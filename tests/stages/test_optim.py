"""The injectable optimiser and the warm-up/cosine schedule (``stages.optim``)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from stages.optim import WarmupCosine, configure, default_optimizer, warmup_factor


def _rates(sched: WarmupCosine, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_warm_up_then_cosine_to_the_floor_at_the_last_step():
    sched = WarmupCosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), warmup_steps=2, total_steps=6)
    rates = _rates(sched, 6)
    assert rates[:2] == pytest.approx([0.5, 1.0])
    assert all(a > b for a, b in zip(rates[1:], rates[2:]))
    assert rates[-1] == pytest.approx(0.1)


def test_stage3_count_holds_the_peak_one_step_and_stops_short_of_the_floor():
    kw = {"warmup_steps": 2, "total_steps": 6, "min_lr_ratio": 0.1}
    late = [warmup_factor(s, count_this_step=False, **kw) for s in range(6)]
    assert late[:3] == pytest.approx([0.5, 1.0, 1.0]) and late[-1] > 0.1
    assert [warmup_factor(s, **kw) for s in range(1, 6)] == pytest.approx(late[2:] + [0.1])


def test_constant_after_the_warm_up():
    assert [warmup_factor(s, warmup_steps=4, total_steps=None, min_lr_ratio=0.1) for s in range(6)] == [
        0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # fmt: skip


def test_state_dict_keeps_progress_and_leaves_the_schedule_to_the_config():
    param = torch.nn.Parameter(torch.zeros(1))
    sched = WarmupCosine(torch.optim.SGD([param], lr=1.0), warmup_steps=2, total_steps=10)
    _rates(sched, 4)
    state = sched.state_dict()
    assert state["last_epoch"] == 4 and state["lr_lambdas"] == [None]
    assert not {"warmup_steps", "total_steps", "decay"} & set(state)
    optimizer = torch.optim.SGD([param], lr=1.0)
    resumed = WarmupCosine(optimizer, warmup_steps=2, total_steps=10)
    optimizer.load_state_dict(sched.optimizer.state_dict())  # as a checkpoint restores both
    resumed.load_state_dict(state)
    assert _rates(resumed, 3) == pytest.approx(_rates(sched, 3))


def test_configure_fills_the_fits_steps_only_when_the_schedule_needs_them():
    params = [torch.nn.Parameter(torch.zeros(2))]
    asked = []
    out = configure(params, optimizer=partial(torch.optim.SGD, lr=0.5), lr_scheduler=partial(WarmupCosine, warmup_steps=1),
                    total_steps=lambda: asked.append(1) or 8)  # fmt: skip
    assert isinstance(out["optimizer"], torch.optim.SGD) and out["lr_scheduler"]["interval"] == "step"
    assert out["lr_scheduler"]["scheduler"].total_steps == 8 and asked == [1]
    configure(params, optimizer=partial(torch.optim.SGD, lr=0.5), total_steps=lambda: asked.append(1) or 8,
              lr_scheduler=partial(WarmupCosine, decay="constant"))  # fmt: skip
    assert asked == [1]
    opt = configure(params, optimizer=default_optimizer(lr=3e-4, weight_decay=0.01), lr_scheduler=None, total_steps=lambda: 1)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 3e-4
    assert opt.param_groups[0]["weight_decay"] == 0.01
