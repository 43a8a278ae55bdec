"""What streaming annotation files costs against reading them whole.

Writes one MiniCPM-V-style file of N records (multi-turn text, a tools list, an image ref) as
JSONL and as a top-level JSON array, then, in the same run, measures for each:

  whole      ``json.loads`` of the whole file (what the loader did before): records/s, peak
             Python memory (tracemalloc);
  streaming  ``omni_ray.data.reader.iter_records`` (JSONL lines / ijson events, with the depth
             and size limits): records/s, peak memory while touching each record once.

and prints streaming/whole ratios. Memory is the point: the streaming peak stays at one
record while the whole-file peak grows with the file.

    python bench/reader.py [--records 100000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path


def make_records(n: int) -> list[dict]:
    return [{
        "id": str(i % 1000),  # ids repeat, as when files are concatenated
        "image": f"img/{i:07d}.jpg",
        "tools": [{"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}],
        "conversations": [
            {"role": "user", "content": f"<image>\nWhat is in picture {i}? Describe it in detail."},
            {"role": "assistant", "content": "A photograph of a street with cars, trees and people. " * 3},
            {"role": "user", "content": "And the weather?"},
            {"role": "assistant", "content": "Sunny, with a few clouds."},
        ],
    } for i in range(n)]


def measure(fn) -> tuple[float, int, int]:
    """(seconds, peak traced bytes, records); timed without tracemalloc, which slows Python down."""
    start = time.perf_counter()
    count = fn()
    seconds = time.perf_counter() - start
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()

    from omni_ray.data.reader import iter_records

    with tempfile.TemporaryDirectory() as tmp:
        records = make_records(args.records)
        jsonl, array = Path(tmp, "d.jsonl"), Path(tmp, "d.json")
        jsonl.write_text("\n".join(json.dumps(r) for r in records))
        array.write_text(json.dumps(records))
        del records
        print(f"{args.records} records: JSONL {jsonl.stat().st_size / 1e6:.1f} MB, "
              f"JSON {array.stat().st_size / 1e6:.1f} MB")
        for path in (jsonl, array):
            if path.suffix == ".jsonl":
                def whole():
                    return len([json.loads(line) for line in path.read_text().splitlines()])
            else:
                def whole():
                    return len(json.loads(path.read_text()))

            def streaming():
                return sum(1 for _ in iter_records(str(path)))

            w_s, w_peak, w_n = measure(whole)
            s_s, s_peak, s_n = measure(streaming)
            assert w_n == s_n == args.records
            print(f"{path.suffix:6} whole     {w_n / w_s:10.0f} rec/s  peak {w_peak / 1e6:8.1f} MB")
            print(f"{path.suffix:6} streaming {s_n / s_s:10.0f} rec/s  peak {s_peak / 1e6:8.1f} MB")
            print(f"{path.suffix:6} streaming/whole: speed {w_s / s_s:.2f}x, peak memory {s_peak / w_peak:.4f}x")


if __name__ == "__main__":
    main()
