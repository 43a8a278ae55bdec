"""Config strictness: what a typo or a YAML surprise becomes is an error naming the key and the fix.

Each row is a YAML fragment merged into a minimal valid config; the error must name the key and
must not repeat a secret. Pure: no servers, no Ray.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from omni_ray.config import DEEPSPEED_TOP_LEVEL_KEYS, ConfigError, load_config

BASE = "model: {path: /models/m}\ndata: {train: /data/train.jsonl}\n"


def _load(tmp_path: Path, extra: str, overrides: list[str] | None = None):
    path = tmp_path / "c.yaml"
    extra = textwrap.dedent(extra)
    top = {line.split(":")[0] for line in extra.splitlines() if line and not line.startswith(" ")}
    base = "".join(line + "\n" for line in BASE.splitlines() if line.split(":")[0] not in top)
    path.write_text(base + extra)
    return load_config(path, overrides)


BAD = [
    # (id, yaml, words the one message must contain)
    ("duplicate-key", "train:\n  lr: 1.0e-4\n  lr: 1.0e-3\n", ["lr", "set twice", "lines 4 and 5", "keep one"]),
    ("duplicate-section", "train: {lr: 1.0e-4}\ntrain: {epochs: 2}\n", ["train", "set twice"]),
    ("yes-as-int", "train: {micro_batch_size: yes}\n", ["train.micro_batch_size", "whole number"]),
    ("bool-as-float", "train: {lr: on}\n", ["train.lr", "expected a number"]),
    ("string-as-bool", "scaling: {use_gpu: 'no'}\n", ["scaling.use_gpu", "true or false"]),
    ("word-as-bool", "data: {train: /d.jsonl, shuffle: maybe}\n", ["data.shuffle", "true or false"]),
    ("inf-lr", "train: {lr: .inf}\n", ["train.lr", "finite"]),
    ("inf-grad-norm", "train: {max_grad_norm: .inf}\n", ["train.max_grad_norm", "finite"]),
    ("nan-dropout", "lora: {dropout: .nan}\n", ["lora.dropout", "finite"]),
    ("inf-in-dict", "freeze: {lr: {projector: .inf}}\n", ["freeze.lr.projector", "finite"]),
    ("bool-resources", "scaling: {resources_per_worker: {CPU: true}}\n", ["scaling.resources_per_worker.CPU"]),
    ("negative-resource", "scaling: {resources_per_worker: {CPU: 1, spot_gpu: -1}}\n",
     ["scaling.resources_per_worker", "spot_gpu", "0 or more"]),
    ("gpu-resource-without-use-gpu", "scaling: {resources_per_worker: {GPU: 1}}\n",
     ["scaling.resources_per_worker", "scaling.use_gpu: true", "custom resource"]),
    ("zero-gpu-with-use-gpu", "scaling: {use_gpu: true, resources_per_worker: {CPU: 2, GPU: 0}}\n",
     ["scaling.resources_per_worker", "GPU is 0", "scaling.use_gpu: false"]),
    ("float-as-int", "train: {grad_accum: 2.5}\n", ["train.grad_accum", "whole number"]),
    ("last-n-on-frozen", "freeze: {vision: {mode: frozen, last_n_layers: 4}}\n",
     ["freeze.vision.last_n_layers", "frozen", "set freeze.vision.mode"]),
    ("lr-on-frozen", "freeze: {vision: frozen, lr: {vision: 1.0e-5}}\n", ["freeze.lr.vision", "frozen"]),
    ("per-group-on-full", "freeze: {projector: full}\nlora: {per_group: {projector: {r: 4}}}\n",
     ["lora.per_group.projector", "not lora"]),
    ("per-group-via-flag", "tune_vision: true\nlora: {per_group: {vision: {r: 4}}}\n",
     ["lora.per_group.vision", "full, not lora"]),
    ("endpoint-credentials", "storage: {endpoint_url: 'http://AKIAFAKE:s3cr3tv4lue@minio:9000'}\n",
     ["storage.endpoint_url", "credentials", "instance profile"]),
    ("model-path-credentials", "model: {path: 'https://user:s3cr3tv4lue@hub.example/m'}\n",
     ["model.path", "credentials"]),
    ("run-storage-credentials", "run: {storage_path: 's3://AKIAFAKE:s3cr3tv4lue@bucket/runs'}\n",
     ["run.storage_path", "credentials"]),
    ("deepspeed-typo", "strategy: {name: deepspeed, deepspeed_extra: {zero_optimisation: {stage: 3}}}\n",
     ["strategy.deepspeed_extra", "zero_optimisation", "deepspeed.ai"]),
    ("resume-typo", "checkpoint: {resume: weights}\n", ["checkpoint.resume"]),
]


@pytest.mark.parametrize("extra, words", [(y, w) for _, y, w in BAD], ids=[i for i, _, _ in BAD])
def test_bad_config_is_an_error_naming_the_key_and_the_fix(tmp_path, extra, words):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, extra)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    assert "s3cr3tv4lue" not in message and "AKIAFAKE" not in message, "the error repeats a secret"
    assert "Traceback" not in message


GOOD = [
    # (id, yaml, check on the loaded Config)
    ("exponent-without-dot", "train: {lr: 2e-5}\n", lambda c: c.train.lr == 2e-5),
    ("custom-worker-resource", "scaling: {num_workers: 2, resources_per_worker: {CPU: 1, spot_gpu: 1}}\n",
     lambda c: c.scaling.resources_per_worker == {"CPU": 1.0, "spot_gpu": 1.0}),
    ("gpu-count-with-use-gpu", "scaling: {use_gpu: true, resources_per_worker: {CPU: 4, GPU: 2}}\n",
     lambda c: c.scaling.resources_per_worker["GPU"] == 2.0),
    ("int-for-float", "train: {lr: 1, max_grad_norm: 2}\n", lambda c: c.train.max_grad_norm == 2.0),
    ("lora-on-llm-via-flags", "tune_llm: false\nuse_lora: true\nlora: {per_group: {llm: {r: 4}}}\n",
     lambda c: c.freeze.llm.mode == "lora" and c.lora.per_group["llm"]["r"] == 4),
    ("lr-on-frozen-group-with-override",
     "freeze: {vision: frozen, lr: {vision: 1.0e-5}, overrides: [{pattern: 'vision\\.post', mode: full}]}\n",
     lambda c: c.freeze.lr["vision"] == 1e-5),
    ("last-n-on-lora", "freeze: {llm: {mode: lora, last_n_layers: 2}}\n", lambda c: c.freeze.llm.last_n_layers == 2),
    ("endpoint-without-credentials", "storage: {endpoint_url: 'http://minio:9000'}\n",
     lambda c: c.storage.endpoint_url == "http://minio:9000"),
    ("deepspeed-known-key", "strategy: {name: deepspeed, deepspeed_extra: {zero_optimization: {stage: 3}}}\n",
     lambda c: "zero_optimization" in c.strategy.deepspeed_extra),
    ("resume-weights-only", "checkpoint: {resume: weights_only}\n", lambda c: c.checkpoint.resume == "weights_only"),
]


@pytest.mark.parametrize("extra, check", [(y, c) for _, y, c in GOOD], ids=[i for i, _, _ in GOOD])
def test_valid_config_loads(tmp_path, extra, check):
    assert check(_load(tmp_path, extra))


def test_set_overrides_are_as_strict_as_the_file(tmp_path):
    assert _load(tmp_path, "", ["train.lr=2e-5"]).train.lr == 2e-5
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        _load(tmp_path, "", ["train.micro_batch_size=yes"])
    with pytest.raises(ConfigError, match="train.lr"):
        _load(tmp_path, "", ["train.lr=.inf"])


def test_deepspeed_key_list_names_only_keys_deepspeed_reads():
    """Every key we accept appears as a quoted string in the installed DeepSpeed's runtime code."""
    import importlib.util

    spec = importlib.util.find_spec("deepspeed")  # located, not imported: importing takes seconds
    assert spec is not None, "deepspeed is a dependency; install it"
    root = Path(spec.origin).parent
    source = "\n".join(p.read_text(errors="ignore") for p in root.rglob("*.py"))
    quoted = set(re.findall(r"""["']([a-z_0-9]+)["']""", source))
    missing = sorted(DEEPSPEED_TOP_LEVEL_KEYS - quoted)
    assert not missing, f"not found in DeepSpeed's source: {missing}"


