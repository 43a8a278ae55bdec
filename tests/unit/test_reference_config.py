"""The repository's copy of the published MiniCPM-V 4.6 config.json: intact, and the size validate prints.

``omni_ray/models/reference/MiniCPM-V-4_6/config.json`` is the published checkpoint's config
(README beside it). validate builds the model it describes on the meta device (no weights, no
memory): 1,300,428,016 parameters, not the 9.1B of transformers' default ``MiniCPMV4_6Config``.

Run: python -m pytest -q tests/unit/test_reference_config.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "omni_ray/models/reference/MiniCPM-V-4_6"
SHA256 = "9efa01664561330952fa66df2d8be40659c97de2970abe16841c6dd7659d02c0"


def test_reference_config_is_the_published_file():
    assert hashlib.sha256((REFERENCE / "config.json").read_bytes()).hexdigest() == SHA256
    assert SHA256 in (REFERENCE.parent / "README.md").read_text()
    config = json.loads((REFERENCE / "config.json").read_text())
    assert config["model_type"] == "minicpmv4_6" and config["tie_word_embeddings"] is True
    assert (config["vision_config"]["num_hidden_layers"], config["text_config"]["num_hidden_layers"]) == (27, 24)


def test_validate_prints_the_real_size_and_a_tied_lm_head_trains(tmp_path, capsys):
    """lm_head: full alone on the tied 4.6: the shared matrix trains (on main: "the plan trains nothing")."""
    from omni_ray.launch import cli

    config = tmp_path / "v46.yaml"
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                                      '"content": "a"}]}\n')
    config.write_text(f"model: {{path: '{REFERENCE}'}}\ndata: {{train: {tmp_path / 'd.jsonl'}}}\n"
                      "freeze: {vision: frozen, projector: frozen, llm: frozen, lm_head: full}\n")
    assert cli.main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "1,300,428,016" in out
    assert "lm_head is tied to the input embeddings" in out
    assert "254,048,256    254,048,256" in out  # embed_tokens = lm_head: 248,094 x 1,024, all trainable
