"""Distillation of the MoE student from the dense teacher on self-generated text.

loss = KL(teacher || student) on the next-token distributions + hidden_weight x mean over layers of the normalised
MSE of the residual stream (sum |h_s - h_t|^2 / sum |h_t|^2). Routers always train (through a straight-through
softmax: forward weights stay exactly the unit/softmax top-k weights); with train_experts the routed and shared
experts train too. Adam, linear warm-up then cosine decay to 10%. The teacher's tensors are separate from the
student's (FACTS.md: a shared tensor silently trains the teacher).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from moemesh.convert.model import TrainableLlama
from moemesh.convert.settings import ConvertSettings


@dataclass
class DistillReport:
    steps: int
    seconds: float
    loss_first: float  # mean of the first 10 steps
    loss_last: float  # mean of the last 10 steps
    heldout_kl_before: float
    heldout_kl_after: float

    def to_json(self) -> dict:
        return asdict(self)


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student); logits [B, T, V]."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def hidden_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    terms = [((s.float() - t.float()) ** 2).sum() / (t.float() ** 2).sum().clamp_min(1e-12)
             for t, s in zip(teacher, student, strict=True)]
    return torch.stack(terms).mean()


def distill_loss(teacher: TrainableLlama, student: TrainableLlama, batch: torch.Tensor,
                 hidden_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, KL) of one batch [B, T]."""
    with torch.no_grad():
        t_hidden: list[torch.Tensor] = []
        t_logits = teacher(batch, hiddens=t_hidden)
    s_hidden: list[torch.Tensor] = []
    s_logits = student(batch, hiddens=s_hidden)
    kl = kl_loss(t_logits, s_logits)
    return kl + hidden_weight * hidden_loss(t_hidden, s_hidden), kl


def trainable_groups(student: TrainableLlama, settings: ConvertSettings) -> list[dict]:
    student.requires_grad_(False)
    routers, experts = [], []
    for moe in student.moe_layers():
        routers += list(moe.router.parameters())
        if settings.train_experts:
            experts += list(moe.routed.parameters())
            experts += list(moe.shared.parameters()) if moe.shared is not None else []
    groups = [{"params": routers, "lr": settings.lr_router}]
    if experts:
        groups.append({"params": experts, "lr": settings.lr_experts})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def lr_factor(step: int, total: int) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def heldout_kl(teacher: TrainableLlama, student: TrainableLlama, data: torch.Tensor, batch: int) -> float:
    total = 0.0
    for chunk in data.split(batch):
        with _autocast(chunk.device):
            total += float(kl_loss(teacher(chunk), student(chunk))) * chunk.shape[0]
    return total / max(1, data.shape[0])


def _autocast(device: torch.device):
    # bf16 matmuls on a GPU (the loss is still computed in float32); plain float32 on the CPU.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def distill(teacher: TrainableLlama, student: TrainableLlama, data: torch.Tensor, settings: ConvertSettings,
            progress: Callable[[str], None] | None = None, max_seconds: float | None = None) -> DistillReport:
    """Train `student` in place on sequences data [N, T] (held-out: the last 5%, at least one)."""
    n_hold = max(1, data.shape[0] // 20) if data.shape[0] > 1 else 0
    train, hold = data[: data.shape[0] - n_hold], data[data.shape[0] - n_hold:]
    opt = torch.optim.Adam(trainable_groups(student, settings))
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(settings.seed + 1)
    kl_before = heldout_kl(teacher, student, hold, settings.distill_batch) if n_hold else float("nan")
    for moe in student.moe_layers():
        moe.straight_through = True
    start, losses, every = time.perf_counter(), [], max(10, settings.distill_steps // 20)
    for step in range(settings.distill_steps):
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * lr_factor(step, settings.distill_steps)
        batch = train[torch.randint(0, train.shape[0], (settings.distill_batch,), generator=gen).to(train.device)]
        with _autocast(batch.device):
            loss, kl = distill_loss(teacher, student, batch, settings.hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress and (step % every == 0 or step + 1 == settings.distill_steps):
            progress(f"distill step {step + 1}/{settings.distill_steps} loss {losses[-1]:.4f} "
                     f"kl {float(kl.detach()):.4f}")
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    for moe in student.moe_layers():
        moe.straight_through = False
    student.requires_grad_(False)
    kl_after = heldout_kl(teacher, student, hold, settings.distill_batch) if n_hold else float("nan")
    return DistillReport(steps=len(losses), seconds=time.perf_counter() - start,
                         loss_first=sum(losses[:10]) / max(1, len(losses[:10])),
                         loss_last=sum(losses[-10:]) / max(1, len(losses[-10:])),
                         heldout_kl_before=kl_before, heldout_kl_after=kl_after)
