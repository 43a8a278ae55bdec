"""How a DPO run reads its data and is refused: rows of pairs, rejects by reason, the objective checks.

Pure: no model weights, no Ray (the training itself: tests/dist/test_dpo_train.py).
"""

from __future__ import annotations

import json

import pytest

from omni_ray.config import ConfigError, load_config
from omni_ray.data.reader import InputPolicy, iter_rows
from omni_ray.launch.driver import check_objective
from omni_ray.strategies.deepspeed import deepspeed_config

PAIR = {"id": "p", "image": "a.png", "question": "What color is the shape?", "chosen": "red", "rejected": "blue"}
SFT = {"id": "s", "image": "a.png", "conversations": [{"role": "user", "content": "<image>\nWhat color?"},
                                                      {"role": "assistant", "content": "red"}]}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (path.parent / "a.png").write_bytes(b"")
    return path


def test_pair_rows_carry_prompt_and_both_answers_and_bad_pairs_are_rejected_by_reason(tmp_path):
    records = [PAIR, {**PAIR, "id": "no-rejected", "rejected": ""}, {**PAIR, "id": "same", "rejected": " red "},
               {**PAIR, "id": "two-images", "question": "<image><image> which?"}, SFT]
    rows = list(iter_rows([str(_jsonl(tmp_path / "pairs.jsonl", records))], None, InputPolicy(pairs=True)))
    assert rows[0]["reason"] == "" and rows[0]["image_refs"] == [str(tmp_path / "a.png")]
    assert json.loads(rows[0]["messages"]) == {
        "prompt": [{"role": "user", "content": "<image>\nWhat color is the shape?"}], "chosen": "red",
        "rejected": "blue"}
    assert [r["reason"] for r in rows[1:]] == ["missing_response", "identical_responses", "placeholder_mismatch",
                                               "missing_response"]
    # The same file read for SFT: pairs are not conversations (the driver refuses it before this).
    assert {r["reason"] for r in iter_rows([str(tmp_path / "pairs.jsonl")], None)} == {"unsupported_field", ""}


def _config(tmp_path, records, objective, **data):
    train = _jsonl(tmp_path / "train.jsonl", records)
    return load_config({"model": {"path": "/models/m"}, "data": {"train": str(train), **data},
                        "train": {"objective": objective}})


@pytest.mark.parametrize(("records", "objective", "words"), [
    ([PAIR], "sft", ["data.train:", "preference pairs (rlaif_v format)", "train.objective: dpo"]),
    ([SFT, SFT], "dpo", ["data.train:", "without a rejected answer", "train.objective: sft"]),
])
def test_the_objective_must_fit_the_data(tmp_path, records, objective, words):
    with pytest.raises(ConfigError) as err:
        check_objective(_config(tmp_path, records, objective))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_fitting_data_passes_and_eval_with_dpo_is_refused(tmp_path):
    check_objective(_config(tmp_path, [PAIR], "dpo"))
    check_objective(_config(tmp_path, [SFT], "sft"))
    cfg = _config(tmp_path, [PAIR], "dpo", eval=str(tmp_path / "train.jsonl"))
    with pytest.raises(ConfigError, match="data.eval: evaluation over preference pairs"):
        check_objective(cfg)


def test_zero3_keeps_no_parameter_gathered_under_dpo():
    cfg = load_config({"model": {"path": "/m"}, "data": {"train": "/d.jsonl"}, "train": {"objective": "dpo"},
                       "strategy": {"name": "deepspeed", "zero_stage": 3}})
    assert deepspeed_config(cfg.strategy, cfg.train)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    sft = cfg.model_copy(update={"train": cfg.train.model_copy(update={"objective": "sft"})})
    assert "stage3_param_persistence_threshold" not in deepspeed_config(sft.strategy, sft.train)["zero_optimization"]
