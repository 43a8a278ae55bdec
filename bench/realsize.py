"""MiniCPM-V 4.6 at its real size (1.30B) through the whole pipeline, `omni-ray train` itself.

Model: the published config (``omni_ray/models/reference/MiniCPM-V-4_6``), random weights in
bf16, the stock image processor at its defaults (448-px slices, up to 9 plus the overview) around
the tiny tokenizer with the published chat template. Data: ~1 MP photos (scikit-image's, no
download). Job: ``jobs/minicpmv46_lora.yaml``'s freeze map (vision frozen, projector full, LoRA
r=64 on the LLM), bf16, 2 CPU workers on gloo, checkpoints to a ``moto_server`` S3 endpoint this
script starts. For each engine (FSDP2, ZeRO-3):

1. ``omni-ray train`` in a child process; a worker is SIGKILLed once the first checkpoint is in
   S3, and the run resumes from it by itself;
2. at the last step, evaluation: the eval loss and a generated answer per eval prompt;
3. ``omni-ray export`` of the last checkpoint (LoRA merged), reloaded with plain transformers
   (``AutoModelForImageTextToText``, ``AutoProcessor``) and asked one question with ``generate``.

Prints, per engine: s/step (steps after the resume), peak RSS per worker against the memory
estimate, checkpoint bytes against the ideal (trained parameters x 12 bytes: fp32 weight + AdamW
moments), eval seconds per sample; then ``real-size pipeline: ok`` last (or what failed).

    python bench/realsize.py [--engines fsdp,deepspeed] [--steps 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "omni_ray/models/reference/MiniCPM-V-4_6/config.json"
BUCKET = "realsize"


def build_model(out: Path) -> Path:
    """The published MiniCPM-V 4.6 config, random bf16 weights, the stock image processor."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    from omni_ray.models.tiny import tiny_minicpmv_processor

    if (out / "config.json").exists():
        return out
    processor = tiny_minicpmv_processor("4_6")
    processor.image_processor = MiniCPMV4_6ImageProcessorPil()  # the defaults: 448-px slices, up to 9 + overview
    tokenizer = processor.tokenizer
    config = json.loads(REFERENCE.read_text())
    config.update(image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.video_token_id)
    hf = AutoConfig.for_model(config.pop("model_type"), **{k: v for k, v in config.items()
                                                            if k not in ("architectures", "transformers_version")})
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(hf, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, saved to {out}", flush=True)
    return out


def write_data(root: Path, n_train: int, n_eval: int) -> tuple[Path, Path, float]:
    sys.path.insert(0, str(ROOT / "bench"))
    from data_pipeline import ANSWER, photos

    (root / "img").mkdir(parents=True, exist_ok=True)
    images = photos()
    for i, image in enumerate(images):
        image.save(root / "img" / f"{i}.jpg", "JPEG", quality=90)

    def rows(n: int, offset: int) -> str:
        return "".join(json.dumps({"id": f"{offset + i}", "image": f"img/{(offset + i) % len(images)}.jpg",
                                   "conversations": [{"role": "user", "content": "<image>\nDescribe this photo."},
                                                     {"role": "assistant", "content": ANSWER}]}) + "\n"
                       for i in range(n))

    (root / "train.jsonl").write_text(rows(n_train, 0))
    (root / "eval.jsonl").write_text(rows(n_eval, n_train))
    megapixels = sum(im.size[0] * im.size[1] for im in images) / len(images) / 1e6
    return root / "train.jsonl", root / "eval.jsonl", megapixels


class Moto:
    """A moto_server process with one bucket (as the tests' ``s3`` fixture)."""

    def __init__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")
        moto = Path(sys.executable).with_name("moto_server")
        self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)

    def stop(self):
        self.proc.terminate()


