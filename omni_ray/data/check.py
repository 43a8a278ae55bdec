"""``omni-ray data check``: the real preprocessing over a dataset, reported before any GPU runs.

It runs the same Ray Data pipeline training uses (the model's processor with image slicing,
the chat template, tokenization, image-safe truncation) on CPU workers, and reports samples ok
and rejected by reason, images per sample, a token-length histogram that counts image tokens,
and how many samples would lose trailing rounds to ``model_max_length``. Samples rejected when
the shards were prepared (``rejects.jsonl``) are counted too, so the bad fraction is over
everything the user gave.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from omni_ray.config import Config

STAT_COLUMNS = ["id", "reason", "detail", "num_tokens", "num_images", "num_image_tokens", "dropped_rounds"]


def check(source: str, cfg: Config, *, examples_per_reason: int = 3) -> dict:
    from omni_ray.data.pipeline import build_dataset
    from omni_ray.launch.driver import ensure_ray

    ensure_ray(cfg.scaling, cfg.data, cfg.storage)
    prepared: dict = {}
    if not source.endswith((".json", ".jsonl")):
        from omni_ray.data.prepare import read_manifest

        prepared = read_manifest(source, cfg.storage)["counts"]
    ds = build_dataset(source, cfg.data, cfg.model, cfg.storage).select_columns(STAT_COLUMNS)
    rows = ds.to_pandas()
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
    limit = cfg.data.model_max_length
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
    return "\n".join(lines)
