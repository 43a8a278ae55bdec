"""Token-sum cross-entropy from the last hidden states: the full logits never exist.

The [tokens, vocab] logits are the largest activation of a VLM step: at MiniCPM-V 4.6's 248k
vocabulary one 1k-token sample has 1 GB of fp32 logits, and autograd keeps them (and their
softmax) for the backward. Here the loss is summed chunk by chunk of tokens, and the backward
recomputes each chunk's logits instead of storing them, so the peak is one chunk
(``chunk_tokens(vocab)`` rows) whatever the sequence length. Only positions with a label are
projected at all: prompt and image tokens never reach the vocabulary matmul.

On CUDA, liger-kernel's fused linear cross-entropy (Triton) does the same in one kernel when it
is installed (the ``gpu`` extra); otherwise ``ChunkedLinearCrossEntropy`` below, in PyTorch.

How it plugs into a model: every transformers VLM ends its forward with
``logits = self.lm_head(hidden_states)`` and returns ``logits`` untouched. ``head_loss`` makes
the head, for one forward, return the loss instead of the logits. The head still runs inside
the model's forward, so FSDP2 and ZeRO-3 gather its sharded weight there as for any layer, a
tied embedding is simply the same weight, and a frozen head gets no weight gradient.

    with head_loss(model.lm_head, labels):
        loss = model(**inputs).logits      # a 0-dim token-sum loss
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from omni_ray.data.conversation import IGNORE_INDEX

log = logging.getLogger(__name__)

# fp32 logits per chunk: 128 MiB keeps the transient (logits + softmax + their grad) well under
# a GB at any vocabulary, and is still ~270 tokens of matmul per chunk at 248k tokens.
CHUNK_BYTES = 128 * 2**20


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i) over rows, chunk by chunk; recomputed in backward.

    hidden [N, H], weight [V, H], targets [N] (all valid). The matmul runs in the inputs' dtype
    and the softmax in fp32, as ``lm_head`` followed by ``logits.float()`` would.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):  # noqa: D102 - autograd protocol
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start:start + chunk] @ weight.t()).float()
            total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102 - autograd protocol
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated over chunks in fp32 so a bf16 head gets one rounding, not one per chunk.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start:start + ctx.chunk]
            t = targets[start:start + ctx.chunk]
            grad_logits = torch.softmax((h @ weight.t()).float(), dim=-1)
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_logits = (grad_logits * grad_out).to(hidden.dtype)
            if need_hidden:
                grad_hidden[start:start + ctx.chunk] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.t() @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype) if need_weight else None, None, None


@functools.cache
def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def fused_loss_backend(device: torch.device) -> str:
    """Which implementation ``linear_cross_entropy`` uses on ``device`` (for the run's first log line)."""
    return "liger" if device.type == "cuda" and _liger() is not None else "chunked-torch"


def fast_paths(device: torch.device) -> str:
    """The optional GPU kernels this run uses, for its first log line (the ``gpu`` extra installs them)."""
    import importlib.util

    cuda = device.type == "cuda"
    fla = cuda and importlib.util.find_spec("fla") is not None
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    return (f"loss {fused_loss_backend(device)} linear cross-entropy (no [tokens, vocab] logits are held); "
            f"linear attention {'flash-linear-attention' if fla else 'torch reference'}; "
            f"attention {'flash-attention varlen available' if flash else 'sdpa'}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over label positions: hidden [B, T, H], labels [B, T]."""
    targets = labels[:, 1:].to(hidden.device)
    if is_fake(hidden):  # omni_ray.memory's estimate: shapes only, every position counts as labelled
        h, t = hidden[:, :-1].reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    else:
        keep = targets != IGNORE_INDEX
        h, t = hidden[:, :-1][keep], targets[keep]
    if fused_loss_backend(hidden.device) == "liger" and t.numel():
        return _liger()(h, weight, t, reduction="sum").float()
    return ChunkedLinearCrossEntropy.apply(h, weight, t, chunk or chunk_tokens(weight.shape[0]))


def is_plain_head(head: torch.nn.Module) -> bool:
    """A bias-free Linear: its weight can go straight into the chunked loss at forward time.

    ZeRO-3 keeps a flat, empty partition in ``.weight`` outside the forward (its pre-forward hook
    gathers the whole matrix); ``ds_shape`` is the real shape then.
    """
    weight = getattr(head, "weight", None)
    shape = getattr(weight, "ds_shape", getattr(weight, "shape", ()))
    return isinstance(weight, torch.Tensor) and getattr(head, "bias", None) is None and len(shape) == 2


@contextlib.contextmanager
def head_loss(head: torch.nn.Module, labels: torch.Tensor, chunk: int | None = None):
    """Within the block, ``head(hidden)`` returns the token-sum loss against ``labels`` instead of logits.

    A head that is not a plain bias-free Linear (a LoRA-adapted lm_head) keeps its own forward,
    and the loss is taken from its full logits: correct, without the memory saving.
    """
    if not is_plain_head(head):
        log.warning("lm_head %s is not a bias-free Linear: the loss materialises its logits",
                    type(head).__name__)
        original = head.forward
        head.forward = lambda hidden: token_loss_sum(original(hidden), labels)
    else:
        # head.weight is read at call time: FSDP2 / ZeRO-3 swap in the gathered weight in their
        # pre-forward hooks, which run before this forward.
        head.forward = lambda hidden: linear_cross_entropy(hidden, head.weight, labels, chunk)
    try:
        yield head
    finally:
        del head.forward  # the class's forward again


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: next-token cross-entropy over label positions from full logits (fp32 softmax)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


__all__ = ["ChunkedLinearCrossEntropy", "chunk_tokens", "fast_paths", "fused_loss_backend", "head_loss", "is_plain_head",
           "linear_cross_entropy", "token_loss_sum"]
