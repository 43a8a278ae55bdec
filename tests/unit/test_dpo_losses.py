"""DPO losses equal TRL's own code on the same log-probs (loss and gradients within 1e-6), and the
per-sequence log-probs computed chunkwise from hidden states equal the direct full-logits ones.

TRL's DPO loss lives inside ``DPOTrainer._compute_loss``; it is called unbound, on a stand-in
``self`` and a stand-in model that returns the per-token log-probs under test, so the numbers are
TRL's code path (sigmoid, robust, hinge, ipo, and the RPO-style ``sft`` term), not a copy. SimPO
is TRL's ``CPOTrainer.cpo_loss`` on length-normalised log-probs. cDPO (sigmoid with label
smoothing), which TRL 1.x no longer applies to ``sigmoid``, is checked against its formula
written out below, and against CPO's smoothed sigmoid on the log-ratios.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from omni_ray.data.conversation import IGNORE_INDEX
from omni_ray.train.preference import (PairLogps, logits_sequence_logps, mean_metrics, objective, pair_loss,
                                       sequence_logps)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.fixture(scope="module")
def trl():
    """TRL (the test extra) for the comparisons; the log-prob tests below run without it."""
    return pytest.importorskip("trl")

P, T = 5, 9  # pairs, positions per row


def _batch(seed: int):
    """Per-token log-probs (a leaf), a completion mask with answers of different lengths, reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * P, T, dtype=torch.long)
    for row in range(2 * P):
        start = int(torch.randint(2, 5, (1,), generator=g))
        mask[row, start:start + int(torch.randint(1, T - start + 1, (1,), generator=g))] = 1
    token_logps = (-torch.rand(2 * P, T - 1, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ref = -torch.rand(2 * P, generator=g, dtype=torch.float64) * 3 * mask.sum(1)
    return token_logps, mask, ref


def _trl_dpo(trl, token_logps, mask, ref, loss_types, weights, beta, label_smoothing=0.0):
    """TRL's DPOTrainer._compute_loss on these log-probs."""
    shift = mask[:, 1:]
    outputs = SimpleNamespace(log_probs=token_logps * shift, entropy=torch.zeros_like(token_logps),
                              mean_logits=torch.zeros_like(token_logps),
                              is_top1=torch.zeros_like(token_logps, dtype=torch.bool))
    identity = lambda x: x  # noqa: E731 - one process: gathers are the identity
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity,
                                  unwrap_model=identity)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=loss_types, loss_weights=weights, beta=beta, label_smoothing=label_smoothing,
                           use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1)
    rc, rr = ref.chunk(2)
    inputs = {"input_ids": torch.zeros(2 * P, T, dtype=torch.long), "attention_mask": torch.ones(2 * P, T),
              "completion_mask": mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return trl.DPOTrainer._compute_loss(stub, lambda **kw: outputs, inputs, False), stub._metrics["train"]


def _ours(token_logps, mask, ref, loss_type, beta, label_smoothing=0.0, sft_weight=0.0, gamma=0.0):
    shift = mask[:, 1:]
    logps = PairLogps.split((token_logps * shift).sum(1), shift.sum(1), None if loss_type == "simpo" else ref)
    part = pair_loss(logps, loss_type, beta, label_smoothing, gamma)
    return objective(part, sft_weight, P, float(logps.chosen_tokens.sum())), part


def _grad(loss, leaf):
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


CASES = [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.0, 0.7), ("robust", 0.1, 0.2, 0.0), ("hinge", 0.3, 0.0, 0.0),
         ("ipo", 0.1, 0.0, 0.0), ("ipo", 0.8, 0.0, 1.0)]


