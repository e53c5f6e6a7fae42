"""Learning-rate schedule as pure functions of the step (easy to test, nothing to checkpoint).

    lr
    peak |      ____
         |     /    ‾‾‾‾----____
         |    /                 ‾‾‾‾----____
     min |   /                              ‾‾‾‾ (held after decay_steps)
         +--/---------------------------------------> step
           0  warmup                        decay_steps

Step s (0-based, the step about to be taken) gets:
  warmup  (s < W):          peak * (s + 1) / W       (never 0, so step 0 already learns)
  decay   (W <= s < D):     min + (peak - min) * f(p),  p = (s - W) / (D - W) in [0, 1)
          polynomial/linear f = (1 - p) ** power  (power 1 = linear)
          cosine            f = (1 + cos(pi * p)) / 2
          constant          lr = peak
  after   (s >= D):         min (constant: peak)
"""

from __future__ import annotations

import math

from megatron_lime.training.config import OptimizerConfig


def warmup_steps(optimizer: OptimizerConfig, decay_steps: int) -> int:
    """Warmup length in steps: --lr-warmup-iters, or the fraction of the decay steps (rounded)."""
    if optimizer.lr_warmup_iters is not None:
        return optimizer.lr_warmup_iters
    if optimizer.lr_warmup_fraction is not None:
        return int(round(optimizer.lr_warmup_fraction * decay_steps))
    return 0


def lr_at(step: int, *, peak: float, min_lr: float, warmup: int, decay_steps: int,
          style: str = "polynomial", power: float = 1.0) -> float:
    """The learning rate of optimizer step `step` (0-based); see the module docstring."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if style == "constant":
        return peak
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup) / max(decay_steps - warmup, 1)
    if style in ("polynomial", "linear"):
        factor = (1.0 - progress) ** (power if style == "polynomial" else 1.0)
    elif style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr decay style {style!r} (polynomial, linear, cosine, constant)")
    return min_lr + (peak - min_lr) * factor


def lr_for_config(step: int, optimizer: OptimizerConfig, total_steps: int) -> float:
    """lr_at with the run's settings: decay over --lr-decay-iters (default: the whole run)."""
    decay_steps = optimizer.lr_decay_iters or total_steps
    return lr_at(step, peak=optimizer.lr, min_lr=optimizer.min_lr,
                 warmup=warmup_steps(optimizer, decay_steps), decay_steps=decay_steps,
                 style=optimizer.lr_decay_style, power=optimizer.lr_decay_power)


def schedule_record(optimizer: OptimizerConfig, total_steps: int) -> dict[str, int | float | str]:
    """The schedule as resolved for a run of `total_steps`: saved in lime_config.json, compared on resume."""
    decay_steps = optimizer.lr_decay_iters or total_steps
    return {"train_iters": total_steps, "lr_warmup_iters": warmup_steps(optimizer, decay_steps),
            "lr": optimizer.lr, "min_lr": optimizer.min_lr, "lr_decay_style": optimizer.lr_decay_style,
            "lr_decay_power": optimizer.lr_decay_power, "lr_decay_iters": decay_steps}
