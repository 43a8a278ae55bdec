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
import posixpath
from collections import Counter

import numpy as np

from omni_ray.config import DataConfig, ModelConfig
from omni_ray.data.identity import DuplicateIds
from omni_ray.storage import StorageConfig

STAT_COLUMNS = ["row", "source", "id", "reason", "detail", "num_tokens", "num_images", "num_image_tokens", "dropped_rounds"]


def ensure_ray() -> None:
    """Use the running Ray, or the cluster at ``RAY_ADDRESS``, or start a small local one."""
    from omni_ray.ray_init import connect_or_start

    # Read tasks need a CPU beside the preprocessing actor, even on a 2-core machine.
    connect_or_start(max(os.cpu_count() or 1, 2), {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})


def check(source, data: DataConfig, model: ModelConfig, storage: StorageConfig | None, *,
          examples_per_reason: int = 3, seed: int = 0) -> dict:
    """Run the training preprocessing over ``source`` (any data form, or a mixture's entries) and
    return the report (see module docstring). A mixture is checked whole: every row of every
    source once, reported per source too. Resolving and counting run on this process first, so
    an unusable source is one error line before Ray starts any task."""
    from omni_ray.data.pipeline import as_plan, build_dataset

    plan = as_plan(source, data, storage, seed).census()
    ensure_ray()
    manifests = [_manifest(s, storage) for s in plan.sources]  # prepared sources: counted at prepare time
    rows = build_dataset(plan, data, model, storage).select_columns(STAT_COLUMNS).to_pandas()
    if len(manifests) == 1 and manifests[0] is not None:
        duplicates = manifests[0].get("duplicate_ids", {"count": 0, "examples": []})
    else:
        counter = DuplicateIds()
        for row, sample_id in zip(rows["row"], rows["id"]):
            counter.add(str(sample_id), int(row))
        duplicates = counter.report()
    prepared = [m["counts"] if m is not None else {} for m in manifests]
    per_source = []
    for i, src in enumerate(plan.sources):
        counts = _counts(rows[rows["source"] == i], prepared[i], examples_per_reason)
        per_source.append({"name": src.name, "units": len(src.units),
                           **{k: counts[k] for k in ("total", "ok", "rejected", "by_reason")}})
    everything = {"rejected": sum(int(p.get("rejected", 0)) for p in prepared),
                  "by_reason": sum((Counter(p.get("by_reason", {})) for p in prepared), Counter())}
    report = _counts(rows, everything, examples_per_reason)
    name = plan.sources[0].name if len(plan.sources) == 1 else " + ".join(plan.names)
    report.update(source=name, duplicate_ids=duplicates, sources=per_source)
    report.update(_token_stats(rows[rows["reason"] == ""], data.model_max_length))
    return report


def _manifest(source, storage) -> dict | None:
    """A prepared source's manifest (counts and repeated ids of ``data prepare``), else None."""
    if not source.units or source.units[0].form != "prepared":
        return None
    from omni_ray.data.shards import read_manifest, verify_shard_checksums

    prefix = posixpath.dirname(source.units[0].uri)
    manifest = read_manifest(prefix, storage)  # every shard there at its size
    verify_shard_checksums(prefix, manifest, storage)  # and holding what prepare wrote
    return manifest


def _counts(rows, prepared: dict, examples_per_reason: int) -> dict:
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
    return {"total": total, "ok": int(len(ok)), "rejected": rejected, "by_reason": dict(sorted(by_reason.items())),
            "examples": examples, "bad_fraction": rejected / max(total, 1),
            "images_per_sample": {int(k): int(v) for k, v in sorted(Counter(ok["num_images"]).items())}}


def _token_stats(ok, limit: int) -> dict:
    edges = sorted({0, *[int(limit * f) for f in (0.125, 0.25, 0.5, 0.75)], limit})
    hist, _ = np.histogram(ok["num_tokens"], bins=edges + [limit + 1]) if len(ok) else ([0] * len(edges), None)
    return {
        "tokens": {
            "max_length": limit,
            "histogram": [{"from": int(a), "to": int(b), "samples": int(n)}
                          for a, b, n in zip(edges, edges[1:] + [limit + 1], hist)],
            "mean": float(ok["num_tokens"].mean()) if len(ok) else 0.0,
            "max": int(ok["num_tokens"].max()) if len(ok) else 0,
            "image_token_share": float(ok["num_image_tokens"].sum() / max(ok["num_tokens"].sum(), 1)),
        },
        "truncated": int((ok["dropped_rounds"] > 0).sum()),
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
    for src in report.get("sources", []):
        reasons = ", ".join(f"{k} {v}" for k, v in src["by_reason"].items())
        lines.append(f"  source {src['name']} ({src['units']} unit(s)): {src['total']} samples, ok {src['ok']}, "
                     f"rejected {src['rejected']}" + (f" ({reasons})" if reasons else ""))
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
