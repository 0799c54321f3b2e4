"""Token logprobs and entropy from final hidden states, chunked over the sequence.

The naive path, ``log_softmax(hidden @ W.T)``, materialises a float32 [T, V] tensor (plus its
softmax and its gradient in backward): at T=32k, V=152k that is ~20 GB per copy. `token_logprobs`
never holds more than a [chunk_size, V] block: forward computes each chunk's logits, keeps only
three numbers per token (target logprob, logsumexp, entropy) and drops the logits; backward
recomputes each chunk's logits from the saved hidden states and weight (a custom autograd
Function, the same trade as Liger's fused linear cross-entropy).

Math, per token with logits z = W h / tau, p = softmax(z), y the target:

    logprob = z_y - lse(z)                         d logprob / dz = onehot(y) - p
    entropy = lse(z) - sum_j p_j z_j               d entropy / dz = -p * (log p + entropy)

The matmul runs in the LM head's dtype (as in the sampler, so bf16 rounding of the logits matches
what the sampler saw) and the logits are upcast to float32 (float64 for float64 weights, as in
the tests) before softmax. The weight gradient is accumulated in that float32 dtype, a (V, H)
buffer the size of the fp32 gradient an optimizer keeps anyway, and cast back once at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_logprobs"]


def _logits(hidden: Tensor, weight: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    z = (hidden.to(weight.dtype) @ weight.T).to(dtype)  # (C, V)
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, temperature: float):
        # hidden (N, H), weight (V, H), targets (N,) long
        dtype = torch.promote_types(weight.dtype, torch.float32)
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=dtype, device=hidden.device)  # (N,)
        entropy = torch.empty(n, dtype=dtype, device=hidden.device)  # (N,)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)  # (N,)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = _logits(hidden[start:end], weight, dtype, temperature)  # (C, V)
            chunk_lse = torch.logsumexp(z, dim=-1)  # (C,)
            target_z = z.gather(1, targets[start:end, None]).squeeze(1)  # (C,)
            p = torch.softmax(z, dim=-1)  # (C, V), the only other block alive
            mean_z = torch.bmm(p[:, None, :], z[:, :, None]).view(-1)  # (C,) sum_j p_j z_j, no (C, V) temporary
            del p
            logprobs[start:end] = target_z - chunk_lse
            entropy[start:end] = chunk_lse - mean_z
            lse[start:end] = chunk_lse
            del z  # before the next chunk's logits exist, or two chunks' blocks are alive at once
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = lse.dtype
        n = hidden.shape[0]
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(n, dtype=dtype, device=hidden.device)
        if grad_entropy is None:
            grad_entropy = torch.zeros(n, dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None  # (V, H)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            g_lp = grad_logprobs[start:end, None].to(dtype)  # (C, 1)
            g_ent = grad_entropy[start:end, None].to(dtype)  # (C, 1)
            logp = _logits(hidden[start:end], weight, dtype, temperature)  # (C, V), made log p in place
            logp.sub_(lse[start:end, None])
            p = logp.exp()  # (C, V)
            # dL/dz = g_lp * (onehot - p) - g_ent * p * (log p + H)
            #       = -p * (g_lp + g_ent * (log p + H)) + g_lp * onehot
            grad_z = logp.add_(entropy[start:end, None]).mul_(g_ent).add_(g_lp).mul_(p).neg_()  # (C, V)
            del p
            grad_z.scatter_add_(1, targets[start:end, None], g_lp)
            if temperature != 1.0:
                grad_z.div_(temperature)
            if need_h:
                grad_hidden[start:end] = (grad_z.to(weight.dtype) @ weight).to(hidden.dtype)  # (C, H)
            if need_w:
                h = hidden[start:end].to(dtype)  # (C, H)
                grad_weight.addmm_(grad_z.T, h)  # (V, H) += (V, C) @ (C, H)
            del grad_z, logp  # as in forward: free this chunk's block before the next one
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Logprob of each target token and the entropy of each next-token distribution.

    hidden: (..., H) final hidden states (after the final norm); weight: (V, H), the LM head
    (tied or not; no bias); targets: (...) long, the next token at each position (every entry
    must be a valid id: packing puts a pad id, masked by the loss mask, where there is none).
    `temperature` must be the sampler's, or trainer and sampler logprobs disagree by design.

    Returns (logprobs, entropy), each shaped like `targets`, in float32 (float64 for float64
    inputs); both carry gradients to `hidden` and `weight`.

    Peak extra memory is about two [chunk_size, V] blocks in the compute dtype, in forward and in
    backward (plus a float32 (V, H) weight-gradient buffer). Only positions that carry loss need logprobs: index the hidden states with the
    loss mask before calling this to skip prompt and observation tokens altogether.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not align")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not (V, H={hidden.shape[-1]})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_targets = targets.reshape(-1).long()  # (N,)
    logprobs, entropy = _ChunkedLogprobs.apply(flat_hidden, weight, flat_targets, chunk_size, temperature)
    return logprobs.view(shape), entropy.view(shape)
