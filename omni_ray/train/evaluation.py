"""Evaluation during training: loss over the whole eval set, and what the model now answers.

Worker side (it runs beside training on every rank and shares its loss and collate); the driver
and ``omni-ray report`` only read what it reports and the pages rank 0 writes.

    evaluator = Evaluator.for_run(cfg.data, cfg.eval, cfg.train, cfg.model, cfg.storage, keep_alive, run_uri)
    if evaluator and evaluator.due(step, total_steps):     # every rank, at the same steps
        metrics.update(evaluator(engine, step, rank, world, device))  # rank 0 also writes the page

* **Loss**: each rank takes every world-th eval sample; the summed token losses and token counts
  are all-reduced, so the result is the mean token loss over the whole set, the same number a
  single process gets for the same weights (``omni_ray.evaluate.evaluate_checkpoint``). Every
  rank runs the same number of forward passes (ranks short of samples run the vision keep-alive
  batch), because under FSDP2 / ZeRO-3 each forward gathers parameters from all ranks.
  The loss is training's own (``train.step.model_loss``: the output projection returns the
  token-sum loss chunk by chunk), so the [tokens, vocab] logits never exist here either (at
  MiniCPM-V 4.6's 248k vocabulary they would be 8 GB for 4 x 2k tokens in fp32).
* **Answers**: every rank decodes the same first ``num_samples`` prompts greedily,
  ``batch_size`` prompts per ``generate`` call (left-padded), with the model's KV cache: the
  vision encoder runs once per prompt and each new token costs one token's forward.
  ``synced_gpus`` keeps every rank forwarding until all are done, so under FSDP2 / ZeRO-3 the
  parameter gathers stay in lockstep. The answers are a function of the weights alone: two
  evaluations of one checkpoint give the same page. ``generate_recompute`` (the whole sequence,
  images included, for every token) is the reference the tests and ``bench/generation.py``
  compare against.

``engine`` is the run's Strategy, or ``SingleProcess(model)`` in one process: ``forward(inputs)``,
``generate(inputs, **kwargs)`` and ``unwrapped()``.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from omni_ray.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from omni_ray.data.batch import TOKEN_PADDING, Batch
from omni_ray.data.collate import collate
from omni_ray.data.conversation import IGNORE_INDEX, decode
from omni_ray.data.errors import DataError
from omni_ray.storage import StorageConfig
from omni_ray.train.step import model_loss

log = logging.getLogger(__name__)



@dataclass
class Prompt:
    """One generation prompt: model inputs up to the first answer, plus what the page shows."""

    id: str
    arrays: dict  # processed sample cut before the first answer token (images kept)
    stop_ids: tuple[int, ...]  # end-of-answer tokens: the token after the reference answer, eos
    question: str
    reference: str
    images_png: list[bytes]


@dataclass
class EvalSet:
    """data.eval as every rank holds it: the rows (paths or image bytes, as read), not their processed
    arrays, which are made again batch by batch at each evaluation. Memory is then the rows plus one
    batch, whatever the eval set's size (processed, one 10-slice photo is ~24 MB of fp32 pixels)."""

    rows: list[dict]  # rows of data.eval that process cleanly, in source order
    prompts: list[Prompt]  # the first eval.num_samples, processed (their arrays kept: few)
    process: Callable[[dict], dict]  # row -> processed sample (numpy arrays), as at load
    rejected: dict[str, int] = field(default_factory=dict)
    image_inputs: dict = field(default_factory=dict)
    pad_id: int = 0
    keep_alive: dict | None = None
    tokenizer: object = None

    def samples(self, rows: list[dict] | None = None) -> Iterator[dict]:
        """Processed samples of ``rows`` (default: all), one at a time."""
        for row in self.rows if rows is None else rows:
            yield self.process(row)

    @classmethod
    def load(cls, data: DataConfig, model: ModelConfig, storage: StorageConfig | None, num_samples: int,
             keep_alive: dict | None = None) -> "EvalSet":
        """Read and preprocess data.eval (same formats as data.train) in this process, in file order."""
        from omni_ray.data.pipeline import Preprocess

        pre = Preprocess(model, storage, data.model_max_length, data.max_image_pixels, data.max_image_bytes,
                         data.read_timeout_s, data.video_fps, data.video_max_frames)
        sp = pre.sample_processor
        rows, prompts, rejected = [], [], {}
        for row in read_rows(data.eval, data, storage):
            out = pre.process_row(row)
            if out["reason"]:
                rejected[out["reason"]] = rejected.get(out["reason"], 0) + 1
                continue
            rows.append(row)
            if len(prompts) < num_samples:
                prompts.append(_prompt(row, decode(out["sample"]), sp, pre))
        if num_samples > len(prompts):
            log.warning("eval.num_samples: %d, but data.eval has %d usable samples; the eval page shows %d",
                        num_samples, len(prompts), len(prompts))

        def process(row: dict) -> dict:
            out = pre.process_row(row)
            if out["reason"]:  # it processed at load: its image changed or went away since
                raise DataError(out["reason"], f"data.eval: sample {row.get('id')!r} processed when the run "
                                f"started and does not now ({out.get('detail') or out['reason']}); "
                                "restore it or remove it from data.eval")
            return decode(out["sample"])

        return cls(rows, prompts, process, rejected, sp.image_inputs, sp.tokenizer.pad_token_id or 0, keep_alive,
                   sp.tokenizer)