def job(workdir: Path, model_dir: Path, train: Path, eval_file: Path, engine: str, steps: int, moto: Moto) -> Path:
    raw = yaml.safe_load((ROOT / "jobs/minicpmv46_lora.yaml").read_text())
    config = {
        "model": {"path": str(model_dir), "dtype": "bfloat16"},
        "data": {"train": str(train), "eval": str(eval_file), "model_max_length": 2048, "shuffle": False},
        "freeze": raw["freeze"], "lora": {**raw["lora"], "dropout": 0.0},
        "train": {"max_steps": steps, "micro_batch_size": 1, "grad_accum": 1, "lr": 1e-5, "precision": "bf16",
                  "frozen_dtype": "auto", "gradient_checkpointing": True, "log_every": 1, "eval_every": steps},
        "eval": {"num_samples": 1, "max_new_tokens": 8},
        "strategy": {"name": "fsdp"} if engine == "fsdp" else {"name": "deepspeed", "zero_stage": 3},
        "checkpoint": {"every_n_steps": 1, "keep": 2, "async_upload": False},  # moto holds objects in RAM
        "scaling": {"num_workers": 2, "use_gpu": False, "max_failures": 2},
        "run": {"name": f"realsize-{engine}", "storage_path": f"s3://{BUCKET}/runs"},
        "storage": {"endpoint_url": moto.endpoint, "region": "us-east-1"},
    }
    path = workdir / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kill_after_first_checkpoint(run_uri: str, storage, proc: subprocess.Popen, box: dict) -> None:
    """SIGKILL one Ray Train worker (a child of the driver) once a whole checkpoint is in S3 (as the
    resume judges it: Ray Train uploads the files in no fixed order, the manifest may come first)."""
    import logging

    import psutil

    from omni_ray.train.checkpoint import find_latest

    logging.getLogger("omni_ray.train.checkpoint").setLevel(logging.ERROR)  # "skipping unfinished" while it uploads
    while proc.poll() is None:
        try:
            done = find_latest(run_uri, storage) is not None
        except (FileNotFoundError, OSError):
            done = False
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())] if done else []
        if workers:
            workers[-1].send_signal(signal.SIGKILL)
            box["killed_at"] = time.time()
            return
        time.sleep(0.5)


def run_engine(engine: str, workdir: Path, model_dir: Path, data: tuple[Path, Path], steps: int, moto: Moto) -> dict:
    from omni_ray import storage as st
    from omni_ray.config import load_config
    from omni_ray.launch.driver import memory_estimate, validate
    from omni_ray.train.checkpoint import find_latest

    config = job(workdir, model_dir, *data, engine, steps, moto)
    cfg = load_config(str(config))
    checked = validate(cfg)
    estimate_text, _ = memory_estimate(cfg, checked)
    estimate_gib = float(re.search(r"memory per worker \(estimate\): ([\d.]+) GiB", estimate_text).group(1))
    trained = checked.plan.trainable_numel()
    run_uri = st.join(cfg.run.storage_path, cfg.run.name)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "omni_ray.launch.cli", "train", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    box: dict = {}
    killer = threading.Thread(target=kill_after_first_checkpoint, args=(run_uri, cfg.storage, proc, box), daemon=True)
    killer.start()
    log = (workdir / f"{engine}.log").open("w")
    for line in proc.stdout:
        log.write(line)
        if line.startswith("[omni-ray]") or "Error" in line:
            print(f"  [{engine} {time.time() - start:6.0f}s] {line.rstrip()[:200]}", flush=True)
    proc.wait()
    log.close()
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{engine}: omni-ray train exited {proc.returncode}; log: {workdir / f'{engine}.log'}")

    history = [json.loads(line) for line in st.read_bytes(st.join(run_uri, "metrics.jsonl"), cfg.storage)
               .decode().splitlines() if line.strip()]
    resumed = next((r["resumed_from_step"] for r in reversed(history) if r.get("resumed_from_step")), None)
    # Steps trained after the resume, by their report times (each includes its checkpoint save; the
    # last one's evaluation is taken out).
    fresh = [r for r in history if "time" in r and r["time"] > box.get("killed_at", float("inf"))]
    last = history[-1]
    s_per_step = float("nan")
    if len(fresh) >= 2:
        span = fresh[-1]["time"] - fresh[0]["time"] - sum(r.get("eval_seconds") or 0 for r in fresh[1:])
        s_per_step = span / (fresh[-1]["step"] - fresh[0]["step"])
    step, checkpoint = find_latest(run_uri, cfg.storage)
    files = st.list_file_infos(checkpoint, cfg.storage)
    ckpt_bytes = sum(info.size for _, info in files)
    out = {"engine": engine, "wall_s": wall, "killed": "killed_at" in box, "resumed_from_step": resumed,
           "final_step": last["step"], "s_per_step": s_per_step, "peak_rss_gb": max(r.get("memory_gb", 0) for r in history),
           "estimate_gib": estimate_gib, "checkpoint_bytes": ckpt_bytes, "ideal_bytes": trained * 12,
           "eval_loss": last.get("eval_loss"), "eval_s_per_sample": None, "checkpoint": checkpoint}
    if last.get("eval_seconds"):
        out["eval_s_per_sample"] = last["eval_seconds"] / max(last.get("eval_samples", 0) + last.get("eval_answers", 0), 1)
    page = st.read_bytes(st.join(run_uri, last["eval_page"]), cfg.storage).decode() if last.get("eval_page") else ""
    out["eval_page_answers"] = page.count("class='answer'")
    out.update(export_and_generate(checkpoint, workdir / f"export-{engine}", data[1], moto))
    return out


