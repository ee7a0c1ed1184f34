"""The arithmetic of RL from a reward: the per-token KL penalty, generalised advantage estimation, the
critic-free baselines (RLOO, REINFORCE), whitening, and the clipped losses. Plain tensor functions, so
each is tested against numbers worked out by hand (tests/test_rl.py).

Shapes: (sequences, reply tokens) with a mask marking a reply's real tokens (1 up to and including its
EOS, 0 after); a sequence's score is a scalar given at its last real token.
"""

from __future__ import annotations

import torch


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities
    (Schulman's estimators): k1 = log p - log q (unbiased, can be negative), k3 = (q/p - 1) - log(q/p)
    (unbiased, never negative, lower variance)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (the mask may start anywhere: replies follow their prompts)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * (mask > 0)).max(-1).values


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * KL at every reply token, plus the sequence's score at its last token."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(len(score), device=score.device)
    rewards[rows, last_token_index(mask)] += score
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over reply tokens: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}, with V and A zero past a reply's last real token. Returns
    (advantages, returns = advantages + values), zero at masked positions."""
    values = values * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        following = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value * following - values[:, t]
        running = (delta + gamma * lam * running * following) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def rloo_advantages(returns: torch.Tensor, group: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each of a prompt's `group` samples is judged against the mean of the
    others, A_i = R_i - mean_{j != i} R_j. `returns` holds consecutive groups."""
    r = returns.view(-1, group)
    baseline = (r.sum(-1, keepdim=True) - r) / (group - 1)
    return (r - baseline).reshape(-1)


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Masked standardisation; `stats` = (mean, variance) when computed over several ranks."""
    if stats is None:
        n = mask.sum().clamp(min=1)
        mean = (values * mask).sum() / n
        var = (((values - mean) * mask) ** 2).sum() / n
    else:
        mean, var = stats
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, averaged over real tokens; also the fraction of tokens clipped."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    n = mask.sum().clamp(min=1)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / n
    clip_fraction = ((clipped > unclipped).float() * mask).sum() / n
    return loss, clip_fraction


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """The critic's clipped squared error: 0.5 max((V - R)^2, (clip(V, V_old +- clip) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (err * mask).sum() / mask.sum().clamp(min=1)
