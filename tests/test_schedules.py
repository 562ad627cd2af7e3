"""The schedule formulas match transformers' own schedulers step for step."""

import numpy as np
import pytest
import torch

from farcast_core.schedules import Schedule, multiplier


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("constant", {}), ("constant_with_warmup", {}), ("linear", {}), ("cosine", {}),
        ("cosine_with_restarts", {"num_cycles": 3}), ("polynomial", {"power": 2.0, "lr_end": 1e-5}),
        ("inverse_sqrt", {}), ("warmup_stable_decay", {"num_decay_steps": 30}),
    ],
)
def test_multipliers_match_transformers(name, kwargs):
    from transformers import get_scheduler

    peak, warmup, total = 1e-3, 10, 100
    opt = torch.optim.SGD([torch.zeros(1)], lr=peak)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kwargs)
    ours_kw = dict(kwargs)
    if name == "polynomial":
        ours_kw["lr_init"] = peak
    for step in range(0, total + 5):
        want = sched.lr_lambdas[0](step)
        assert multiplier(name, step, warmup, total, **ours_kw) == pytest.approx(want, rel=1e-12, abs=1e-15), (name, step)


def test_tau_is_the_cumulative_learning_rate():
    s = Schedule("linear", 1e-2, warmup=0, total=10)
    assert s.tau([0])[0] == 0.0
    assert s.tau([1])[0] == pytest.approx(1e-2)
    assert s.tau([10])[0] == pytest.approx(sum(1e-2 * (10 - k) / 10 for k in range(10)))
    assert np.all(np.diff(s.tau(np.arange(0, 11))) >= 0)