def export_and_generate(checkpoint: str, out_dir: Path, eval_file: Path, moto: Moto) -> dict:
    """``omni-ray export`` (LoRA merged), then plain transformers: load, process one photo, generate."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    start = time.time()
    subprocess.run([sys.executable, "-m", "omni_ray.launch.cli", "export", checkpoint, "--out", str(out_dir),
                    "--endpoint-url", moto.endpoint], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL)
    export_s = time.time() - start
    processor = AutoProcessor.from_pretrained(out_dir)
    model = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.bfloat16).eval()
    row = json.loads(eval_file.read_text().splitlines()[0])
    image = Image.open(eval_file.parent / row["image"]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this photo."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1]:]
    return {"export_s": export_s, "export_params": sum(p.numel() for p in model.parameters()),
            "reloaded_new_tokens": int(new.numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="fsdp,deepspeed")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workdir", default=None, help="kept between runs (the 1.3B model is built once)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="realsize-"))
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.time()
    model_dir = build_model(workdir / "model")
    train, eval_file, megapixels = write_data(workdir / "data", n_train=2 * (args.steps + 1), n_eval=2)
    print(f"data: photos of {megapixels:.2f} MP on average; workdir {workdir}", flush=True)
    moto = Moto()
    results, failures = [], []
    try:
        for engine in args.engines.split(","):
            result = run_engine(engine, workdir, model_dir, (train, eval_file), args.steps, moto)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "checkpoint"}), flush=True)
            if not (result["killed"] and result["resumed_from_step"] and result["final_step"] == args.steps
                    and result["eval_loss"] is not None and result["eval_page_answers"] >= 1
                    and result["reloaded_new_tokens"] >= 1):
                failures.append(engine)
    finally:
        moto.stop()
    for r in results:
        print(f"{r['engine']:<9} s/step {r['s_per_step']:7.1f}   peak RSS per worker {r['peak_rss_gb']:5.1f} GB / "
              f"estimate {r['estimate_gib']:5.1f} GiB   checkpoint {r['checkpoint_bytes'] / 2**20:7.1f} MiB / ideal "
              f"{r['ideal_bytes'] / 2**20:7.1f} MiB = {r['checkpoint_bytes'] / r['ideal_bytes']:.2f}   eval "
              f"{r['eval_s_per_sample'] or float('nan'):6.1f} s/sample   resumed from step {r['resumed_from_step']}")
    print(f"whole run {(time.time() - began) / 60:.1f} min")
    print("real-size pipeline: ok" if not failures else f"real-size pipeline: FAILED for {', '.join(failures)}")


if __name__ == "__main__":
    main()
