"""``omni-ray data check``: the real preprocessing over a dataset, reported before any GPU runs.

It runs the same Ray Data pipeline training uses (the model's processor with image slicing,
the chat template, tokenization, image-safe truncation) on CPU workers, and reports samples ok
and rejected by reason, images per sample, a token-length histogram that counts image tokens,
and how many samples would lose trailing rounds to ``model_max_length``. Samples rejected when
the shards were prepared (``rejects.jsonl``) are counted too, so the bad fraction is over
everything the user gave. Repeated sample ids are counted and named (they are reported,
never skipped: training identifies rows by position).

``check`` takes config sections and uses the Ray it finds running, or starts a local one
(:func:`ensure_ray`); it never imports the launcher.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from omni_ray.config import DataConfig, ModelConfig
from omni_ray.data.identity import DuplicateIds
from omni_ray.storage import StorageConfig

STAT_COLUMNS = ["row", "id", "reason", "detail", "num_tokens", "num_images", "num_image_tokens", "dropped_rounds"]


def ensure_ray() -> None:
    """Use the running Ray, or the cluster at ``RAY_ADDRESS``, or start a small local one."""
    from omni_ray.ray_init import connect_or_start

    # Read tasks need a CPU beside the preprocessing actor, even on a 2-core machine.
    connect_or_start(max(os.cpu_count() or 1, 2), {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})


def check(source: str | list[str], data: DataConfig, model: ModelConfig, storage: StorageConfig | None, *,
          examples_per_reason: int = 3) -> dict:
    """Run the training preprocessing over ``source`` and return the report (see module docstring)."""
    from omni_ray.data.pipeline import build_dataset
    from omni_ray.data.reader import resolve_sources

    ensure_ray()
    kind, uris = resolve_sources(source, storage)
    prepared: dict = {}
    if kind == "prepared":
        from omni_ray.data.prepare import read_manifest, verify_shard_checksums

        manifest = read_manifest(uris[0], storage)  # every shard there at its size
        verify_shard_checksums(uris[0], manifest, storage)  # and holding what prepare wrote
        prepared = manifest["counts"]
        duplicates = manifest.get("duplicate_ids", {"count": 0, "examples": []})
    rows = build_dataset(source, data, model, storage).select_columns(STAT_COLUMNS).to_pandas()
    if kind == "json":
        counter = DuplicateIds()
        for row, sample_id in zip(rows["row"], rows["id"]):
            counter.add(str(sample_id), int(row))
        duplicates = counter.report()
    ok = rows[rows["reason"] == ""]
    bad = rows[rows["reason"] != ""]
    by_reason = Counter(bad["reason"])
    by_reason.update(prepared.get("by_reason", {}))
    examples: dict[str, list] = {}
    for _, r in bad.iterrows():
        if len(examples.setdefault(r["reason"], [])) < examples_per_reason:
            examples[r["reason"]].append({"id": r["id"], "detail": r["detail"]})
    total = len(rows) + int(prepared.get("rejected", 0))
    rejected = sum(by_reason.values())
    limit = data.model_max_length
    edges = sorted({0, *[int(limit * f) for f in (0.125, 0.25, 0.5, 0.75)], limit})
    hist, _ = np.histogram(ok["num_tokens"], bins=edges + [limit + 1]) if len(ok) else ([0] * len(edges), None)
    return {
        "source": source,
        "total": total,
        "ok": int(len(ok)),
        "rejected": rejected,
        "by_reason": dict(sorted(by_reason.items())),
        "examples": examples,
        "bad_fraction": rejected / max(total, 1),
        "images_per_sample": {int(k): int(v) for k, v in sorted(Counter(ok["num_images"]).items())},
        "tokens": {
            "max_length": limit,
            "histogram": [{"from": int(a), "to": int(b), "samples": int(n)}
                          for a, b, n in zip(edges, edges[1:] + [limit + 1], hist)],
            "mean": float(ok["num_tokens"].mean()) if len(ok) else 0.0,
            "max": int(ok["num_tokens"].max()) if len(ok) else 0,
            "image_token_share": float(ok["num_image_tokens"].sum() / max(ok["num_tokens"].sum(), 1)),
        },
        "truncated": int((ok["dropped_rounds"] > 0).sum()),
        "duplicate_ids": duplicates,
    }


def format_report(report: dict) -> str:
    lines = [
        f"data check: {report['source']}",
        f"  samples {report['total']}: ok {report['ok']}, rejected {report['rejected']} "
        f"({report['bad_fraction']:.2%})",
    ]
    for reason, n in report["by_reason"].items():
        ex = ", ".join(f"{e['id']}" for e in report["examples"].get(reason, []))
        lines.append(f"    {reason:<24} {n:>6}" + (f"   e.g. {ex}" if ex else ""))
    lines.append("  images per sample: " + ", ".join(f"{k}: {v}" for k, v in report["images_per_sample"].items()))
    t = report["tokens"]
    lines.append(f"  tokens (image tokens included; limit {t['max_length']}): mean {t['mean']:.1f}, max {t['max']}, "
                 f"image tokens {t['image_token_share']:.1%}")
    for b in t["histogram"]:
        lines.append(f"    [{b['from']:>6}, {b['to']:>6})  {b['samples']}")
    lines.append(f"  truncated (trailing rounds dropped to fit): {report['truncated']}")
    dup = report["duplicate_ids"]
    examples = ", ".join(f"{e['id']!r} (rows {e['rows'][0]} and {e['rows'][1]})" for e in dup["examples"])
    lines.append(f"  repeated ids (all rows still train): {dup['count']}" + (f"   e.g. {examples}" if examples else ""))
    return "\n".join(lines)
