"""prepare's throughput next to the bare per-image limit measured in the same run, as a ratio.

    .venv/bin/python benchmarks/prepare_throughput.py                 # 600 images of 1024x1024 -> 512 px
    .venv/bin/python benchmarks/prepare_throughput.py --n 400 --image-size 384 --num-cpus 2

The bare limit is a plain loop in one process over the same files: read the bytes, decode with
JPEG draft mode, resize the shorter side, encode (dermaid.data.shards.process_image, the
function the workers call), i.e. images/s per core, times the cores prepare uses. prepare's
rate is `prepare_dataset` end to end on an already running Ray (records, splits, tasks, Parquet
shards, version hash, manifest), with the raw-listing cache off. The bare loop runs before and
after prepare and the two are averaged, since other work on a shared machine drifts. On a busy
machine "per core x cores" overstates what the cores deliver, so the plain loop is also run in
that many processes at once (no Ray) and prepare is compared with that too.
Target: ratio >= 0.8. Results are also written to benchmarks/results/prepare_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import ray

from dermaid.config import compose, to_plain
from dermaid.data.isic import read_records
from dermaid.data.prepare import prepare_dataset
from dermaid.data.shards import process_image
from dermaid.data.synth import generate
from dermaid.ray_runtime import ensure_ray


def _bare_rate(urls: list[str], image_size: int, quality: int) -> float:
    """Images per second of read + decode (draft) + resize + encode in a plain loop, one core."""
    start = time.perf_counter()
    for url in urls:
        with open(url, "rb") as f:
            process_image(f.read(), image_size, quality)
    return len(urls) / (time.perf_counter() - start)


def _timed_slice(args: tuple) -> float:
    """Worker of the parallel bare loop: wait for the others, then time its slice (seconds)."""
    barrier, urls, image_size, quality = args
    barrier.wait()
    start = time.perf_counter()
    for url in urls:
        with open(url, "rb") as f:
            process_image(f.read(), image_size, quality)
    return time.perf_counter() - start


def _bare_parallel_rate(urls: list[str], image_size: int, quality: int, processes: int) -> float:
    """Images per second of the plain loop run in `processes` processes at once (no Ray)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(processes) as pool:
        barrier = manager.Barrier(processes)
        slices = [(barrier, urls[i::processes], image_size, quality) for i in range(processes)]
        seconds = pool.map(_timed_slice, slices)
    return len(urls) / max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=600, help="images to generate (1024x1024 JPEGs; ~1 s of fixed cost per run needs a few hundred to amortise)")
    parser.add_argument("--image-size", type=int, default=512, help="prepare's data.image_size")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="cores of the local Ray")
    parser.add_argument("--workdir", default=None, help="where to put the generated set (default: a temp dir)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dermaid-bench-"))
    raw = workdir / "raw"
    t0 = time.perf_counter()
    generate(str(raw), n=args.n, seed=0, size=(1024, 1024))
    print(f"generated {args.n} images of 1024x1024 in {time.perf_counter() - t0:.1f} s at {raw}")

    data_cfg = to_plain(compose("prepare", [f"data.root={raw}", f"data.image_size={args.image_size}"]).data)
    urls = read_records(str(raw))["image_url"].tolist()
    _bare_rate(urls[:10], args.image_size, data_cfg["quality"])  # warm the page cache and the imports

    ensure_ray("local", args.num_cpus)
    cores = int(ray.cluster_resources()["CPU"])
    parallel = _bare_parallel_rate(urls, args.image_size, data_cfg["quality"], cores)
    before = _bare_rate(urls, args.image_size, data_cfg["quality"])
    t0 = time.perf_counter()
    manifest = prepare_dataset(data_cfg, out=str(workdir / "prepared"), use_cache=False)
    seconds = time.perf_counter() - t0
    after = _bare_rate(urls, args.image_size, data_cfg["quality"])
    ray.shutdown()

    per_core = (before + after) / 2
    limit = per_core * cores
    rate = manifest["num_records"] / seconds
    result = {
        "images": manifest["num_records"], "source_size": [1024, 1024], "image_size": args.image_size,
        "cores": cores, "bare_per_core_img_s": round(per_core, 1), "bare_before_img_s": round(before, 1),
        "bare_after_img_s": round(after, 1), "bare_limit_img_s": round(limit, 1),
        "prepare_img_s": round(rate, 1), "prepare_seconds": round(seconds, 2), "ratio": round(rate / limit, 3),
        "shards": len(manifest["shards"]), "cpu_count": os.cpu_count(),
        "bare_parallel_img_s": round(parallel, 1), "ratio_vs_parallel": round(rate / parallel, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(f"bare loop: {per_core:.1f} img/s per core (before {before:.1f}, after {after:.1f}) x {cores} cores "
          f"= {limit:.1f} img/s")
    print(f"prepare:   {rate:.1f} img/s ({manifest['num_records']} images in {seconds:.2f} s, "
          f"{len(manifest['shards'])} shards)")
    print(f"ratio:     {rate / limit:.2f}  (target >= 0.8)")
    print(f"also: the plain loop in {cores} processes at once reached {parallel:.1f} img/s "
          f"(prepare / that = {rate / parallel:.2f}); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "prepare_throughput.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