def read_rows(source: str, data: DataConfig, storage: StorageConfig | None) -> list[dict]:
    """Rows as training reads them (same reader, same policy), in any data form, in source order."""
    from omni_ray.data.reader import InputPolicy
    from omni_ray.data.sources import iter_source_rows, resolve_entry

    columns = data.columns.model_dump() if data.columns is not None else None
    entry = resolve_entry(source, storage, key="data.eval", columns=columns)
    return list(iter_source_rows(entry, storage, InputPolicy.from_data(data)))


def _prompt(row: dict, arrays: dict, sp, pre) -> Prompt:
    from omni_ray.data.images import encode_png

    labels = arrays["labels"]
    answer_at = np.flatnonzero(labels != IGNORE_INDEX)
    first = int(answer_at[0])
    # The first answer's labelled span ends with the end-of-turn token: generation stops there.
    run_end = first + int(np.argmax(np.diff(np.append(answer_at, answer_at[-1] + 2)) > 1))
    stop = {int(labels[run_end])} | ({sp.tokenizer.eos_token_id} if sp.tokenizer.eos_token_id is not None else set())
    cut = {k: (v[:first] if k in TOKEN_PADDING else v) for k, v in arrays.items()}  # every per-token array
    messages = json.loads(row["messages"])
    turn = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    images = [encode_png(image) for image in pre._inputs(row)[0]]  # the images the model saw, as PNG
    question = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages[:turn])
    return Prompt(str(row["id"]), cut, tuple(sorted(stop)), question, messages[turn]["content"], images)


