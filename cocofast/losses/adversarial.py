"""Adversarial distillation with a Wasserstein critic and gradient penalty (Gulrajani et al. 2017), as CoCo
DistillNet uses it: the critic D learns to tell the teacher's predictions from the student's, and the student
learns to fool it.

    critic loss     −E[D(real)] + E[D(fake)] + gp_weight · E[(‖∇D(x̂)‖ − 1)²] + drift_weight · E[D(real)²]
    student term    L_g = −E[D(fake)]

real = the teacher's prediction, fake = the student's, x̂ a random interpolation of the two; each is the
critic's input built by `critic_input`: [softmax(logits), image] (the paper) or the logits alone (the
authors' code). The drift term (Karras et al. 2018, progressive GANs, ε = 1e-3 there) keeps the scores near
zero, since nothing else bounds a Wasserstein critic's output; the paper has none, so the default is 0.

With gp_every = k > 1 the penalty is computed on one critic step in k only, at weight k · gp_weight: lazy
regularisation (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN", for their R1
penalty), which keeps its average pull and skips the double backward, most of a critic step's cost, on the
other steps. The paper penalises every step (k = 1, the default).

Both take tensors and a critic module; the optimiser steps live with the trainer.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from cocofast.losses.base import check_non_negative, widen

CRITIC_INPUTS = ("probs_image", "logits")


def critic_input(logits: torch.Tensor, images: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in CRITIC_INPUTS:
        raise ValueError(f"critic_input: kind must be one of {', '.join(CRITIC_INPUTS)}, got {kind!r}")
    if kind == "logits":
        return widen(logits)
    return torch.cat([widen(logits).softmax(dim=1), images.float()], dim=1)


class AdversarialLoss(nn.Module):
    """The student's term L_g = −E[D(fake)] (`forward`) and the critic's WGAN-GP loss (`critic_loss`).

    `critic` scores the student's term with its parameters untouched; `critic_for_update` (e.g. the critic
    wrapped in DistributedDataParallel, default: `critic`) is the one whose gradients the critic loss builds;
    it is called twice before the one backward, which DDP allows (every parameter is reduced once, in that
    backward; tests/test_losses_adversarial.py checks the averaged gradients over two gloo processes).
    """

    def __init__(self, critic: nn.Module, *, weight: float = 0.1, gp_weight: float = 10.0,
                 drift_weight: float = 0.0, input_kind: str = "probs_image",
                 critic_for_update: nn.Module | None = None, gp_every: int = 1):
        super().__init__()
        if isinstance(gp_every, bool) or not isinstance(gp_every, int) or gp_every < 1:
            raise ValueError(f"AdversarialLoss: gp_every must be an integer >= 1, got {gp_every!r}")
        self.gp_every = gp_every
        self.critic = critic
        self.critic_for_update = critic_for_update if critic_for_update is not None else critic
        self.weight = check_non_negative("AdversarialLoss", "weight", weight)
        self.gp_weight = check_non_negative("AdversarialLoss", "gp_weight", gp_weight)
        self.drift_weight = check_non_negative("AdversarialLoss", "drift_weight", drift_weight)
        if input_kind not in CRITIC_INPUTS:
            raise ValueError(f"AdversarialLoss: input_kind must be one of {', '.join(CRITIC_INPUTS)}, "
                             f"got {input_kind!r}")
        self.input_kind = input_kind

    def critic_loss(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                    images: torch.Tensor, penalty: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Real and fake go through the critic in one call, the interpolated samples in a second one.
        `penalty=False` (the steps lazy regularisation skips) leaves the second call and d_gp out; with it,
        the penalty weighs gp_weight · gp_every.

        The penalty differentiates the critic twice, and only at x̂; in one joint (real, fake, x̂) batch both
        differentiations ran over all 3B rows (zeros for real and fake), about three times the work. Both calls
        use one spectral-norm weight (`parametrize.cached`): one power iteration per critic step, as one call
        made, and the same values (the critic treats each image on its own).
        """
        real = critic_input(teacher_logits.detach(), images, self.input_kind)
        fake = critic_input(student_logits.detach(), images, self.input_kind)
        if penalty:
            eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
            interp = (eps * real + (1 - eps) * fake).requires_grad_(True)
        with parametrize.cached():
            score_real, score_fake = self.critic_for_update(torch.cat([real, fake])).float().chunk(2)
            if penalty:
                score_interp = self.critic_for_update(interp).float()
                (grad,) = torch.autograd.grad(score_interp.sum(), interp, create_graph=True)
        wasserstein = score_real.mean() - score_fake.mean()
        loss = -wasserstein
        terms = {"d_wasserstein": wasserstein}
        if penalty:
            grad_norm = torch.sqrt(grad.flatten(1).pow(2).sum(dim=1) + 1e-12)
            gp = (grad_norm - 1).pow(2).mean()
            loss = loss + self.gp_weight * self.gp_every * gp
            terms["d_gp"] = gp
        if self.drift_weight:
            drift = score_real.pow(2).mean()
            loss = loss + self.drift_weight * drift
            terms["d_drift"] = drift
        terms["d_loss"] = loss
        # Detached, not read: reading a value waits for the device (the trainer reads them once per interval).
        return loss, {name: value.detach() for name, value in terms.items()}

    def forward(self, student_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """weight · L_g; the critic is held fixed (no parameter gradients, no DDP call)."""
        self.critic.requires_grad_(False)
        try:
            score = self.critic(critic_input(student_logits, images, self.input_kind)).float()
        finally:
            self.critic.requires_grad_(True)
        return self.weight * -score.mean()

    def extra_repr(self) -> str:
        return (f"weight={self.weight:g}, gp_weight={self.gp_weight:g}, gp_every={self.gp_every}, "
                f"drift_weight={self.drift_weight:g}, "
                f"input_kind={self.input_kind!r}")
