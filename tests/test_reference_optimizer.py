"""The training optimizer (global-norm clipping, AdamW, warmup + cosine learning rate) against
torch.optim.AdamW + torch.nn.utils.clip_grad_norm_ + a LambdaLR schedule written out here,
fed the same gradients step by step."""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import pytest
import torch

from exgra_jax.train.defaults import base_config
from exgra_jax.train.state import learning_rate_schedule, make_optimizer

SHAPES = {"kernel": (6, 10), "bias": (10,), "norm_scale": (10,), "embed": (12, 6)}
# Global gradient norm per step: above clip_norm (1.0) first, so the first step is clipped
# and the others are not.
GRAD_NORMS = (5.0, 0.3, 0.8, 0.05, 0.6)


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """The schedule rule, as LLaVA trains: linear warmup from 0 over round(frac * total)
    steps, then a half cosine from the peak to 0 at step ``total``."""
    warmup = round(warmup_frac * total)
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def train_config(**overrides):
    c = base_config().train
    c.total_steps = 8
    c.warmup_frac = 0.25  # warmup 2 steps: 0, lr/2, then cosine
    c.update(overrides)
    return c


def gradient_steps(seed=0):
    rng = np.random.default_rng(seed)
    steps = []
    for norm in GRAD_NORMS:
        g = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        total = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g.values()))
        steps.append({k: x * np.float32(norm / total) for k, x in g.items()})
    return steps


def torch_run(params, grads, c):
    """Weight decay applies to every trainable tensor, biases and norm scales included: one
    torch parameter group, as our optimizer has no decay mask."""
    ps = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(ps.values()), lr=c.lr, betas=(c.b1, c.b2), eps=c.eps,
                            weight_decay=c.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, c.total_steps, c.warmup_frac))
    lrs = []
    for g in grads:
        for k, p in ps.items():
            p.grad = torch.tensor(g[k])
        if c.clip_norm:
            torch.nn.utils.clip_grad_norm_(list(ps.values()), c.clip_norm)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return {k: p.detach().numpy() for k, p in ps.items()}, lrs


def ours_run(params, grads, c):
    opt = make_optimizer(c)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return jax.device_get(params)


@pytest.mark.parametrize("overrides", [
    dict(),  # the shipped defaults: lr 2e-5, clip 1.0, no weight decay
    dict(lr=1e-2, weight_decay=0.1, b2=0.95),
    dict(lr=1e-3, weight_decay=0.05, clip_norm=0.0),
], ids=["defaults", "decay", "no_clip"])
def test_steps_equal_torch_adamw(overrides):
    c = train_config(**overrides)
    rng = np.random.default_rng(1)
    params = {k: 0.1 * rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = gradient_steps()
    ref, ref_lrs = torch_run(params, grads, c)
    ours = ours_run(params, grads, c)
    schedule = learning_rate_schedule(c)
    np.testing.assert_allclose([schedule(s) for s in range(len(grads))], ref_lrs, rtol=1e-6)
    assert ref_lrs[0] == 0 and ref_lrs[2] == c.lr and 0 < ref_lrs[-1] < c.lr
    for k in SHAPES:
        moved = ref[k] - params[k]
        assert np.abs(moved).max() > 0, k
        # Compared as displacements: at lr 2e-5 the parameters themselves hide the update.
        # Each step rounds a parameter to float32 once here and twice in torch (decay, then
        # the Adam step), so the two may differ by a few units in its last place.
        ulps = 2 * len(grads) * np.spacing(np.abs(params[k]).max())
        np.testing.assert_allclose(ours[k] - params[k], moved, rtol=1e-5, atol=ulps,
                                   err_msg=k)


def test_schedule_over_a_whole_run():
    c = train_config(total_steps=50, warmup_frac=0.03)  # the default warmup share
    schedule = learning_rate_schedule(c)
    expected = [c.lr * lr_factor(s, 50, 0.03) for s in range(51)]
    np.testing.assert_allclose([schedule(s) for s in range(51)], expected, rtol=1e-5,
                               atol=1e-12)
