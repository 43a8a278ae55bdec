"""Every config under jobs/ passes `omni-ray validate`, run through the real CLI entry point.

The configs name checkpoints in ``s3://omni-ray-models/...``. Before validating, this module
puts into that bucket, on the session's real ``moto_server`` (the ``s3`` fixture), what
``validate`` reads of each checkpoint, and no weights:

* MiniCPM-V 4.6: the published ``config.json`` (the repository's copy in
  ``omni_ray/models/reference/MiniCPM-V-4_6``): 1,300,428,016 parameters, 27 vision and 24 text
  layers, tied embeddings. transformers' default ``MiniCPMV4_6Config`` is NOT this model (9.1B).
* Qwen2.5-VL-7B-Instruct: transformers' default ``Qwen2_5_VLConfig`` is NOT the 7B: its text
  config is the 72B's (hidden 8192, 80 layers; ~75.8B parameters with the vision tower) and its
  vision ``hidden_size`` is 3584 instead of 1280. The 7B checkpoint's values are set here
  (text: hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, vocab 152064;
  vision: hidden 1280, out_hidden_size 3584), which gives the 7B's 8.29B parameters.
* MiniCPM-V 2.6 (remote code, ``model_type: minicpmv``): a ``config.json`` whose ``auto_map``
  points at Python files that do not exist, ``model.safetensors.index.json`` and four shards
  holding only safetensors *headers* with the real 2.6 names and shapes. No job uses it any
  more: validate refuses it by name (its code targets transformers 4.4x) before reading more.

Run: python -m pytest -q tests/dist/test_jobs_configs.py
"""

from __future__ import annotations

import json
import re
import struct
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

REPO_ROOT = Path(__file__).resolve().parents[2]
MINICPMV46_CONFIG = REPO_ROOT / "omni_ray/models/reference/MiniCPM-V-4_6/config.json"
MINICPMV46_PARAMS = 1_300_428_016
JOB_CONFIGS = sorted((REPO_ROOT / "jobs").glob("*.yaml"))
MODELS_BUCKET = "omni-ray-models"

QWEN25_VL_7B = {
    "text_config": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, max_window_layers=28, tie_word_embeddings=False),
    "vision_config": dict(hidden_size=1280, out_hidden_size=3584, depth=32, intermediate_size=3420, num_heads=16),
}


# --- what each checkpoint looks like in the bucket ---------------------------------------------------


def hf_config(model_type: str, **overrides) -> dict:
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type](**overrides).to_dict()
    config["model_type"] = model_type
    return config


