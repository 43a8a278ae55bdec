"""Train in this process through the real loop (``LocalSession`` + ``loop.run``), on a small mixed dataset.

Shared by the tests that train every model family and every ``jobs/*.yaml`` on tiny models.
"""

from __future__ import annotations

import json

from PIL import Image

ANSWERS = ["a cat", "an astronaut and a rocket", "coffee", "yes, it is red", "hello there"]


def train_locally(cfg, rows: list[dict]):
    """``trainkit.local_run``, also returning the trained model as the engine holds it after ``run``.

    The one place these tests touch the loop's internals: they record the engine the loop
    builds (``loop.build_strategy``), to read the trained parameters back.
    """
    from trainkit import local_run

    from omni_ray.train import loop

    built = []
    real_build = loop.build_strategy

    def recording_build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    loop.build_strategy = recording_build
    try:
        session = local_run(cfg, rows)
    finally:
        loop.build_strategy = real_build
    return session, built[-1].unwrapped()


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size)


def write_dataset(folder) -> str:
    """Five records in three peer formats: single, numbered multi, zero images; system; multi-turn."""
    for name, size in (("chelsea", (48, 40)), ("astronaut", (40, 40)), ("rocket", (32, 48)), ("coffee", (44, 36))):
        _photo(name, size).save(folder / f"{name}.png")
    records = [
        {"id": "cat", "image": "chelsea.png",
         "conversations": [{"role": "user", "content": "<image>\nwhat is in the picture?"},
                           {"role": "assistant", "content": ANSWERS[0]}]},
        {"id": "two", "image": {"<image_00>": "astronaut.png", "<image_01>": "rocket.png"},
         "conversations": [{"role": "user", "content": "<image_00>\n<image_01>\ndescribe the image."},
                           {"role": "assistant", "content": ANSWERS[1]}]},
        {"id": "chat", "images": ["coffee.png"],
         "messages": [{"role": "system", "content": "the answer is one word."},
                      {"role": "user", "content": "<image>what is it?"},
                      {"role": "assistant", "content": ANSWERS[2]},
                      {"role": "user", "content": "is the color red?"},
                      {"role": "assistant", "content": ANSWERS[3]}]},
        {"id": "text", "conversations": [{"role": "user", "content": "hello"},
                                         {"role": "assistant", "content": ANSWERS[4]}]},
    ]
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def processed_rows(cfg) -> tuple[list[dict], object]:
    """The dataset's rows as the Ray Data preprocessing step makes them (``trainkit``), and the tokenizer."""
    from trainkit import processed_rows as rows_of

    from omni_ray.data.pipeline import Preprocess

    tokenizer = Preprocess(cfg.model, None, cfg.data.model_max_length).sample_processor.tokenizer
    return rows_of(cfg, cfg.data.train), tokenizer
