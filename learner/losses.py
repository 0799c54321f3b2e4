"""Policy losses: DAPO (token-level clipped policy gradient, no KL) and the RFT SFT loss.

Both take per-token tensors of any one shape (a padded (B, T) batch, a packed (T,) row) and a
`loss_mask` that is 1 on the model tokens that carry loss: prompt and tool-observation tokens are
0, and so are whole sequences removed by overlong filtering (see `learner.packing`).

Token-level normalisation (DAPO eq. 8): the loss is a sum over every model token of the batch
divided by the number of model tokens of the WHOLE batch, not a mean of per-sequence means, so a
long trajectory weighs in proportion to its tokens. With micro-batches, pass that batch-wide count
as `num_tokens` to every micro-batch: the micro-batch losses then add up to the batch loss and
their accumulated gradients equal the batch gradient. Diagnostics follow the same rule: every
mean is a sum over the micro-batch divided by `num_tokens`, so `merge_metrics` over the
micro-batches gives batch-wide means (maxima take the max, counts add).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["dapo_loss", "merge_metrics", "sft_loss"]

# exp() of a log-ratio past this is a diverged policy, not a ratio; clamping keeps it finite
# (verl does the same). It only changes tokens whose ratio is beyond e^20, already far outside
# the clip range.
_MAX_LOG_RATIO = 20.0


def _denominator(loss_mask: Tensor, num_tokens: float | None) -> float | Tensor:
    if num_tokens is None:
        return loss_mask.sum().clamp(min=1)
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return float(num_tokens)


def _check_shapes(**tensors: Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-token tensors must share one shape, got {shapes}")


def dapo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    num_tokens: float | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    sampler_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    entropies: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """-J_DAPO (DAPO eq. 8 without the expectation), optionally with truncated importance sampling.

        loss = -1/N * sum_{i,t} m_it * w_it * min(r_it * A_it, clip(r_it, 1 - eps_low, 1 + eps_high) * A_it)

    r = exp(logprobs - old_logprobs), N = `num_tokens` (default: m.sum(), this call is the whole
    batch), w = 1 without TIS, else min(exp(old_logprobs - sampler_logprobs), tis_cap) (Yao et al.,
    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"): it corrects for the
    sampler (vLLM) and trainer computing different probabilities for the same policy. No KL term.

    All per-token tensors share one shape. `logprobs` carries the gradient; `old_logprobs` are the
    trainer's logprobs under the policy that sampled (no grad; in a fully on-policy step they are
    ``logprobs.detach()``); `advantages` are already broadcast over tokens; `sampler_logprobs` are
    the sampler's for the same tokens (for TIS and the `gap/*` diagnostics); `entropies` are only
    logged.

    Returns (loss, metrics). Clip fractions count tokens where the clip is active, i.e. where it
    zeroes the token's gradient: `clip/low_frac` A < 0 and r < 1 - eps_low, `clip/high_frac` A > 0
    and r > 1 + eps_high. `policy/approx_kl` is the k3 estimator (r - 1) - log r of KL(old || new).
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                  loss_mask=loss_mask, sampler_logprobs=sampler_logprobs, entropies=entropies)
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if tis_cap is not None and sampler_logprobs is None:
        raise ValueError("tis_cap is set but no sampler_logprobs were given")
    if tis_cap is not None and not tis_cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")

    mask = loss_mask.to(logprobs.dtype)
    denom = _denominator(mask, num_tokens)
    old = old_logprobs.detach().to(logprobs.dtype)
    adv = advantages.detach().to(logprobs.dtype)

    log_ratio = (logprobs - old).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if tis_cap is not None:
        tis_weight = (old - sampler_logprobs.detach().to(old.dtype)).exp().clamp(max=tis_cap)
        surrogate = surrogate * tis_weight
    loss = -(surrogate * mask).sum() / denom

    with torch.no_grad():
        ratio = ratio.detach()
        log_ratio = log_ratio.detach()
        names = ["loss/policy", "clip/low_frac", "clip/high_frac", "policy/approx_kl", "policy/ratio_mean"]
        values = [
            loss.detach(),
            ((adv < 0) & (ratio < 1 - eps_low)).to(mask.dtype).mul(mask).sum() / denom,
            ((adv > 0) & (ratio > 1 + eps_high)).to(mask.dtype).mul(mask).sum() / denom,
            ((ratio - 1 - log_ratio) * mask).sum() / denom,
            (ratio * mask).sum() / denom,
        ]
        if entropies is not None:
            names.append("policy/entropy")
            values.append((entropies.detach().to(mask.dtype) * mask).sum() / denom)
        if sampler_logprobs is not None:
            gap = (old - sampler_logprobs.to(old.dtype)).abs() * mask
            names += ["gap/sampler_trainer_abs_mean", "gap/sampler_trainer_abs_max"]
            values += [gap.sum() / denom, gap.max() if gap.numel() else gap.sum()]
        if tis_cap is not None:
            names += ["tis/weight_mean", "tis/capped_frac"]
            values += [(tis_weight * mask).sum() / denom,
                       ((tis_weight >= tis_cap).to(mask.dtype) * mask).sum() / denom]
        names.append("tokens/model")
        values.append(mask.sum())
        floats = torch.stack([torch.as_tensor(v, dtype=mask.dtype, device=mask.device) for v in values])
        metrics = dict(zip(names, floats.tolist()))  # one device sync for all of them
    return loss, metrics


def sft_loss(
    logprobs: Tensor, loss_mask: Tensor, *, num_tokens: float | None = None
) -> tuple[Tensor, dict[str, float]]:
    """RFT loss: mean negative log-likelihood over the model tokens of the batch.

    Same normalisation as `dapo_loss`: a sum over masked tokens divided by `num_tokens` (the
    batch-wide count; default: this call's count). Build the batch with `packing.rft_samples`,
    which keeps only resolved trajectories.
    """
    _check_shapes(logprobs=logprobs, loss_mask=loss_mask)
    mask = loss_mask.to(logprobs.dtype)
    denom = _denominator(mask, num_tokens)
    loss = -(logprobs * mask).sum() / denom
    values = torch.stack([loss.detach(), mask.sum().detach()]).tolist()
    return loss, {"loss/sft": values[0], "tokens/model": values[1]}


def merge_metrics(total: Mapping[str, float], part: Mapping[str, float]) -> dict[str, float]:
    """Combine the metrics of two micro-batches of one batch (see the module docstring).

    Names ending in `_max` take the max; everything else adds (means are already divided by the
    batch-wide token count, `tokens/model` is a count). Start from ``{}``.
    """
    out = dict(total)
    for name, value in part.items():
        if name not in out:
            out[name] = value
        elif name.endswith("_max"):
            out[name] = max(out[name], value)
        else:
            out[name] = out[name] + value
    return out
