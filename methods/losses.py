"""MAXL's losses, on log-probabilities from log_softmax (never log(p + eps) of a softmax output)."""
import torch
import torch.nn.functional as F


def focal_weights(log_probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """-(1 - p)^gamma * log p, per sample and class."""
    return -(1 - log_probs.exp()).pow(gamma) * log_probs


def focal_loss(log_probs: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Batch mean of sum_k t_k (1 - p_k)^gamma (-log p_k); `target` is class ids or a soft distribution.

    The loss is linear in a soft target, so its gradient with respect to the target is `focal_weights / B`.
    """
    if target.dtype in (torch.int64, torch.int32):
        target = F.one_hot(target, log_probs.shape[1]).to(log_probs.dtype)
    return (target * focal_weights(log_probs, gamma)).sum(1).mean()


def soft_target_gradient(logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """d focal_loss(log_softmax(logits), t) / d t, which does not depend on t."""
    return focal_weights(logits.log_softmax(1), gamma) / logits.shape[0]


def negative_entropy(distribution: torch.Tensor) -> torch.Tensor:
    """sum_k m_k log m_k; of the batch-mean label distribution, MAXL's anti-collapse regulariser (minimising it
    spreads the batch over every auxiliary class). Classes with m_k = 0 (exactly: the masked softmax gives exact
    zeros) contribute 0 with a finite gradient, since the log is taken of max(m, tiny)."""
    return (distribution * distribution.clamp_min(torch.finfo(distribution.dtype).tiny).log()).sum()


def sample_entropy(soft_labels: torch.Tensor) -> torch.Tensor:
    """Entropy of each sample's label distribution (how soft the generated labels are)."""
    return -torch.special.xlogy(soft_labels, soft_labels).sum(1)


def gradient_cosine(grads_a, grads_b) -> torch.Tensor:
    """MAXL's COSSIM diagnostic: each gradient tensor reshaped to [dim0, -1], cosine per row, averaged per tensor,
    then over tensors. (For 1-d tensors a row is one number, so its cosine is the sign agreement.)"""
    per_tensor = [F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=1).mean()
                  for a, b in zip(grads_a, grads_b)]
    return torch.stack(per_tensor).mean()


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 under half-precision autocast, and in the model's own precision when that is wider
    (a float64 model stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
