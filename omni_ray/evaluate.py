"""Evaluating a checkpoint in one plain process (no Ray, no process group).

* ``evaluate_checkpoint``: eval loss over ``data.eval`` and the eval page, computed exactly as
  a run computes them during training (``omni_ray.train.evaluation``), so a run's numbers and pages
  can be checked against it.
* ``choice_accuracy``: held-out accuracy by likelihood: which of a sample's candidate answers
  does the model prefer? Scoring every candidate (instead of generating text) makes accuracy
  exact and cheap on a tiny model: the answer with the highest total log-probability wins.
"""

from __future__ import annotations

import torch

from omni_ray.data.collate import collate
from omni_ray.data.conversation import IGNORE_INDEX, SampleProcessor


@torch.no_grad()
def choice_accuracy(model, sample_processor: SampleProcessor, items: list[dict], image_inputs: dict[str, int],
                    pad_id: int = 0) -> float:
    """``items``: {"messages": [user turn(s)], "images": [PIL], "choices": [str], "answer": str}."""
    model.eval()
    correct = 0
    for item in items:
        samples = [
            sample_processor(item["messages"] + [{"role": "assistant", "content": c}], item["images"])
            for c in item["choices"]
        ]
        # One candidate at a time keeps image packing trivially aligned with each row.
        scores = []
        for sample in samples:
            batch = collate([sample], image_inputs, pad_id)
            labels = batch.pop("labels")
            batch.pop("num_label_tokens")
            logits = model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            logp = torch.log_softmax(logits, -1)
            mask = target != IGNORE_INDEX
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores.append(float((picked * mask).sum()))
        choice = item["choices"][max(range(len(scores)), key=scores.__getitem__)]
        correct += choice == item["answer"]
    return correct / max(len(items), 1)


def evaluate_checkpoint(cfg, checkpoint_dir=None, step: int = 0) -> dict:
    """One process, no Ray: eval loss over data.eval and the eval page for a checkpoint (or the base).

    The reference for the distributed evaluation during training: the same set, the same
    greedy decoding, so a run's ``eval_loss`` and ``eval/step-N.html`` can be checked against it.
    ``cfg`` is the run's Config (model, freeze map and LoRA rebuild the trained model).
    """
    from omni_ray.train.evaluation import EvalSet, SingleProcess, evaluate, render_page
    from omni_ray.train.checkpoint import restore_model

    if not cfg.data.eval:
        raise ValueError("data.eval: not set; point it at an eval JSON/JSONL file or prepared prefix")
    model, _, _ = restore_model(cfg.model, cfg.freeze, cfg.lora, cfg.train, cfg.storage, checkpoint_dir)
    evalset = EvalSet.load(cfg.data, cfg.model, cfg.storage, cfg.eval.num_samples)
    result = evaluate(SingleProcess(model), evalset, 0, 1, torch.device("cpu"),
                      cfg.eval.batch_size or cfg.train.micro_batch_size, cfg.eval.max_new_tokens)
    result["page"] = render_page(result["answers"], step, result["eval_loss"])
    return result
