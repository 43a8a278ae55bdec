"""``model.processor`` checked against the processor classes the checkpoint names, before a run starts.

``AutoProcessor.from_pretrained`` drops keyword arguments no component knows without a word: a
misspelt ``scale_resoluton: 448`` trains at the checkpoint's default size and nothing says so.
The accepted names come from the classes themselves, read from the checkpoint's processor config
(the processor's ``__init__`` and each image/video processor's typed ``valid_kwargs``), plus every
setting the saved config holds; nothing is instantiated and no checkpoint code runs.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

from omni_ray.config import ConfigError, ModelConfig
from omni_ray.storage import StorageConfig, is_remote, read_bytes

logger = logging.getLogger(__name__)

# The processor's own __init__ takes its components too; those are objects, never YAML settings.
_COMPONENT_SUFFIXES = ("processor", "tokenizer", "extractor", "chat_template")


def _read_json(model: ModelConfig, name: str, storage: StorageConfig | None) -> dict | None:
    path = model.path.rstrip("/") + "/" + name
    try:
        raw = read_bytes(path, storage) if is_remote(path) else Path(path).expanduser().read_bytes()
        return json.loads(raw)
    except (OSError, ValueError):  # absent or unreadable: loading reports it with its own error
        return None


def saved_processor_config(model: ModelConfig, storage: StorageConfig | None = None) -> dict | None:
    """The checkpoint's processor config in the current layout (components nested), or None.

    transformers 5.x writes ``processor_config.json`` with the image and video processor inside;
    older checkpoints have the image processor alone in ``preprocessor_config.json``.
    """
    saved = _read_json(model, "processor_config.json", storage)
    if saved is not None:
        return saved
    legacy = _read_json(model, "preprocessor_config.json", storage)
    if legacy is None:
        return None
    return {"processor_class": legacy.get("processor_class"), "image_processor": legacy}


def _class_names(cls) -> set[str]:
    """Keyword arguments a processor class accepts: its typed kwargs and its __init__'s named ones."""
    names: set[str] = set()
    typed = getattr(cls, "valid_kwargs", None)
    if typed is not None:
        names |= set(getattr(typed, "__required_keys__", ())) | set(getattr(typed, "__optional_keys__", ()))
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name != "self" and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            names.add(param.name)
    return {n for n in names if not n.endswith(_COMPONENT_SUFFIXES)}


def accepted_processor_kwargs(saved: dict) -> tuple[list[str], set[str]] | None:
    """(class names, accepted keyword names) for a saved processor config; None when a class is not
    one of transformers' own (the checkpoint's code would have to run to know its arguments)."""
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name
    from transformers.models.auto.processing_auto import processor_class_from_name
    from transformers.models.auto.video_processing_auto import video_processor_class_from_name

    lookups = [("processor_class", saved, processor_class_from_name)]
    for key, resolve in (("image_processor", get_image_processor_class_from_name),
                         ("video_processor", video_processor_class_from_name)):
        if isinstance(saved.get(key), dict):
            lookups.append((f"{key}_type", saved[key], resolve))
    classes, names = [], set()
    for type_key, section, resolve in lookups:
        name = section.get(type_key)
        if name is None:  # e.g. an image processor saved alone: no processor class recorded
            continue
        cls = resolve(name) if isinstance(name, str) else None
        if cls is None:
            logger.debug("model.processor: %s %r is not a transformers class; not checked", type_key, name)
            return None
        classes.append(cls.__name__)
        names |= _class_names(cls)
        names |= {k for k in section if not k.endswith(("_type", "_class", "auto_map", *_COMPONENT_SUFFIXES))}
    return (classes, names) if classes else None


def check_processor_kwargs(model: ModelConfig, storage: StorageConfig | None = None) -> None:
    """Every ``model.processor`` key must be a setting of the checkpoint's processor classes."""
    if not model.processor:
        return
    saved = saved_processor_config(model, storage)
    accepted = accepted_processor_kwargs(saved) if saved else None
    if accepted is None:
        return
    classes, names = accepted
    for key in model.processor:
        if key not in names:
            raise ConfigError(
                f"model.processor.{key}: not a setting of this checkpoint's processor ({', '.join(classes)}); "
                f"valid names: {sorted(names)}; fix the spelling or remove it")
