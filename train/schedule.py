"""Learning-rate schedules, as pure functions of the iteration so a resumed run gets exactly the same rate.

- poly (the paper):  lr = base * (1 - it / max_it) ** power
- poly_step (the paper's text and the authors' code): the poly factor times gamma ** (epoch // step_epochs),
  i.e. the base rate is divided by 10 every 50 epochs while the poly decay runs over the whole training.
- constant: lr = base.
"""
from __future__ import annotations

import torch


def lr_factor(iteration: int, *, total_iters: int, iters_per_epoch: int, kind: str = "poly",
              power: float = 0.9, step_epochs: int = 50, step_gamma: float = 0.1) -> float:
    if kind == "constant":
        return 1.0
    progress = min(iteration, total_iters) / max(total_iters, 1)
    factor = (1.0 - progress) ** power
    if kind == "poly_step":
        factor *= step_gamma ** ((iteration // max(iters_per_epoch, 1)) // step_epochs)
    elif kind != "poly":
        raise ValueError(f"unknown lr schedule {kind!r}: expected 'poly', 'poly_step' or 'constant'")
    return factor


class IterationLR:
    """Sets the learning rate of every param group before each optimiser step.

    Call `.apply()` before `optimizer.step()` and `.advance()` after it. The only state is the iteration count,
    which goes into the checkpoint; the rate itself is recomputed from it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, *, total_iters: int,
                 iters_per_epoch: int, kind: str = "poly", power: float = 0.9, step_epochs: int = 50,
                 step_gamma: float = 0.1):
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.kw = dict(total_iters=total_iters, iters_per_epoch=iters_per_epoch, kind=kind, power=power,
                       step_epochs=step_epochs, step_gamma=step_gamma)
        self.iteration = 0
        self.last_lr = self.current_lr()  # the rate of the most recent step, for logs

    def current_lr(self) -> float:
        return self.base_lr * lr_factor(self.iteration, **self.kw)

    def apply(self) -> float:
        lr = self.last_lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.iteration += 1

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "base_lr": self.base_lr, **self.kw}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.last_lr = self.base_lr * lr_factor(max(self.iteration - 1, 0), **self.kw)