def minicpmv26_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """MiniCPM-V 2.6's stored tensors (names and shapes as in openbmb/MiniCPM-V-2_6)."""
    v, v_mlp, v_layers = 1152, 4304, 27                      # SigLIP-400M
    h, mlp, layers, kv, vocab = 3584, 18944, 28, 512, 151666  # Qwen2-7B (4 KV heads x 128)
    out: list[tuple[str, tuple[int, ...]]] = [
        ("vpm.embeddings.patch_embedding.weight", (v, 3, 14, 14)),
        ("vpm.embeddings.patch_embedding.bias", (v,)),
        ("vpm.embeddings.position_embedding.weight", (4900, v)),
    ]
    for i in range(v_layers):
        p = f"vpm.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [(f"{p}.self_attn.{proj}.weight", (v, v)), (f"{p}.self_attn.{proj}.bias", (v,))]
        out += [(f"{p}.layer_norm1.weight", (v,)), (f"{p}.layer_norm1.bias", (v,)),
                (f"{p}.mlp.fc1.weight", (v_mlp, v)), (f"{p}.mlp.fc1.bias", (v_mlp,)),
                (f"{p}.mlp.fc2.weight", (v, v_mlp)), (f"{p}.mlp.fc2.bias", (v,)),
                (f"{p}.layer_norm2.weight", (v,)), (f"{p}.layer_norm2.bias", (v,))]
    out += [("vpm.post_layernorm.weight", (v,)), ("vpm.post_layernorm.bias", (v,))]
    out += [("resampler.query", (64, h)), ("resampler.kv_proj.weight", (h, v)),
            ("resampler.attn.in_proj_weight", (3 * h, h)), ("resampler.attn.in_proj_bias", (3 * h,)),
            ("resampler.attn.out_proj.weight", (h, h)), ("resampler.attn.out_proj.bias", (h,))]
    for ln in ("ln_q", "ln_kv", "ln_post"):
        out += [(f"resampler.{ln}.weight", (h,)), (f"resampler.{ln}.bias", (h,))]
    out += [("resampler.proj", (h, h)), ("llm.model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"llm.model.layers.{i}"
        out += [(f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.q_proj.bias", (h,)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.k_proj.bias", (kv,)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.bias", (kv,)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.mlp.gate_proj.weight", (mlp, h)), (f"{p}.mlp.up_proj.weight", (mlp, h)),
                (f"{p}.mlp.down_proj.weight", (h, mlp)),
                (f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    out += [("llm.model.norm.weight", (h,)), ("llm.lm_head.weight", (vocab, h))]
    return out


def safetensors_header_only(tensors: list[tuple[str, tuple[int, ...]]], dtype: str = "BF16") -> bytes:
    """A safetensors header for ``tensors`` with no tensor data after it."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def minicpmv26_files() -> dict[str, bytes]:
    tensors = minicpmv26_tensors()
    shards = [tensors[i::4] for i in range(4)]  # interleaved, so every shard holds every group
    names = [f"model-{i + 1:05d}-of-00004.safetensors" for i in range(4)]
    index = {"metadata": {"total_size": 2 * sum(_numel(s) for _, s in tensors)},
             "weight_map": {n: names[i % 4] for i, (n, _) in enumerate(tensors)}}
    config = {
        "model_type": "minicpmv", "architectures": ["MiniCPMV"], "version": 2.6,
        # Loading this would import configuration_minicpm.py / modeling_minicpmv.py, which are not
        # in the bucket: validate must never try.
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                     "AutoModel": "modeling_minicpmv.MiniCPMV"},
        "hidden_size": 3584, "num_hidden_layers": 28, "vocab_size": 151666, "query_num": 64,
        "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27, "patch_size": 14},
    }
    files = {"config.json": json.dumps(config).encode(), "model.safetensors.index.json": json.dumps(index).encode()}
    files.update({name: safetensors_header_only(shard) for name, shard in zip(names, shards)})
    return files


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


CHECKPOINTS = {
    f"s3://{MODELS_BUCKET}/MiniCPM-V-4_6": lambda: {"config.json": MINICPMV46_CONFIG.read_bytes()},
    f"s3://{MODELS_BUCKET}/Qwen2.5-VL-7B-Instruct":
        lambda: {"config.json": json.dumps(hf_config("qwen2_5_vl", **QWEN25_VL_7B)).encode()},
    f"s3://{MODELS_BUCKET}/MiniCPM-V-2_6": minicpmv26_files,
}


@pytest.fixture(scope="module")
def models(s3):
    from botocore.exceptions import ClientError

    client = s3.client()
    try:
        client.create_bucket(Bucket=MODELS_BUCKET)
    except ClientError as err:  # another module of the session made it already
        if err.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    for prefix, files in CHECKPOINTS.items():
        key_prefix = prefix.removeprefix(f"s3://{MODELS_BUCKET}/")
        for name, body in files().items():
            client.put_object(Bucket=MODELS_BUCKET, Key=f"{key_prefix}/{name}", Body=body)
    return s3


def _endpoint(s3, pairs: bool = False) -> list[str]:
    # validate also resolves data.train (it must exist): the job files' data bucket is not in
    # the test's S3, so a one-record local file stands in for it (a preference pair for DPO jobs).
    data = Path(tempfile.mkdtemp()) / "d.jsonl"
    data.write_text('{"question": "q", "chosen": "a", "rejected": "b"}\n' if pairs else
                    '{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    return ["--set", f"storage.endpoint_url={s3.endpoint_url}", "--set", f"data.train={data}"]


def _printed_total(out: str) -> tuple[int, int]:
    match = re.search(r"^total\s+([\d,]+)\s+([\d,]+)", out, re.M)
    assert match, out
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


# --- per-config expectations on the plan ----------------------------------------------------------


def _by_group(plan) -> dict[str, dict[str, int]]:
    rows: dict[str, dict[str, int]] = {}
    for p in plan.params:
        row = rows.setdefault(p.group, {"total": 0, "full": 0, "lora_base": 0, "frozen": 0})
        row["total"] += p.numel
        row[{"full": "full", "lora": "lora_base"}.get(p.mode, "frozen")] += p.numel
    return rows


def check_minicpmv46_lora(result):
    rows = _by_group(result.plan)
    assert rows["vision"]["full"] == 0 and rows["projector"]["full"] == rows["projector"]["total"]
    assert result.plan.lora_numel.get("llm", 0) > 0 and set(result.plan.lora_numel) == {"llm"}


def check_minicpmv46_vision_lastn(result):
    plan = result.plan
    rows = _by_group(plan)
    assert rows["vision"]["full"] == rows["vision"]["total"] > 0
    assert rows["projector"]["full"] == rows["projector"]["total"] > 0
    assert not plan.lora_modules
    trained_layers = {int(m.group(1)) for p in plan.params if p.mode == "full"
                      for m in [re.match(r"model\.language_model\.layers\.(\d+)\.", p.name)] if m}
    assert trained_layers == set(range(16, 24))  # the last 8 of the published model's 24
    vision_layers = {int(m.group(1)) for p in plan.params
                     for m in [re.match(r"model\.vision_tower\.encoder\.layers\.(\d+)\.", p.name)] if m}
    assert vision_layers == set(range(27))  # what the header comment says the model has
    assert all(p.mode == "frozen" for p in plan.params if p.group in ("embeddings", "lm_head"))
    assert any(p.mode == "full" and p.name.startswith("model.language_model.norm.") for p in plan.params)


def check_minicpmv46_full_zero3(result):
    plan = result.plan
    assert all(p.mode == "full" for p in plan.params)
    assert plan.trainable_numel() == sum(p.numel for p in plan.params) == MINICPMV46_PARAMS
    assert any("lm_head is tied" in note for note in plan.notes)


def check_qwen25vl_lora(result):
    plan = result.plan
    rows = _by_group(plan)
    assert 8.0e9 < sum(r["total"] for r in rows.values()) < 8.6e9  # Qwen2.5-VL-7B: 8.29B
    assert rows["vision"]["full"] == 0
    assert rows["projector"]["full"] == rows["projector"]["total"] > 0  # model.visual.merger
    assert set(plan.lora_numel) == {"llm"}
    assert len(plan.lora_modules) == 28 * 7  # q k v o gate up down in 28 layers


def check_minicpmv46_flags_lora(result):
    plan = result.plan
    rows = _by_group(plan)
    assert rows["vision"]["full"] == rows["vision"]["total"] > 0  # tune_vision: "true"
    assert rows["projector"]["full"] == rows["projector"]["total"] > 0  # the merger always trains
    assert rows["embeddings"]["full"] == rows["embeddings"]["total"] > 0  # use_lora trains embed_tokens
    assert set(plan.lora_numel) == {"llm"}
    # 6 full-attention layers x q/k/v/o + 18 linear-attention layers x in_proj_qkv/out_proj.
    assert len(plan.lora_modules) == 6 * 4 + 18 * 2
    assert not [p.name for p in plan.params if p.group == "llm" and p.mode == "full"]


def check_minicpmv46_dpo(result):
    rows = _by_group(result.plan)
    assert rows["vision"]["full"] == rows["projector"]["full"] == 0  # the reference is the base: no snapshot
    assert set(result.plan.lora_numel) == {"llm"}


CHECKS = {
    "minicpmv46_dpo.yaml": check_minicpmv46_dpo,
    "minicpmv46_lora.yaml": check_minicpmv46_lora,
    "minicpmv46_vision_lastn.yaml": check_minicpmv46_vision_lastn,
    "minicpmv46_full_zero3.yaml": check_minicpmv46_full_zero3,
    "qwen25vl_lora.yaml": check_qwen25vl_lora,
    "minicpmv46_flags_lora.yaml": check_minicpmv46_flags_lora,
}


# --- tests ------------------------------------------------------------------------------------------


def test_every_job_config_has_a_checkpoint_fixture_and_a_check():
    from omni_ray.config import load_config

    assert JOB_CONFIGS, "no configs under jobs/"
    for path in JOB_CONFIGS:
        cfg = load_config(path)
        assert cfg.model.path in CHECKPOINTS, f"{path.name}: add a fixture for {cfg.model.path} to CHECKPOINTS"
        assert path.name in CHECKS, f"{path.name}: add its plan expectations to CHECKS"


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=[p.name for p in JOB_CONFIGS])
def test_job_config_passes_omni_ray_validate(path, models, capsys, monkeypatch):
    from omni_ray.config import load_config
    from omni_ray.launch import cli, driver

    cfg = load_config(path)
    text = path.read_text()
    assert text.startswith("#") and "omni-ray validate jobs/" in text and "jobs/submit.py" in text, \
        f"{path.name}: the header comment must say what the recipe is and how to run it"
    assert cfg.run.name != "omni-ray-run" and cfg.run.storage_path.startswith("s3://"), path.name
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers >= 8, path.name

    results = []
    real_validate = driver.validate

    def recording_validate(config):
        results.append(real_validate(config))
        return results[-1]

    monkeypatch.setattr(driver, "validate", recording_validate)
    assert not cfg.model.trust_remote_code, f"{path.name}: remote-code checkpoints are refused by name"
    rc = cli.main(["validate", str(path), *_endpoint(models, cfg.train.objective == "dpo")])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "config ok" in out, out + err
    total, trainable = _printed_total(out)
    assert 0 < trainable <= total
    assert total == sum(p.numel for p in results[0].plan.params)
    CHECKS[path.name](results[0])


def test_validate_full_size_minicpmv46_prints_its_real_size(models, capsys):
    """The published MiniCPM-V 4.6 (1,300,428,016 parameters) is planned on the meta device, no weights.

    validate builds the checkpoint's own config.json, not transformers' defaults (9.1B).
    """
    from omni_ray.config import load_config
    from omni_ray.launch import cli
    from omni_ray.launch.driver import validate

    path = REPO_ROOT / "jobs" / "minicpmv46_lora.yaml"
    cfg = load_config(path, [f"storage.endpoint_url={models.endpoint_url}"])
    total = sum(p.numel for p in validate(cfg).plan.params)
    assert total == MINICPMV46_PARAMS

    assert cli.main(["validate", str(path), *_endpoint(models)]) == 0
    out = capsys.readouterr().out
    assert _printed_total(out)[0] == total
    assert "1,300,428,016" in out


def test_remote_code_minicpmv2_is_refused_by_name(models, capsys, tmp_path):
    """MiniCPM-V 2.6 (remote code for transformers 4.4x) is refused at validate, with the reason and successors."""
    from omni_ray.launch import cli
    from omni_ray.models.loading import named_shapes_from_index

    prefix = f"s3://{MODELS_BUCKET}/MiniCPM-V-2_6"
    assert named_shapes_from_index(prefix, models.storage) == minicpmv26_tensors()  # headers only, no code
    config = tmp_path / "v26.yaml"
    config.write_text(f"model: {{path: '{prefix}', trust_remote_code: true}}\ndata: {{train: /d.jsonl}}\n")
    rc = cli.main(["validate", str(config), *_endpoint(models)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "MiniCPM-V 2.x" in err and "transformers 4.4x" in err and "MiniCPM-V 4.6 or 4.7" in err, err


def test_named_shapes_from_index_matches_safetensors(tmp_path):
    """Header parsing agrees with the safetensors library, for an index and for a single file."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from omni_ray.config import ConfigError
    from omni_ray.models.loading import named_shapes_from_index

    a = {"llm.model.layers.0.self_attn.q_proj.weight": np.zeros((8, 4), np.float32),
         "vpm.post_layernorm.bias": np.zeros((3,), np.float16)}
    b = {"resampler.query": np.zeros((2, 5, 7), np.float32), "llm.lm_head.weight": np.zeros((11, 4), np.float32)}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file(a, str(sharded / "model-00001-of-00002.safetensors"))
    save_file(b, str(sharded / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expected = []
    for name, shard in weight_map.items():
        with safe_open(str(sharded / shard), "np") as f:
            expected.append((name, tuple(f.get_slice(name).get_shape())))
    assert named_shapes_from_index(str(sharded)) == expected

    single = tmp_path / "single"
    single.mkdir()
    save_file(b, str(single / "model.safetensors"))
    assert sorted(named_shapes_from_index(str(single))) == sorted((k, v.shape) for k, v in b.items())

    # An index naming a tensor its shard lacks (an incomplete upload) is a config error.
    weight_map["llm.model.norm.weight"] = "model-00002-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConfigError, match="missing from their shards"):
        named_shapes_from_index(str(sharded))
    with pytest.raises(ConfigError, match="neither"):
        named_shapes_from_index(str(tmp_path))