@pytest.mark.parametrize(("loss_type", "beta", "smoothing", "sft_weight"), CASES)
def test_loss_and_gradients_equal_trl(trl, loss_type, beta, smoothing, sft_weight):
    token_logps, mask, ref = _batch(seed=CASES.index((loss_type, beta, smoothing, sft_weight)))
    types, weights = [loss_type], [1.0]
    if sft_weight:
        types, weights = [loss_type, "sft"], [1.0, sft_weight]
    theirs, their_metrics = _trl_dpo(trl, token_logps, mask, ref, types, weights, beta, smoothing)
    ours, part = _ours(token_logps, mask, ref, loss_type, beta, smoothing, sft_weight)
    assert float(theirs.detach()) > 0
    assert abs(float(ours.detach()) - float(theirs.detach())) < 1e-6
    torch.testing.assert_close(_grad(ours, token_logps), _grad(theirs, token_logps), atol=1e-6, rtol=0)
    means = mean_metrics(part.metrics)
    for ours_key, trl_key in [("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                              ("rewards_margin", "rewards/margins"), ("rewards_accuracy", "rewards/accuracies"),
                              ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")]:
        assert math.isclose(means[ours_key], their_metrics[trl_key][0], abs_tol=1e-6), ours_key  # TRL averages in fp32


@pytest.mark.parametrize(("beta", "gamma", "smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_equals_trl_cpo(trl, beta, gamma, smoothing):
    from trl.experimental.cpo import CPOTrainer

    token_logps, mask, ref = _batch(seed=7)
    shift = mask[:, 1:]
    average = (token_logps * shift).sum(1) / shift.sum(1)
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=smoothing,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen, rejected = CPOTrainer.cpo_loss(stub, *average.chunk(2))
    ours, part = _ours(token_logps, mask, ref * float("nan"), "simpo", beta, smoothing, gamma=gamma)  # ref unused
    assert abs(float(ours) - float(losses.mean())) < 1e-6
    torch.testing.assert_close(_grad(ours, token_logps), _grad(losses.mean(), token_logps), atol=1e-6, rtol=0)
    assert math.isclose(mean_metrics(part.metrics)["rewards_chosen"], float(chosen.mean()), abs_tol=1e-9)
    assert math.isclose(mean_metrics(part.metrics)["rewards_rejected"], float(rejected.mean()), abs_tol=1e-9)


def test_cdpo_label_smoothing_is_the_written_formula(trl):
    """cDPO (Mitchell 2023): L = -(1-e) log sigmoid(beta Delta) - e log sigmoid(-beta Delta)."""
    from trl.experimental.cpo import CPOTrainer

    token_logps, mask, ref = _batch(seed=3)
    beta, eps = 0.2, 0.15
    shift = mask[:, 1:]
    pi_c, pi_r = (token_logps * shift).sum(1).chunk(2)
    ref_c, ref_r = ref.chunk(2)
    delta = (pi_c - ref_c) - (pi_r - ref_r)
    written = (-(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)).mean()
    stub = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=eps,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    cpo, _, _ = CPOTrainer.cpo_loss(stub, pi_c - ref_c, pi_r - ref_r)  # CPO's sigmoid on the log-ratios
    ours, _ = _ours(token_logps, mask, ref, "sigmoid", beta, eps)
    assert abs(float(ours) - float(written)) < 1e-6 and abs(float(cpo.mean()) - float(written)) < 1e-6
    torch.testing.assert_close(_grad(ours, token_logps), _grad(written, token_logps), atol=1e-6, rtol=0)
    plain, _ = _ours(token_logps, mask, ref, "sigmoid", beta)
    assert abs(float(plain) - float(ours)) > 1e-4  # smoothing changes the loss


def test_objective_splits_a_step_like_one_batch():
    """Micro-batches and ranks: sums divided by the whole step's pairs/tokens give the one-batch loss."""
    token_logps, mask, ref = _batch(seed=11)
    shift = mask[:, 1:]
    logps = PairLogps.split((token_logps * shift).sum(1), shift.sum(1), ref)
    whole = objective(pair_loss(logps, "sigmoid", 0.1), 0.5, P, float(logps.chosen_tokens.sum()))
    halves = [PairLogps(*(t[s] for t in (logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens,
                                          logps.ref_chosen, logps.ref_rejected))) for s in (slice(0, 2), slice(2, P))]
    # Two ranks, one half each: each backpropagates world_size x its share; the engine averages.
    parts = [objective(pair_loss(h, "sigmoid", 0.1), 0.5, P, float(logps.chosen_tokens.sum()), world_size=2)
             for h in halves]
    assert abs(float(sum(parts) / 2) - float(whole)) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_sequence_logps_equal_the_direct_computation(dtype):
    g = torch.Generator().manual_seed(0)
    B, L, H, V = 3, 11, 16, 37
    hidden = torch.randn(B, L, H, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :4] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    direct = logits_sequence_logps(hidden @ weight.t(), labels)
    chunked = sequence_logps(hidden, weight, labels, chunk=4)  # several chunks, one cut inside a row
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(chunked, direct, atol=tol, rtol=tol)
    assert direct.dtype == chunked.dtype == torch.float32
    upstream = torch.tensor([1.0, -2.0, 0.5])
    gd = torch.autograd.grad((direct * upstream).sum(), (hidden, weight))
    gc = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
    for a, b in zip(gc, gd):
        torch.testing.assert_close(a.float(), b.float(), atol=tol * 4, rtol=tol * 4)
    assert float(direct[0]) < 0 and float(gc[0].abs().sum()) > 0
