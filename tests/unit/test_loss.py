"""The chunked loss equals the plain logits loss, and so do its gradients (one process, fp32).

Cases: chunk sizes that do and do not divide the token count; a frozen and a trained head; a
head tied to the input embeddings (MiniCPM-V 4.6) and an untied one (LLaVA); and the head run
inside a real transformers model through ``head_loss``. FSDP2 / ZeRO-3: tests/dist/test_loss_engines.py.
"""

from __future__ import annotations

import pytest
import torch

from omni_ray.data.conversation import IGNORE_INDEX
from omni_ray.train.loss import ChunkedLinearCrossEntropy, chunk_tokens, head_loss, linear_cross_entropy, token_loss_sum

RTOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= RTOL * float(b.abs().max()) + 1e-12


def random_labels(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[:, : length // 3] = IGNORE_INDEX  # a prompt that is not trained on
    labels[0, -2:] = IGNORE_INDEX  # right padding
    return labels


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("train_weight", [True, False])
def test_function_matches_plain_loss_and_grads(chunk, train_weight):
    torch.manual_seed(0)
    hidden = torch.randn(2, 23, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=train_weight)
    labels = random_labels(2, 23, 50)
    plain = token_loss_sum(hidden @ weight.t(), labels)
    plain_grads = torch.autograd.grad(plain, [hidden, weight] if train_weight else [hidden])
    chunked = linear_cross_entropy(hidden, weight, labels, chunk)
    chunked_grads = torch.autograd.grad(chunked, [hidden, weight] if train_weight else [hidden])
    assert close(chunked, plain)
    for got, want in zip(chunked_grads, plain_grads, strict=True):
        assert close(got, want)


def test_upstream_gradient_scales():
    """The loop scales the loss by world/tokens before backward: the gradient must follow."""
    torch.manual_seed(1)
    h = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (9,))
    (g1,) = torch.autograd.grad(ChunkedLinearCrossEntropy.apply(h, w, t, 4) * 0.25, [w])
    (g2,) = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum") * 0.25, [w])
    assert close(g1, g2)


def test_chunk_bounds_logits_memory():
    assert chunk_tokens(248_094) * 248_094 * 4 <= 128 * 2**20
    assert chunk_tokens(10**12) == 1


def _tiny(arch: str):
    """A tiny real transformers VLM built in memory (no tokenizer needed for the loss)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.minicpmv4_6 import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    from omni_ray.models.tiny import _text_config

    torch.manual_seed(0)
    if arch == "minicpmv4_6":  # lm_head tied to embed_tokens, as in the real checkpoint
        text = {**_text_config("qwen3_5_text", 300, 4), "tie_word_embeddings": True}
        cfg = MiniCPMV4_6Config(text_config=text, tie_word_embeddings=True,
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, patch_size=14, image_size=56))
        return MiniCPMV4_6ForConditionalGeneration(cfg)
    cfg = LlavaConfig(text_config={**_text_config("llama", 300, 2), "tie_word_embeddings": False},
                      vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
                      tie_word_embeddings=False)
    return LlavaForConditionalGeneration(cfg)


@pytest.mark.parametrize("arch", ["minicpmv4_6", "llava"])
@pytest.mark.parametrize("head_trained", [True, False])
def test_head_loss_inside_model(arch, head_trained):
    model = _tiny(arch)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == (arch == "minicpmv4_6")
    for name, p in model.named_parameters():
        # the last decoder layer always trains, so hidden-state gradients are checked too
        p.requires_grad_(".layers.1." in name or ".layers.3." in name or (head_trained and name.startswith("lm_head")))
    model.lm_head.weight.requires_grad_(head_trained)
    trained = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 300, (2, 19))
    labels = random_labels(2, 19, 300)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}

    plain = token_loss_sum(model(**inputs).logits, labels)
    plain_grads = torch.autograd.grad(plain, trained)
    with head_loss(model.lm_head, labels, chunk=5):
        chunked = model(**inputs).logits
    chunked_grads = torch.autograd.grad(chunked, trained)
    assert chunked.dim() == 0 and close(chunked, plain)
    assert all(close(a, b) for a, b in zip(chunked_grads, plain_grads, strict=True))
    assert model(**inputs).logits.shape == (2, 19, 300)  # the head is itself again after the block


def test_the_first_log_line_names_the_kernels_in_use_on_cpu():
    from omni_ray.train.loss import fast_paths

    line = fast_paths(torch.device("cpu"))
    # CPU never takes the CUDA-only kernels, installed or not.
    assert "loss chunked-torch" in line and "linear attention torch reference" in line and "attention sdpa" in line


def test_a_zero3_partitioned_head_still_takes_the_chunked_loss(caplog):
    """Outside the forward ZeRO-3 leaves an empty flat partition in ``.weight`` (its ``ds_shape`` is
    the real one) and gathers the matrix in the head's pre-forward hook: read at the 1.3B run, the
    head looked like no Linear and every step materialised [tokens, 248k] logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 32, bias=False)
    full = head.weight.data.clone()
    hidden = torch.randn(1, 6, 8)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 7, 1, 9]])
    head.weight.data = torch.empty(0)
    head.weight.ds_shape = full.shape
    calls = []
    plain = torch.nn.Linear.forward
    with caplog.at_level("WARNING"), head_loss(head, labels):
        head.weight.data = full  # what ZeRO-3's pre-forward hook does
        torch.nn.Linear.forward = lambda self, x: calls.append(1) or plain(self, x)
        try:
            loss = head(hidden)
        finally:
            torch.nn.Linear.forward = plain
    assert "materialises" not in caplog.text and calls == []
    assert float(loss) == pytest.approx(float(token_loss_sum(hidden @ full.t(), labels)), rel=1e-6)
