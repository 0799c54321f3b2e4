"""Chunked logprobs/entropy equal the naive full-logits computation, in value and gradient."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from learner.ops import token_logprobs

F64 = torch.float64


def naive(hidden, weight, targets, temperature=1.0):
    logits = (hidden @ weight.T) / temperature  # (N, V)
    logp = logits.log_softmax(-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def inputs(n=7, h=4, v=11, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_naive(chunk_size, temperature):
    hidden, weight, targets = inputs()
    g = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(7, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)

    lp, ent = token_logprobs(hidden, weight, targets, chunk_size=chunk_size, temperature=temperature)
    ref_lp, ref_ent = naive(hidden, weight, targets, temperature)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)

    grads = torch.autograd.grad((lp * up_lp).sum() + (ent * up_ent).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_lp * up_lp).sum() + (ref_ent * up_ent).sum(), (hidden, weight))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck_against_finite_differences():
    hidden, weight, targets = inputs(n=5, h=3, v=6)
    assert torch.autograd.gradcheck(
        lambda h, w: token_logprobs(h, w, targets, chunk_size=2, temperature=0.9), (hidden, weight)
    )


def test_gradient_through_logprobs_alone():
    # the loss usually uses logprobs only; the entropy output then gets no gradient
    hidden, weight, targets = inputs()
    lp, _ = token_logprobs(hidden, weight, targets, chunk_size=3)
    got = torch.autograd.grad(lp.sum(), (hidden, weight))
    want = torch.autograd.grad(naive(hidden, weight, targets)[0].sum(), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_batched_shapes_and_float32():
    hidden, weight, targets = inputs(n=12, dtype=torch.float32)
    lp, ent = token_logprobs(hidden.view(3, 4, -1), weight, targets.view(3, 4), chunk_size=5)
    assert lp.shape == ent.shape == (3, 4) and lp.dtype == torch.float32
    ref_lp, ref_ent = naive(hidden, weight, targets)
    torch.testing.assert_close(lp.view(-1), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.view(-1), ref_ent, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_float32_logprobs_and_bfloat16_grads():
    hidden, weight, targets = inputs(n=6, h=8, v=32, dtype=torch.float32)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    lp, _ = token_logprobs(h16, w16, targets, chunk_size=4)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert h16.grad.dtype == w16.grad.dtype == torch.bfloat16

    h32 = h16.detach().float().requires_grad_()
    w32 = w16.detach().float().requires_grad_()
    ref_lp, _ = naive(h32, w32, targets)
    ref_lp.sum().backward()
    torch.testing.assert_close(lp, ref_lp, rtol=0.02, atol=0.05)
    torch.testing.assert_close(h16.grad.float(), h32.grad, rtol=0.02, atol=0.05)
    torch.testing.assert_close(w16.grad.float(), w32.grad, rtol=0.02, atol=0.05)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_full_logits():
    n, v, chunk = 64, 50, 8
    hidden, weight, targets = inputs(n=n, h=4, v=v)

    with _LargestTensor() as chunked:
        lp, ent = token_logprobs(hidden, weight, targets, chunk_size=chunk)
        (lp.sum() + ent.sum()).backward()
    assert chunked.largest <= chunk * v

    with _LargestTensor() as full:  # the probe sees the naive path's (N, V) logits
        lp, ent = naive(hidden, weight, targets)
        (lp.sum() + ent.sum()).backward()
    assert full.largest >= n * v


def test_rejects_misaligned_inputs():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="align"):
        token_logprobs(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(hidden, weight.T, targets)
