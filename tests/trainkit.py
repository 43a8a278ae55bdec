"""Shared test helpers for training in one process: processed rows and a local-session run."""

from __future__ import annotations

from omni_ray.config import Config
from omni_ray.data.pipeline import Preprocess
from omni_ray.data.reader import InputPolicy, iter_rows
from omni_ray.train.loop import run
from omni_ray.train.session import ListIterator, LocalSession


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a gloo rendezvous for torch.multiprocessing tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processed_rows(cfg: Config, files) -> list[dict]:
    """The rows Ray Data would stream to a worker for one annotation file or a list of them, read in
    order as one dataset (preprocessed in this process; pairs under ``train.objective: dpo``)."""
    pairs = cfg.train.objective == "dpo"
    pre = Preprocess(cfg.model, None, cfg.data.model_max_length, pairs=pairs)
    files = [str(f) for f in files] if isinstance(files, (list, tuple)) else [str(files)]
    return [pre.process_row(r) for r in iter_rows(files, None, InputPolicy(pairs=pairs))]


def local_run(cfg: Config, rows: list[dict], checkpoint_dir: str | None = None) -> LocalSession:
    """Train ``cfg`` on ``rows`` in this process (world size 1); returns the session with its reports."""
    session = LocalSession(datasets={"train": ListIterator(rows)}, checkpoint_dir=checkpoint_dir)
    run(cfg, session, num_rows=len(rows))
    return session


def tiny_minicpmv_model(vocab: int):
    """A MiniCPM-V 4.6 module in memory (tied head, 4 Qwen3.5 layers, a 1-layer 32-wide vision tower)."""
    from transformers.models.minicpmv4_6 import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    from omni_ray.models.tiny import _text_config

    cfg = MiniCPMV4_6Config(text_config={**_text_config("qwen3_5_text", vocab, 4), "tie_word_embeddings": True},
                            tie_word_embeddings=True,
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, patch_size=14, image_size=56))
    return MiniCPMV4_6ForConditionalGeneration(cfg)
