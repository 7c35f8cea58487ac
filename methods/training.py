"""The reference's guarded optimisation step, shared by the meta-learning and the supervised epochs."""
from collections.abc import Callable

import torch
import torch.distributed as dist

RETRIES = 6  # recomputations of a non-finite loss before the step is skipped (the reference's count)
SKIPPED_STEPS = "train/skipped_steps"  # the tracker total of the steps skipped for a non-finite loss


def _finite_on_all_ranks(loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank skips together, or none does
    return bool(finite)


def guarded_step(compute: Callable[[], tuple[torch.Tensor, dict]], optimizer: torch.optim.Optimizer) -> dict | None:
    """zero_grad, (loss, metrics) = compute(), backward, step. A NaN/Inf loss is recomputed up to RETRIES times
    (dropout and DropBlock draw anew); if it stays non-finite the step is skipped and None returned. A singular
    linear solve inside `compute` counts as a non-finite loss."""
    for _ in range(1 + RETRIES):
        optimizer.zero_grad(set_to_none=True)
        try:
            loss, metrics = compute()
        except torch.linalg.LinAlgError:  # a ridge solve on non-finite features: the same as a non-finite loss
            loss, metrics = torch.tensor(float("nan")), {}
        if _finite_on_all_ranks(loss):
            loss.backward()
            optimizer.step()
            return metrics
    return None
