"""omni_ray: fine-tune vision-language models on Ray clusters with a per-module freeze map.

The stable entry points; everything else is internal and may move:

    from omni_ray import load_config, validate, train
    cfg = load_config("jobs/minicpmv46_lora.yaml", ["train.lr=2e-5"])
    print(validate(cfg).plan.rows())     # the freeze plan, no weights, no GPU
    result = train(cfg)                  # Ray Train (local Ray, or RAY_ADDRESS)
"""

from omni_ray.config import Config, ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "load_config", "validate", "train", "export", "__version__"]


def validate(cfg: Config):
    from omni_ray.launch.driver import validate as _validate

    return _validate(cfg)


def train(cfg: Config):
    from omni_ray.launch.driver import train as _train

    return _train(cfg)


def export(checkpoint: str, out: str, *, adapter: bool = False, storage=None) -> str:
    from omni_ray.export import export as _export

    return _export(checkpoint, out, adapter=adapter, storage=storage)
