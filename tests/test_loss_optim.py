import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.loss import global_cosine_hm, hard_mining_p
from utils.optim import StableAdamW, lr_at, warmup_cosine_schedule


def _maps(seed: int):
    g = torch.Generator().manual_seed(seed)
    en = [torch.randn(3, 8, 5, 5, generator=g) for _ in range(2)]
    de = [torch.randn(3, 8, 5, 5, generator=g) for _ in range(2)]
    return en, de


def test_hard_mining_scales_easy_positions_by_exactly_one_tenth():
    en, de = _maps(0)
    p = 0.9
    plain = [d.clone().requires_grad_() for d in de]
    loss_plain = sum(torch.mean(1 - F.cosine_similarity(e.flatten(1), d.flatten(1))) for e, d in zip(en, plain)) / 2
    loss_plain.backward()
    mined = [d.clone().requires_grad_() for d in de]
    loss = global_cosine_hm(en, mined, p=p, factor=0.1)
    loss.backward()
    assert torch.allclose(loss, loss_plain)
    for e, d, d_plain in zip(en, mined, plain):
        distance = (1 - F.cosine_similarity(e, d.detach(), dim=1)).flatten()
        k = int(distance.numel() * (1 - p))
        threshold = torch.sort(distance, descending=True).values[k - 1]
        easy = (distance < threshold).view(3, 1, 5, 5).expand_as(d)
        assert easy[:, 0].sum() == distance.numel() - k
        assert torch.equal(d.grad[easy], d_plain.grad[easy] * 0.1)
        assert torch.equal(d.grad[~easy], d_plain.grad[~easy])


def test_hard_mining_at_p_zero_scales_nothing():
    en, de = _maps(1)
    a = [d.clone().requires_grad_() for d in de]
    b = [d.clone().requires_grad_() for d in de]
    global_cosine_hm(en, a, p=0.0).backward()
    (sum(torch.mean(1 - F.cosine_similarity(e.flatten(1), d.flatten(1))) for e, d in zip(en, b)) / 2).backward()
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


def test_hard_mining_p_schedule():
    assert hard_mining_p(0) == 0.0
    assert hard_mining_p(500) == 0.9 * 500 / 1000
    assert hard_mining_p(1000) == 0.9 and hard_mining_p(9999) == 0.9


def test_warmup_cosine_values():
    base, final, total, warmup = 2e-3, 2e-4, 1000, 100
    schedule = warmup_cosine_schedule(base, final, total, warmup)
    assert len(schedule) == total
    for it in range(warmup):
        assert math.isclose(schedule[it], it * base / (warmup - 1), rel_tol=1e-12, abs_tol=1e-18)
    for it in range(warmup, total):
        j = it - warmup
        expected = final + 0.5 * (base - final) * (1 + math.cos(math.pi * j / (total - warmup)))
        assert math.isclose(schedule[it], expected, rel_tol=1e-12)
    assert schedule[0] == 0.0 and math.isclose(schedule[warmup], base)
    assert lr_at(schedule, total, final) == final and lr_at(schedule, total + 5, final) == final


def _direct_stable_adamw(params, grads, lr, betas, eps, wd, steps):
    """RECIPE section 3, element by element in float64."""
    p = [x.astype(np.float64).copy() for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    v_max = [np.zeros_like(x) for x in p]
    b1, b2 = betas
    for t in range(1, steps + 1):
        for i, g in enumerate(grads[t - 1]):
            p[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            v_max[i] = np.maximum(v_max[i], v[i])
            denom = np.sqrt(v_max[i]) / math.sqrt(1 - b2 ** t) + eps
            rms = np.sqrt(np.mean((g / denom) ** 2))
            s = max(1.0, rms)
            p[i] -= lr / (1 - b1 ** t) / s * m[i] / denom
    return p


def test_stable_adamw_matches_direct_definition():
    rng = np.random.default_rng(0)
    params = [rng.normal(size=(4, 3)), rng.normal(size=(5,))]
    # growing then shrinking gradients exercise both the AMSGrad maximum and update clipping
    grads = [[rng.normal(size=x.shape) * scale for x in params] for scale in (0.1, 0.1, 5.0, 0.01, 1.0)]
    tensors = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in params]
    optimizer = StableAdamW(tensors, lr=2e-3, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-4)
    for step_grads in grads:
        for t, g in zip(tensors, step_grads):
            t.grad = torch.tensor(g)
        optimizer.step()
    expected = _direct_stable_adamw(params, grads, 2e-3, (0.9, 0.999), 1e-10, 1e-4, len(grads))
    for t, e in zip(tensors, expected):
        np.testing.assert_allclose(t.detach().numpy(), e, rtol=1e-12, atol=1e-15)


class _PerTensorStableAdamW(StableAdamW):
    """The optimizer as it was written before the foreach rewrite: one tensor at a time, one host sync
    per tensor. The rewrite must reproduce it bit for bit."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                second_moment = state["exp_avg_sq"]
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], second_moment, out=state["max_exp_avg_sq"])
                    second_moment = state["max_exp_avg_sq"]
                denom = second_moment.sqrt() / math.sqrt(1 - beta2 ** t) + group["eps"]
                rms = (grad / denom).norm() / math.sqrt(grad.numel())
                scale = max(1.0, rms.item() / group["clip_threshold"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t) / scale)


@pytest.mark.parametrize("amsgrad", [True, False])
def test_stable_adamw_is_bit_identical_to_the_per_tensor_form(amsgrad):
    """fp32 and bf16 tensors (sizes with and without a vector-width remainder) in groups of their own
    rates, decay and clipping; a tensor without a gradient at one step gets a step count of its own.
    The calm-then-sudden gradients make the update clipping act."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(384, 384), (1152,), (37, 5), (1,)]
    initial = [torch.randn(s, generator=generator).to(dtype) for dtype in (torch.float32, torch.bfloat16)
               for s in shapes]
    grads = [[torch.randn(x.shape, generator=generator).to(x.dtype) * scale for x in initial]
             for scale in (0.1, 0.1, 5.0, 0.01, 1.0, 1e-4)]

    def run(optimizer_class):
        params = [x.clone().requires_grad_() for x in initial]
        groups = [{"params": params[:3], "lr": 2e-3, "weight_decay": 1e-4},
                  {"params": params[3:6], "lr": 5e-4, "clip_threshold": 0.5},
                  {"params": params[6:], "lr": 1e-2, "weight_decay": 0.0, "eps": 1e-6}]
        optimizer = optimizer_class(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=amsgrad)
        for step, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = None if (step == 1 and p is params[4]) else g.clone()
            optimizer.step()
        return params, optimizer.state_dict()

    params, state = run(StableAdamW)
    expected_params, expected_state = run(_PerTensorStableAdamW)
    assert state["param_groups"] == expected_state["param_groups"]
    assert state["state"].keys() == expected_state["state"].keys()
    for p, e in zip(params, expected_params):
        assert p.dtype == e.dtype and torch.equal(p, e)
    for i, expected in expected_state["state"].items():
        assert state["state"][i].keys() == expected.keys()
        for key, value in expected.items():
            assert (torch.equal(state["state"][i][key], value) if isinstance(value, torch.Tensor)
                    else state["state"][i][key] == value)
