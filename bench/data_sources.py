"""Reading the data users already have, beside omni_ray's own prepared shards.

The same samples (LLaVA-OneVision-Data's layout: one image, ``conversations`` of from/value
turns) are written in four forms, the way their users write them:

  hub Parquet   ``datasets`` (``image`` a ``datasets.Image()`` column of ``{bytes, path}``),
                ``Dataset.to_parquet`` in files of up to 10,000 rows (train-0000K-of-0000N.parquet)
  WebDataset    ``webdataset.TarWriter`` shards of 1,000 samples (KEY.jpg + KEY.json)
  JSONL         one annotation file + one image file per sample
  prepared      shards made from the JSONL by omni_ray's ``data prepare`` (``omni_ray.data.prepare``)

Each form is read in a fresh child process per (form, size) through the training path's read:
``sources.resolve_entry -> count_units -> read_unit`` over every unit (what a Ray Data read
task of ``pipeline.PlanDatasource`` runs, without Ray), then each row's images decoded as
``pipeline.Preprocess`` does (the embedded bytes, else the ref read with ``load_image``; then
``decode_image``). Measured per form:

  rows per CPU-second  the child's process CPU time (``time.process_time``: its own CPU, all its
                       threads, counting included; other load on the machine does not inflate it)
                       on real photos of ~0.4-1 MP as JPEG (scikit-image's, as bench/data_pipeline.py
                       uses, at full size and at 0.6x), best of ``--repeats`` children; and on
                       64x64 JPEGs (the 50k run: the readers' own cost, with little decoding)
  peak RSS             ``ru_maxrss`` of the child reading 2k and 50k rows of 64x64 JPEGs (small so
                       that writing and reading 50k rows in every form takes minutes); it must stay
                       flat: the ratio 50k/2k is printed per form

Printed last: ``slowest source / prepared shards = X``, rows per CPU-second on the photos of the
slowest of Parquet/WebDataset/JSONL over prepared shards' (goal: X >= 0.8).

    python bench/data_sources.py [--photo-rows 1400] [--small-rows 2000 50000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

FORMS = {"parquet": "hub Parquet", "webdataset": "WebDataset", "jsonl": "JSONL + files", "prepared": "prepared shards"}
ANSWER = ("The photograph shows the scene in fine detail, with the main subject near the centre, soft light "
          "from the left, and a darker background that fades towards the edges of the frame.")


def jpegs(small: bool) -> list[bytes]:
    """scikit-image's photographs as JPEG (q90): ~1 MP and 0.6x that (~0.37 MP), or 64 x 64 thumbnails."""
    from PIL import Image

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from data_pipeline import photos  # the same ~1 MP photos as bench/data_pipeline.py

    images = photos()
    if small:
        images = [im.resize((64, 64), Image.LANCZOS) for im in images]
    else:
        images += [im.resize((round(im.size[0] * 0.6), round(im.size[1] * 0.6)), Image.LANCZOS) for im in images]
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def conversation(i: int) -> list[dict]:
    return [{"from": "human", "value": f"<image>\nDescribe photo {i} in detail."}, {"from": "gpt", "value": ANSWER}]


