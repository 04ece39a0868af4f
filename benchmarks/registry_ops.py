"""What the registry costs: `Registry.stage()` (what a service polls to follow a stage) against a plain read of the
pointer file (the baseline: the least any follower must do), and a promotion (history record created exclusively +
pointer), on local disk and on memory://. Also a checkpoint publish (files.atomic_dir) against writing the same
files in place (no safety).

    .venv/bin/python benchmarks/registry_ops.py                       # a tiny untrained checkpoint made here
    .venv/bin/python benchmarks/registry_ops.py --checkpoint runs/toy/best --polls 5000

A promotion needs a promotable card: the script adds placeholder OOD / triage blocks to its own tiny checkpoint
(untrained numbers: this measures file operations, nothing clinical).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid


def _tiny_promotable(workdir: str) -> str:
    import numpy as np

    from dermaid.evaluation.ood import create_detector, save_statistics
    from dermaid.models.card import build_card, load_card, replace_card, save_checkpoint
    from dermaid.models.classifier import create_classifier, resolve_input_spec

    cfg = {"name": "test_efficientnet", "pretrained": False, "use_metadata": True}
    model = create_classifier(cfg)
    url = f"{workdir}/ckpt"
    save_checkpoint(url, build_card(cfg, resolve_input_spec(model, 64)), model.state_dict())
    logits = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)  # (N, C)
    detector = create_detector("msp").fit(None, logits, np.arange(32) % 8)
    replace_card(url, load_card(url).with_calibration(
        {"method": "msp", "statistics": save_statistics(url, {"msp": detector}), "threshold": 0.5, "scale": 1.0},
        {"cutoff": 0.3}))
    return url


def _per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    from dermaid import files
    from dermaid.models.card import CARD_FILE, load_card
    from dermaid.registry import Registry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a promotable checkpoint (default: a tiny one made here)")
    parser.add_argument("--polls", type=int, default=2000)
    parser.add_argument("--promotions", type=int, default=20)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="registry_ops_")
    checkpoint = args.checkpoint or _tiny_promotable(workdir)
    weights = load_card(checkpoint).artifact  # model.pt, or a fresh name on a checkpoint replaced on an object store
    blobs = {name: files.read_bytes(files.join(checkpoint, name)) for name in (CARD_FILE, weights)}

    for root in (f"{workdir}/registry", f"memory://registry-ops-{uuid.uuid4().hex[:6]}"):
        where = "memory://" if root.startswith("memory") else "local disk"
        reg = Registry(root)
        for version in ("v1", "v2"):
            reg.register(checkpoint, "bench", version)
        reg.promote("bench", "v1")
        pointer = files.join(root, "bench", "stages", "production.json")
        poll = _per_call(lambda: reg.stage("bench"), args.polls)
        baseline = _per_call(lambda: files.read_text(pointer), args.polls)
        versions = iter(["v2", "v1"] * args.promotions)
        promote = _per_call(lambda: reg.promote("bench", next(versions)), args.promotions)

        def publish_atomic():
            with files.atomic_dir(files.join(root, "pub", "best")) as tmp:
                for name, data in blobs.items():
                    files.write_bytes(files.join(tmp, name), data)

        def publish_in_place():
            for name, data in blobs.items():
                files.write_bytes(files.join(root, "pub", "inplace", name), data)

        safe = _per_call(publish_atomic, 20)
        unsafe = _per_call(publish_in_place, 20)
        print(f"{where}: stage() {poll * 1e6:.0f} us/call vs plain pointer read {baseline * 1e6:.0f} us "
              f"(ratio {poll / baseline:.2f}); promote {promote * 1e3:.1f} ms; checkpoint publish "
              f"({sum(map(len, blobs.values())) / 1e6:.1f} MB) {safe * 1e3:.1f} ms vs in place {unsafe * 1e3:.1f} ms "
              f"(ratio {safe / unsafe:.2f})")


if __name__ == "__main__":
    main()
