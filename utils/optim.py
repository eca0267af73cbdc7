"""StableAdamW and the warmup-cosine learning-rate schedules: the recipe's (v1) and Dinomaly2's (v2)."""
import math
from typing import Iterable

import numpy as np
import torch


class StableAdamW(torch.optim.Optimizer):
    """AdamW with AMSGrad and per-tensor update clipping (Wortsman et al., 2023).

    The step of each tensor is divided by max(1, RMS(g / denom) / clip_threshold), which tames the
    rare large updates that follow a sudden gradient after a long calm.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = True,
                 clip_threshold: float = 1.0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        clip_threshold=clip_threshold)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        """One step of a group's parameters as foreach calls over all of them (a handful of calls instead
        of a dozen per tensor, and one host sync for all the clipping norms instead of one per tensor).
        Each foreach call applies the same operation to each tensor as the per-tensor form of the
        algorithm, in the same order and dtype, so on CPU the result is bit-identical to it
        (tests/test_loss_optim.py holds the per-tensor form; CUDA's own foreach kernels are not tested)."""
        beta1, beta2 = group["betas"]
        lr, grads = group["lr"], [p.grad for p in params]
        states = [self._state(p, group["amsgrad"]) for p in params]
        for state in states:
            state["step"] += 1
        steps = [state["step"] for state in states]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(params, _factor(1 - lr * group["weight_decay"], params))
        torch._foreach_mul_(exp_avgs, _factor(beta1, params))
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, _factor(beta2, params))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        second_moments = exp_avg_sqs
        if group["amsgrad"]:
            second_moments = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(second_moments, exp_avg_sqs)
        denoms = torch._foreach_sqrt(second_moments)
        torch._foreach_div_(denoms, [math.sqrt(1 - beta2 ** t) for t in steps])
        torch._foreach_add_(denoms, group["eps"])
        norms = torch._foreach_norm(torch._foreach_div(grads, denoms))
        torch._foreach_div_(norms, [math.sqrt(g.numel()) for g in grads])
        rms = torch.stack([n.double() for n in norms]).tolist()  # one host sync; float64 holds any norm
        scales = [max(1.0, r / group["clip_threshold"]) for r in rms]
        torch._foreach_addcdiv_(params, exp_avgs, denoms,
                                [-lr / (1 - beta1 ** t) / s for t, s in zip(steps, scales)])

    def _state(self, p: torch.Tensor, amsgrad: bool) -> dict:
        """p's moments (zero before its first step); the layout of state_dict, which checkpoints carry."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
        return state


def _factor(value: float, like: list[torch.Tensor]) -> torch.Tensor:
    """A factor for _foreach_mul_ as a float64 0-dim tensor: a Python number there is rounded to a bf16
    tensor's dtype first, unlike in Tensor.mul_, which multiplies by it in float32."""
    return torch.tensor(value, dtype=torch.float64, device=like[0].device)


def warmup_cosine_schedule(base_lr: float, final_lr: float, total_iters: int, warmup_iters: int) -> np.ndarray:
    """lr for every iteration: linspace(0, base) over the warmup (first step at 0), then a cosine from
    base towards final over the remaining iterations. Past the end the lr is `final_lr`."""
    warmup = np.linspace(0.0, base_lr, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    cosine = final_lr + 0.5 * (base_lr - final_lr) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def lr_at(schedule: np.ndarray, it: int, final_lr: float) -> float:
    return float(schedule[it]) if it < len(schedule) else final_lr


def warmup_cosine_v2(base_lr: float, ratio: float, it: int, total_iters: int, warmup_iters: int) -> float:
    """Dinomaly2's WarmupCosineScheduler at step `it` (steps done): base * it / W over the warm-up (step W-1
    is just below base, unlike v1's linspace), then a cosine from base to base * ratio; past the end
    base * ratio. Dinomaly2 uses ratio 1: a constant rate after the warm-up."""
    if it < warmup_iters:
        return base_lr * it / warmup_iters
    progress = min(it - warmup_iters, total_iters - warmup_iters) / (total_iters - warmup_iters)
    return base_lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class GroupSchedule:
    """Every parameter group's learning rate at a step, each following the schedule of its own base rate
    `bases[i]` (the recipe has one group, at `lr`). v1: the recipe's schedule of lr -> final_lr, scaled by
    base / lr; v2: warmup_cosine_v2 of each base with the ratio final_lr / lr."""

    def __init__(self, cfg: dict, bases: list[float]):
        self.cfg, self.bases = cfg, bases
        self.v1 = warmup_cosine_schedule(cfg["lr"], cfg["final_lr"], cfg["total_iters"], cfg["warmup_iters"])

    def __call__(self, it: int) -> list[float]:
        cfg = self.cfg
        if cfg["lr_schedule"] == "v2":
            return [warmup_cosine_v2(base, cfg["final_lr"] / cfg["lr"], it, cfg["total_iters"], cfg["warmup_iters"])
                    for base in self.bases]
        lr = lr_at(self.v1, it, cfg["final_lr"])
        return [lr if base == cfg["lr"] else lr * base / cfg["lr"] for base in self.bases]