@pytest.fixture(scope="module")
def minicpmv_processor_dir(tmp_path_factory):
    """A real MiniCPM-V 4.6 processor saved as a checkpoint holds it (processor_config.json)."""
    from omni_ray.models.tiny import build_tiny_processor

    out = tmp_path_factory.mktemp("minicpmv_processor")
    build_tiny_processor("minicpmv4_6").save_pretrained(out)
    return out


def test_garbage_processor_kwarg_is_an_error_naming_it_and_the_valid_names(minicpmv_processor_dir):
    from omni_ray.config import ModelConfig
    from omni_ray.models.processor_check import check_processor_kwargs

    # transformers itself drops the misspelt key without a word: the run would train at 112.
    bad = ModelConfig(path=str(minicpmv_processor_dir), processor={"scale_resolution": 224, "scale_resoluton": 448})
    with pytest.raises(ConfigError) as err:
        check_processor_kwargs(bad)
    message = str(err.value)
    assert message.startswith("model.processor.scale_resoluton: not a setting of this checkpoint's processor")
    assert "MiniCPMV4_6ImageProcessor" in message and "'scale_resolution'" in message
    assert "'max_slice_nums'" in message and "'stack_frames'" in message  # image and video processor settings
    # Settings of the image processor, the video processor and the processor itself pass.
    check_processor_kwargs(ModelConfig(path=str(minicpmv_processor_dir),
                                       processor={"scale_resolution": 224, "max_num_frames": 8, "slice_mode": True}))


def test_processor_kwargs_checked_in_the_legacy_preprocessor_layout(tmp_path):
    """Older checkpoints keep the image processor alone in preprocessor_config.json."""
    from omni_ray.config import ModelConfig
    from omni_ray.models.processor_check import check_processor_kwargs
    from omni_ray.models.tiny import build_tiny_processor

    build_tiny_processor("llava").image_processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists() and not (tmp_path / "processor_config.json").exists()
    check_processor_kwargs(ModelConfig(path=str(tmp_path), processor={"crop_size": 32}))
    with pytest.raises(ConfigError, match=r"model.processor.crop_sise: .*CLIPImageProcessor.*'crop_size'"):
        check_processor_kwargs(ModelConfig(path=str(tmp_path), processor={"crop_sise": 32}))