def _sum_across_ranks(values: list[float]) -> list[float]:
    """Collective: every rank calls it with the same length."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


class SingleProcess:
    """A plain model with the three calls evaluation makes of an engine (one process, no sharding)."""

    def __init__(self, model):
        self.model = model

    def forward(self, inputs: dict):
        return self.model(**inputs)

    def generate(self, inputs: dict, **kwargs):
        return self.model.generate(**inputs, **kwargs)

    def unwrapped(self):
        return self.model


@torch.no_grad()
def eval_loss(engine, evalset: EvalSet, rank: int, world: int, device, batch_size: int) -> dict:
    """Mean token loss over the whole eval set (collective). Returns eval_loss and eval_tokens."""
    mine = evalset.rows[rank::world]
    most = -(-len(evalset.rows) // world)  # samples on the fullest rank: all ranks run its batch count
    loss_sum, tokens = 0.0, 0.0
    for start in range(0, most, batch_size):
        chunk = list(evalset.samples(mine[start:start + batch_size]))
        if not chunk and evalset.keep_alive is None:
            continue  # one process (no peers to keep in step)
        batch = collate(chunk, evalset.image_inputs, evalset.pad_id, evalset.keep_alive)
        loss_sum += float(model_loss(engine, batch.model_inputs(device), batch.labels))
        tokens += float(batch.label_tokens)
    loss_sum, tokens = _sum_across_ranks([loss_sum, tokens])
    return {"eval_loss": loss_sum / max(tokens, 1.0), "eval_tokens": int(tokens)}


def left_padded(batch: Batch) -> Batch:
    """The batch's per-token arrays with each row's padding moved to its start: generation appends
    new tokens at the end of every row, so the prompts must end there."""
    length = batch["attention_mask"].shape[1]
    shifts = (length - batch["attention_mask"].sum(1)).tolist()
    return Batch({k: torch.stack([row.roll(int(n)) for row, n in zip(v, shifts)]) if k in TOKEN_PADDING else v
                  for k, v in batch.items()})


def _until_stop(tokens: list[int], prompt: Prompt) -> list[int]:
    return tokens[:next((i for i, t in enumerate(tokens) if t in prompt.stop_ids), len(tokens))]


@torch.no_grad()
def generate_tokens(engine, prompts: list[Prompt], evalset: EvalSet, device, max_new_tokens: int,
                    batch_size: int) -> list[list[int]]:
    """Greedy answers' token ids (stop token excluded) with the KV cache, ``batch_size`` prompts per
    call (collective when distributed)."""
    from transformers import GenerationConfig

    synced = dist.is_initialized() and dist.get_world_size() > 1
    answers = []
    for start in range(0, len(prompts), batch_size):
        group = prompts[start:start + batch_size]
        inputs = left_padded(collate([p.arrays for p in group], evalset.image_inputs, evalset.pad_id)).model_inputs(device)
        # A fresh config: a checkpoint's generation_config.json (sampling, temperature) must not apply.
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                  eos_token_id=sorted({t for p in group for t in p.stop_ids}),
                                  pad_token_id=evalset.pad_id)
        out = engine.generate(inputs, generation_config=config, synced_gpus=synced)
        prompt_length = inputs["input_ids"].shape[1]
        answers += [_until_stop(row, p) for p, row in zip(group, out[:, prompt_length:].tolist())]
    return answers


def generate_answers(engine, prompts: list[Prompt], evalset: EvalSet, device, max_new_tokens: int,
                     batch_size: int) -> list[str]:
    """``generate_tokens`` decoded (special tokens dropped)."""
    return [evalset.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            for tokens in generate_tokens(engine, prompts, evalset, device, max_new_tokens, batch_size)]


@torch.no_grad()
def generate_recompute(engine, prompt: Prompt, evalset: EvalSet, device, max_new_tokens: int) -> list[int]:
    """Greedy answer's token ids by a full forward (vision encoder included) per new token, no cache.

    The reference ``generate_tokens`` is checked against and ``bench/generation.py``'s baseline.
    """
    arrays, new = dict(prompt.arrays), []
    for _ in range(max_new_tokens):
        logits = engine.forward(collate([arrays], evalset.image_inputs, evalset.pad_id).model_inputs(device)).logits
        token = int(logits[0, -1].argmax())
        if token in prompt.stop_ids:
            break
        new.append(token)
        for key in TOKEN_PADDING:
            if key in arrays:
                extra = token if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
                arrays[key] = np.append(arrays[key], extra)
    return new


def evaluate(engine, evalset: EvalSet, rank: int, world: int, device, batch_size: int,
             max_new_tokens: int) -> dict:
    """Eval loss and answers (collective); the model is in eval mode meanwhile (dropout off)."""
    model = engine.unwrapped()
    was_training = model.training
    model.eval()
    try:
        result = eval_loss(engine, evalset, rank, world, device, batch_size)
        answers = generate_answers(engine, evalset.prompts, evalset, device, max_new_tokens, batch_size)
        result["answers"] = [
            {"id": p.id, "question": p.question, "reference": p.reference, "images_png": p.images_png,
             "answer": answer}
            for p, answer in zip(evalset.prompts, answers)
        ]
    finally:
        model.train(was_training)
    return result


PAGE_STYLE = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
              ".sample{border:1px solid #ccc;border-radius:6px;padding:1em;margin:1em 0}"
              ".sample img{max-width:320px;max-height:320px;margin-right:.5em;border:1px solid #eee}"
              "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;margin:.2em 0}"
              ".label{font-weight:bold;font-size:.9em;color:#555}")


def render_page(answers: list[dict], step: int, eval_loss: float | None = None, title: str = "") -> str:
    """The eval page: per sample its images inline (data URIs), prompt, reference and model answer.

    A function of its inputs only (no timestamps), so the same checkpoint gives the same page.
    """
    esc = html.escape
    head = f"{esc(title)} step {step}" if title else f"step {step}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>eval {esc(head)}</title>"
             f"<style>{PAGE_STYLE}</style></head><body><h1>Evaluation at {esc(head)}</h1>"]
    if eval_loss is not None:
        parts.append(f"<p class='loss'>eval loss (whole eval set): <b>{eval_loss:.4f}</b></p>")
    for a in answers:
        imgs = "".join(f"<img alt='image {i}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
                       for i, png in enumerate(a["images_png"]))
        parts.append(
            f"<div class='sample' id='{esc(a['id'])}'><div class='label'>{esc(a['id'])}</div>{imgs}"
            f"<div class='label'>prompt</div><pre class='prompt'>{esc(a['question'])}</pre>"
            f"<div class='label'>reference</div><pre class='reference'>{esc(a['reference'])}</pre>"
            f"<div class='label'>model</div><pre class='answer'>{esc(a['answer'])}</pre></div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def page_name(step: int) -> str:
    return f"eval/step-{step}.html"


class Evaluator:
    """Evaluation inside a run: when it is due, and one call that returns the report's eval metrics.

    Built on every rank (each reads data.eval itself: it is small, and no Ray Data pipeline
    competes with training's for CPUs); called on every rank at the same steps (collective).
    Rank 0 writes ``eval/step-N.html`` straight into the run directory (local or S3, beside the
    checkpoints); the report carries its name (``eval_page``) and the eval loss.
    """

    def __init__(self, evalset: EvalSet, eval_cfg: EvalConfig, every: int | None, batch_size: int,
                 run_uri: str | None, storage: StorageConfig | None):
        self.evalset, self.cfg, self.every, self.batch_size = evalset, eval_cfg, every, batch_size
        self.run_uri, self.storage = run_uri, storage
        self.done_at: int | None = None

    @classmethod
    def for_run(cls, data: DataConfig, eval_cfg: EvalConfig, train: TrainConfig, model: ModelConfig,
                storage: StorageConfig | None, keep_alive: dict, run_uri: str | None) -> "Evaluator | None":
        """None when the run has no data.eval."""
        if not data.eval:
            return None
        evalset = EvalSet.load(data, model, storage, eval_cfg.num_samples, keep_alive)
        return cls(evalset, eval_cfg, train.eval_every, eval_cfg.batch_size or train.micro_batch_size, run_uri, storage)

    def due(self, step: int, total_steps: int) -> bool:
        """Every train.eval_every steps and at the last step (once per step)."""
        return step != self.done_at and (step == total_steps or bool(self.every and step % self.every == 0))

    def __call__(self, engine, step: int, rank: int, world: int, device) -> dict:
        import time

        from omni_ray import storage as st

        start = time.perf_counter()
        result = evaluate(engine, self.evalset, rank, world, device, self.batch_size, self.cfg.max_new_tokens)
        self.done_at = step
        metrics = {"eval_loss": result["eval_loss"], "eval_tokens": result["eval_tokens"],
                   "eval_seconds": time.perf_counter() - start, "eval_samples": len(self.evalset.rows),
                   "eval_answers": len(result["answers"])}
        if result["answers"] and self.run_uri:
            metrics["eval_page"] = page_name(step)
            if rank == 0:
                page = render_page(result["answers"], step, result["eval_loss"])
                st.write_bytes(st.join(self.run_uri, *page_name(step).split("/")), page.encode(), self.storage)
        return metrics


__all__ = ["EvalSet", "Evaluator", "Prompt", "SingleProcess", "evaluate", "eval_loss", "generate_answers",
           "generate_recompute", "generate_tokens", "left_padded", "page_name", "read_rows", "render_page"]
