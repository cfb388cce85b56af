"""The WGAN-GP critic loss (Gulrajani et al. 2017) against a float64 reference of the formula computed the plain
way, one critic call over the joint (real, fake, interpolated) batch; the spectral-norm power iteration it
advances; and its gradients under DistributedDataParallel with two gloo processes."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cocofast.losses.adversarial import AdversarialLoss
from cocofast.models import create_model

B, K, IMAGE_CHANNELS, SIZE = 3, 2, 3, 64
GP_WEIGHT, DRIFT_WEIGHT = 10.0, 1e-3


def make_critic(seed: int = 0) -> torch.nn.Module:
    """The paper's critic at a small width, its self-attention switched on (gamma starts at 0, which would
    hide the attention layers from every check)."""
    torch.manual_seed(seed)
    critic = create_model("discriminator", in_channels=K + IMAGE_CHANNELS, width=0.125).train()
    with torch.no_grad():
        for name, p in critic.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return critic


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, K, SIZE, SIZE, generator=g) * 3
    student = torch.randn(B, K, SIZE, SIZE, generator=g) * 3
    images = torch.rand(B, IMAGE_CHANNELS, SIZE, SIZE, generator=g)
    return teacher, student, images


def reference_loss(critic64, teacher, student, images, eps):
    """−E[D(real)] + E[D(fake)] + λ·E[(‖∇D(x̂)‖ − 1)²] + ε_drift·E[D(real)²] in float64, one joint call."""
    real = torch.cat([teacher.double().softmax(1), images.double()], 1)
    fake = torch.cat([student.double().softmax(1), images.double()], 1)
    interp = (eps.double() * real + (1 - eps.double()) * fake).requires_grad_(True)
    score_real, score_fake, score_interp = critic64(torch.cat([real, fake, interp])).chunk(3)
    (grad,) = torch.autograd.grad(score_interp.sum(), interp, create_graph=True)
    gp = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
    wasserstein = score_real.mean() - score_fake.mean()
    return -wasserstein + GP_WEIGHT * gp + DRIFT_WEIGHT * score_real.pow(2).mean(), wasserstein, gp


def power_iteration_vectors(critic) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in critic.named_buffers() if name.endswith(("_u", "_v"))}


def test_critic_loss_matches_the_float64_joint_batch_formula():
    critic = make_critic()
    critic64 = copy.deepcopy(critic).double()
    teacher, student, images = batch(1)
    adversarial = AdversarialLoss(critic, gp_weight=GP_WEIGHT, drift_weight=DRIFT_WEIGHT)
    torch.manual_seed(7)
    loss, terms = adversarial.critic_loss(teacher, student, images)
    loss.backward()
    torch.manual_seed(7)
    eps = torch.rand(B, 1, 1, 1)
    ref, wasserstein, gp = reference_loss(critic64, teacher, student, images, eps)
    ref.backward()

    assert gp.item() > 1e-3 and abs(wasserstein.item()) > 1e-5  # both terms carry weight in this check
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert terms["d_gp"].item() == pytest.approx(gp.item(), rel=1e-5, abs=1e-7)
    assert terms["d_wasserstein"].item() == pytest.approx(wasserstein.item(), rel=1e-4, abs=1e-7)
    assert terms["d_loss"].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert not any(t.requires_grad for t in terms.values())  # logged figures hold no graph
    ref_grads = dict(critic64.named_parameters())
    # fp32 rounding of terms of the largest gradient's size: the floor for gradients that nearly cancel (the last
    # bias's is ±1 per score, cancelled between real and fake down to the drift term's 2·ε·E[D(real)]).
    floor = 1e-6 * max(g.grad.abs().max().item() for g in ref_grads.values())
    for name, p in critic.named_parameters():
        expected = ref_grads[name].grad
        scale = expected.abs().max().item()
        # The key bias adds q·b to every key of a query's row, which the softmax removes: its gradient is 0.
        assert scale > 0 or name.endswith("key_conv.bias"), name
        err = (p.grad.double() - expected).abs().max().item()
        assert err <= 1e-4 * scale + floor, (name, err, scale)
    # One power iteration per critic step, as the single joint call advanced it.
    got, want = power_iteration_vectors(critic), power_iteration_vectors(critic64)
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-6)


def test_critic_loss_advances_the_power_iteration_once():
    critic = make_critic()
    once = copy.deepcopy(critic)
    start = power_iteration_vectors(critic)
    teacher, student, images = batch(2)
    AdversarialLoss(critic).critic_loss(teacher, student, images)
    with torch.no_grad():
        once(torch.zeros(1, K + IMAGE_CHANNELS, SIZE, SIZE))
    got, want = power_iteration_vectors(critic), power_iteration_vectors(once)
    for name in got:
        assert not torch.equal(got[name], start[name]), name  # it did advance
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


# --- DDP --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        critic = make_critic()
        # As train/stages.py wraps it: no buffer broadcast in forward (the critic is called twice per step).
        ddp = torch.nn.parallel.DistributedDataParallel(critic, broadcast_buffers=False)
        adversarial = AdversarialLoss(critic, critic_for_update=ddp)
        for step in range(2):  # the second step checks the reducer was left ready for the next one
            torch.manual_seed(100 * rank + step)
            ddp.zero_grad(set_to_none=True)
            loss, _ = adversarial.critic_loss(*batch(10 * rank + step))
            loss.backward()
        torch.save({name: p.grad.clone() for name, p in critic.named_parameters()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_critic_gradients_under_ddp_are_the_mean_of_each_rank_alone(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    # Each rank alone, the same two steps with no optimiser step between them (gradients of step 2 only).
    alone = []
    for rank in range(2):
        critic = make_critic()
        adversarial = AdversarialLoss(critic)
        for step in range(2):
            torch.manual_seed(100 * rank + step)
            critic.zero_grad(set_to_none=True)
            loss, _ = adversarial.critic_loss(*batch(10 * rank + step))
            loss.backward()
        alone.append({name: p.grad.clone() for name, p in critic.named_parameters()})
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, first in alone[0].items():
        mean = (first + alone[1][name]) / 2
        for rank in range(2):
            torch.testing.assert_close(got[rank][name], mean, rtol=1e-4, atol=1e-6)


# --- lazy regularisation (gp_every) ---------------------------------------------------------------------------
def test_lazy_penalty_weighs_k_times_on_its_steps_and_is_left_out_between():
    critic = make_critic()
    critic64 = copy.deepcopy(critic).double()
    teacher, student, images = batch(3)
    adversarial = AdversarialLoss(copy.deepcopy(critic), gp_weight=GP_WEIGHT, drift_weight=DRIFT_WEIGHT, gp_every=4)
    torch.manual_seed(7)
    loss, terms = adversarial.critic_loss(teacher, student, images, penalty=True)
    torch.manual_seed(7)
    ref, wasserstein, gp = reference_loss(critic64, teacher, student, images, torch.rand(B, 1, 1, 1))
    assert gp.item() > 1e-3
    assert loss.item() == pytest.approx((ref + 3 * GP_WEIGHT * gp).item(), rel=1e-5, abs=1e-7)  # 4 x the penalty
    assert terms["d_gp"].item() == pytest.approx(gp.item(), rel=1e-5, abs=1e-7)

    state = torch.get_rng_state()
    loss, terms = AdversarialLoss(copy.deepcopy(critic), gp_weight=GP_WEIGHT, drift_weight=DRIFT_WEIGHT,
                                  gp_every=4).critic_loss(teacher, student, images, penalty=False)
    assert torch.equal(torch.get_rng_state(), state)  # no interpolation drawn: the skipped pass is not made
    assert "d_gp" not in terms
    assert loss.item() == pytest.approx((ref - GP_WEIGHT * gp).item(), rel=1e-5, abs=1e-6)


def test_gp_every_refuses_what_is_not_a_positive_integer():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="gp_every"):
            AdversarialLoss(make_critic(), gp_every=bad)


def test_the_critic_update_penalises_every_kth_step_and_a_resumed_run_the_same_ones():
    from cocofast.train.schedule import IterationLR
    from cocofast.train.student import CriticUpdate

    class Recorder:
        gp_every = 3

        def __init__(self):
            self.flags, self.weight = [], torch.zeros((), requires_grad=True)

        def critic_loss(self, teacher, student, images, penalty):
            self.flags.append(penalty)
            return self.weight * 1.0, {}

    def update(start: int = 0):
        recorder = Recorder()
        opt = torch.optim.SGD([recorder.weight], lr=0.1)
        schedule = IterationLR(opt, 0.1, total_iters=100, iters_per_epoch=10)
        schedule.load_state_dict({**schedule.state_dict(), "iteration": start})
        return CriticUpdate(recorder, opt, schedule), recorder

    step, recorder = update()
    for _ in range(8):
        step(None, None, None)
    assert recorder.flags == [True, False, False, True, False, False, True, False]
    resumed, again = update(start=5)
    for _ in range(3):
        resumed(None, None, None)
    assert again.flags == recorder.flags[5:8]


def test_the_gp_every_key_reaches_the_critic_of_the_student_stage():
    from cocofast.train.config import TrainConfig
    from cocofast.train.networks import frozen, seg_kwargs
    from cocofast.train.runtime import Runtime
    from cocofast.train.stages import build_student_step

    cfg = TrainConfig(image_size=64, batch_size=2, teacher_width=0.125, student_width=0.25, disc_width=0.125,
                      losses="none", adversarial=True, gp_every=5)
    rt = Runtime(0, 1, 0, torch.device("cpu"), None)
    teacher = frozen(create_model(cfg.teacher_model, **seg_kwargs(cfg, "teacher")))
    step, *_ = build_student_step(cfg, rt, 10, [], teacher=teacher, paraphrasers=None)
    assert step.adversarial.gp_every == 5 and step.critic_update.adversarial is step.adversarial
