"""The update every trainer shares: inner epochs x minibatches of one global permutation of the batch; per
minibatch zero_grad, the algorithm's backward passes, gradients summed over ranks, grad-norm clip, AdamW step, EMA.

Across ranks the minibatches are global (one permutation of the whole batch, drawn on every rank from the run's
generator); each rank back-propagates its members' share of the minibatch mean, so the update equals the
single-process one. Statistics stay on the device: each minibatch's sums over this rank's samples are kept as
tensors, summed over ranks and read back once per update call (no host sync per optimizer step).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from ..utils import dist as D
from .parallel import all_reduce_grads_

__all__ = ["Minibatch", "ema_update", "minibatch_steps", "step_settings"]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """theta_ema <- decay theta_ema + (1 - decay) theta (buffers copied)."""
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def step_settings(rl, *, inner_epochs: int, minibatches: int, ema_decay: float | None = None) -> SimpleNamespace:
    """What `minibatch_steps` reads, for a trainer that sets its own passes and minibatch count: those, with rl's
    grad-norm clip and EMA decay (or `ema_decay` where given)."""
    return SimpleNamespace(inner_epochs=int(inner_epochs), minibatches=int(minibatches), grad_clip=float(rl.grad_clip),
                           ema_decay=float(rl.ema_decay if ema_decay is None else ema_decay))


@dataclass(frozen=True)
class Minibatch:
    """One minibatch of the global batch: its rows `idx`, this rank's rows among them (`mine`: global indices,
    `local`: indices into this rank's tensors) and `share`, this rank's part of the minibatch mean."""
    idx: torch.Tensor
    mine: torch.Tensor
    local: torch.Tensor
    share: float


def minibatch_steps(net: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer, rl,
                    generator: torch.Generator, *, batch: int, rows: range, names: Sequence[str],
                    divisors: Sequence[float], backward: Callable[[Minibatch, object], torch.Tensor],
                    epoch_draws: Callable[[], object] | None = None) -> dict:
    """rl.inner_epochs x rl.minibatches optimizer steps on a batch of `batch` rows (this rank holds `rows`).

    `backward(mb, draws)` runs the algorithm's backward passes on minibatch `mb` and returns the float64 sums of its
    statistics over this rank's samples (one per name); `epoch_draws()` makes the random draws an epoch needs after
    its permutation. Returns each statistic's mean over the updates of sum / minibatch size / its divisor, and
    grad_norm (the norm before clipping)."""
    n_mb = max(1, min(int(rl.minibatches), batch))
    params = [p for p in net.parameters() if p.requires_grad]
    sums, norms, sizes = [], [], []
    for _ in range(int(rl.inner_epochs)):
        perm = torch.randperm(batch, generator=generator)
        draws = epoch_draws() if epoch_draws is not None else None
        for idx in perm.chunk(n_mb):
            mine = idx[(idx >= rows.start) & (idx < rows.stop)]
            mb = Minibatch(idx=idx, mine=mine, local=mine - rows.start, share=mine.numel() / idx.numel())
            optimizer.zero_grad(set_to_none=True)
            sums.append(backward(mb, draws))
            all_reduce_grads_(params)
            norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), rl.grad_clip))
            optimizer.step()
            ema_update(ema, net, rl.ema_decay)
            sizes.append(idx.numel())
    return update_means(sums, norms, sizes, names, divisors)


def update_means(sums: list[torch.Tensor], norms: list[torch.Tensor], sizes: list[int], names: Sequence[str],
                 divisors: Sequence[float]) -> dict:
    """The logged means over the updates: every update's sums, added over ranks (one reduction), divided by its
    minibatch size and the divisors, averaged; the grad norms averaged. One read back to the host."""
    device = norms[0].device
    totals = torch.stack([s.to(device) for s in sums])
    D.all_reduce_sum_(totals)
    div = torch.tensor(list(divisors), dtype=torch.float64, device=device)
    acc = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
    for total, norm, size in zip(totals, norms, sizes):
        acc = acc + torch.cat([total / size / div, norm.double().reshape(1)])
    values = (acc / len(sizes)).tolist()
    return {**dict(zip(names, values[:-1])), "grad_norm": values[-1]}


def stat_sums(*terms: torch.Tensor) -> torch.Tensor:
    """The float64 vector of `terms` (sums over this rank's samples: floats or counts), on their device."""
    return torch.stack([t.detach().double() for t in terms])