def write_forms(root: Path, rows: int, images: list[bytes]) -> dict[str, Path]:
    """The same ``rows`` samples as hub Parquet, WebDataset tars and JSONL + image files."""
    import datasets
    import webdataset

    datasets.disable_progress_bars()
    (root / "jsonl" / "img").mkdir(parents=True)
    with open(root / "jsonl" / "train.jsonl", "w") as f:
        for i in range(rows):
            (root / "jsonl" / "img" / f"{i:07d}.jpg").write_bytes(images[i % len(images)])
            f.write(json.dumps({"id": str(i), "image": f"img/{i:07d}.jpg", "conversations": conversation(i)}) + "\n")

    (root / "tars").mkdir()
    for shard, first in enumerate(range(0, rows, 1000)):
        with webdataset.TarWriter(str(root / "tars" / f"shard-{shard:05d}.tar")) as sink:
            for i in range(first, min(first + 1000, rows)):
                sink.write({"__key__": f"{i:07d}", "jpg": images[i % len(images)],
                            "json": {"id": str(i), "conversations": conversation(i)}})

    def gen():
        for i in range(rows):
            yield {"id": str(i), "image": {"bytes": images[i % len(images)], "path": f"{i:07d}.jpg"},
                   "conversations": conversation(i)}

    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    ds = datasets.Dataset.from_generator(gen, features=features, cache_dir=str(root / "hf_cache"))
    (root / "parquet").mkdir()
    files = -(-rows // 10_000)
    for k in range(files):
        ds.shard(files, k, contiguous=True).to_parquet(str(root / "parquet" / f"train-{k:05d}-of-{files:05d}.parquet"))
    shutil.rmtree(root / "hf_cache")
    return {"parquet": root / "parquet", "webdataset": root / "tars", "jsonl": root / "jsonl" / "train.jsonl",
            "prepared": root / "prepared"}


def read_all(path: str) -> dict:
    """Child process: every row of the source at ``path`` through the read path, images decoded."""
    import resource

    # Imported before the clock starts: the forms' modules are not part of reading a row.
    import omni_ray.data.formats  # noqa: F401
    import omni_ray.data.hub  # noqa: F401
    import omni_ray.data.prepare  # noqa: F401
    import omni_ray.data.tars  # noqa: F401
    from omni_ray.data.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, decode_image, load_image
    from omni_ray.data.sources import count_units, read_unit, resolve_entry

    start, wall = time.process_time(), time.perf_counter()
    source = count_units(resolve_entry(path))
    counted = time.process_time()
    rows, images, rejects = 0, 0, {}
    for unit in source.units:
        for row in read_unit(unit, source):
            rows += 1
            if row["reason"]:
                rejects[row["reason"]] = rejects.get(row["reason"], 0) + 1
                continue
            # As pipeline.Preprocess._inputs: per item the embedded bytes, else the file its ref names.
            refs, blobs = list(row["image_refs"]), list(row["images"])
            for i in range(max(len(refs), len(blobs))):
                blob = blobs[i] if i < len(blobs) else None
                if blob is None or not len(blob):
                    blob = load_image(refs[i], max_bytes=DEFAULT_MAX_IMAGE_BYTES, timeout_s=60.0)
                decode_image(bytes(blob), max_pixels=DEFAULT_MAX_PIXELS)
                images += 1
    end = time.process_time()
    return {"rows": rows, "images": images, "rejects": rejects, "cpu_s": end - start, "count_cpu_s": counted - start,
            "wall_s": time.perf_counter() - wall, "peak_rss_mb": peak_rss_mb(),
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss alone: Linux carries the forking
    parent's high-water mark across fork + exec into it, so a spawned child reports the parent's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def in_child(path: Path, rows: int) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(read_all, str(path)).result()
    if result["rejects"] or result["rows"] != rows:
        raise SystemExit(f"{path}: {result['rows']} rows of {rows}, rejected {result['rejects']}: the numbers "
                         "would be wrong")
    return result


def prepare_all(sets: list[dict]) -> None:
    """``data prepare`` each set's JSONL into its ``prepared`` folder (the CLI's defaults), on local Ray."""
    import ray

    from omni_ray.data.prepare import prepare

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for s in sets:
            prepare(str(s["paths"]["jsonl"]), str(s["paths"]["prepared"]), progress=False)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo-rows", type=int, default=1400)
    parser.add_argument("--small-rows", type=int, nargs=2, default=[2000, 50_000])
    parser.add_argument("--repeats", type=int, default=2, help="children per form for the photo rate (best kept)")
    args = parser.parse_args()

    began, load_start = time.perf_counter(), os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="omni_ray_bench_sources_"))
    try:
        photo, small = jpegs(small=False), jpegs(small=True)
        sets = [{"name": "photos", "rows": args.photo_rows, "images": photo}] + [
            {"name": f"small{n}", "rows": n, "images": small} for n in args.small_rows]
        for s in sets:
            s["paths"] = write_forms(root / s["name"], s["rows"], s["images"])
        prepare_all(sets)
        written = time.perf_counter() - began
        results = {}
        for s in sets:
            for form, path in s["paths"].items():
                runs = [in_child(path, s["rows"]) for _ in range(args.repeats if s["name"] == "photos" else 1)]
                results[s["name"], form] = min(runs, key=lambda r: r["cpu_s"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(args, results, photo, small, written, began, load_start)


def report(args, results: dict, photo: list[bytes], small: list[bytes], written: float, began: float,
           load_start: float) -> None:
    from PIL import Image

    sizes = [Image.open(io.BytesIO(b)).size for b in photo]
    megapixels = sum(w * h for w, h in sizes) / len(sizes) / 1e6
    low, high = args.small_rows
    print(f"{args.photo_rows} rows of photos: {len(photo)} JPEGs (q90) of {min(w * h for w, h in sizes) / 1e6:.2f}-"
          f"{max(w * h for w, h in sizes) / 1e6:.2f} MP, {megapixels:.2f} MP and "
          f"{sum(map(len, photo)) / len(photo) / 1e3:.0f} KB on average; {low} and {high} rows of 64x64 JPEGs "
          f"({sum(map(len, small)) / len(small) / 1e3:.1f} KB) for peak RSS")
    print(f"{os.cpu_count()} CPUs, load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"forms written and prepared in {written:.0f} s, whole run {time.perf_counter() - began:.0f} s")
    print("rows/CPU-s: process CPU time of a child reading resolve_entry -> count_units -> read_unit and decoding "
          f"every image (photos: best of {args.repeats}); count: the share of it spent in count_units")
    print(f"{'form':<16} {'photos rows/CPU-s':>17} {'count':>6} {'64x64 rows/CPU-s':>16} "
          f"{f'RSS {low // 1000}k MB':>11} {f'RSS {high // 1000}k MB':>12} {f'{high // 1000}k/{low // 1000}k':>8}")
    rate = {}
    for form, label in FORMS.items():
        p, lo, hi = results["photos", form], results[f"small{low}", form], results[f"small{high}", form]
        rate[form] = p["rows"] / p["cpu_s"], hi["rows"] / hi["cpu_s"]
        print(f"{label:<16} {rate[form][0]:>17.1f} {p['count_cpu_s'] / p['cpu_s']:>6.1%} {rate[form][1]:>16.0f} "
              f"{lo['peak_rss_mb']:>11.0f} {hi['peak_rss_mb']:>12.0f} {hi['peak_rss_mb'] / lo['peak_rss_mb']:>8.2f}")
    sources = [f for f in FORMS if f != "prepared"]
    for column, what in ((1, "64x64 JPEGs (the readers' own cost)"), (0, "photos")):
        slowest = min(sources, key=lambda f: rate[f][column])
        ratio = rate[slowest][column] / rate["prepared"][column]
        if column == 1:
            print(f"{what}: slowest source ({FORMS[slowest]}) / prepared shards = {ratio:.2f}")
        else:
            print(f"slowest source ({FORMS[slowest]}) on {what}")
            print(f"slowest source / prepared shards = {ratio:.2f}")


if __name__ == "__main__":
    main()
