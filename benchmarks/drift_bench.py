"""Drift checks of a 1 GB ``files`` package: the per-check-in stat check against the full re-hash.

Builds a mixed tree in a temp dir (a few large files and thousands of small
ones, 1 GB by default), packs it as a tar, installs it through the agent's
``installers.install()`` (which hashes it into ``content/<name>.json`` and
the receipt), then times:

* the check a check-in makes (``content.check(..., full=False)``: one lstat
  per file, nothing re-hashed when nothing changed), median over ``--rounds``;
* the full re-hash (``full=True``), median over ``--full-rounds``;
* one check-in's check after a single small file was edited (it re-hashes
  that file only) for comparison.

The tree has just been written, so it is in the page cache: the full
re-hash measures hashing, not the disk (a cold cache adds reading 1 GB).

    python benchmarks/drift_bench.py [--size-mb 1024] [--large 8] [--small 5000] [--rounds 15] [--full-rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reconciler.agent import content  # noqa: E402
from reconciler.agent.installers import (  # noqa: E402
    ArtifactRef,
    InstallerSpec,
    Layout,
    install,
    read_receipt,
)

MB = 1024 * 1024


def build_tree(root: Path, size_mb: int, large: int, small: int) -> tuple[int, int]:
    """A tree of ``large`` big files holding 80% of ``size_mb`` and ``small`` files sharing the rest."""
    block = os.urandom(MB)
    total = size_mb * MB
    large_bytes = total * 4 // 5
    small_size = (total - large_bytes) // small
    written = 0
    for i in range(large):
        path = root / "data" / f"large-{i:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = large_bytes // large
        with open(path, "wb") as handle:
            handle.write(i.to_bytes(8, "big"))
            left = size - 8
            while left > 0:
                chunk = block[: min(MB, left)]
                handle.write(chunk)
                left -= len(chunk)
        written += size
    for i in range(small):
        path = root / "lib" / f"dir-{i // 100:03d}" / f"file-{i:05d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        offset = (i * 7919) % (MB - small_size) if small_size < MB else 0
        path.write_bytes(i.to_bytes(8, "big") + block[offset: offset + small_size - 8])
        written += small_size
    return large + small, written


def timed(fn: object, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()  # type: ignore[operator]
        out.append(time.perf_counter() - start)
        assert result is None, f"unexpected drift: {result}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--large", type=int, default=8)
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--full-rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to build (default: the system temp dir)")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = Path(tempfile.mkdtemp(prefix="drift-bench-", dir=args.dir))
    try:
        source = base / "source"
        start = time.perf_counter()
        files, size = build_tree(source, args.size_mb, args.large, args.small)
        print(f"tree: {files} files, {size / MB:.0f} MiB ({args.large} large, {args.small} small) "
              f"built in {time.perf_counter() - start:.1f} s")
        tar_path = base / "artifact.tar"
        with tarfile.open(tar_path, "w") as archive:
            archive.add(source, arcname=".")
        shutil.rmtree(source)
        digest = hashlib.sha256()
        with open(tar_path, "rb") as handle:
            while chunk := handle.read(MB):
                digest.update(chunk)
        ref = ArtifactRef(digest.hexdigest(), "tar", tar_path.stat().st_size)
        layout = Layout(base / "agent")
        layout.create()
        start = time.perf_counter()
        install(layout, "big", "1.0", InstallerSpec("files"), tar_path, ref, "op-bench")
        print(f"install (unpack and hash every file): {time.perf_counter() - start:.2f} s")
        tar_path.unlink()
        receipt = read_receipt(layout, "big")
        assert receipt is not None and receipt.content is not None
        tree = layout.package_dir("big", "1.0")
        index = layout.content_index("big")
        expected = receipt.content["digest"]
        print(f"receipt content: {receipt.content['files']} files, {receipt.content['bytes'] / MB:.0f} MiB, "
              f"index {index.stat().st_size / 1024:.0f} KiB")

        def cheap() -> str | None:
            return content.check(tree, index, expected, full=False)

        def full() -> str | None:
            return content.check(tree, index, expected, full=True)

        cheap()  # warm the dentry cache as a running agent's would be
        cheap_times = timed(cheap, args.rounds)
        full_times = timed(full, args.full_rounds)
        victim = tree / "lib" / "dir-000" / "file-00000.dat"
        os.utime(victim, ns=(1, 1_000_000_000))  # signature changed, content not: that file is re-hashed
        one_changed = timed(cheap, 1)[0]
        scan_times = [0.0] * args.rounds
        read_times = [0.0] * args.rounds
        for i in range(args.rounds):  # the two parts of the stat check: lstat of every file, reading the index
            start = time.perf_counter()
            content.scan(tree)
            scan_times[i] = time.perf_counter() - start
            start = time.perf_counter()
            json.loads(index.read_text(encoding="utf-8"))
            read_times[i] = time.perf_counter() - start
        cheap_median = statistics.median(cheap_times)
        full_median = statistics.median(full_times)
        print(f"per-check-in stat check: median {cheap_median * 1000:.1f} ms over {args.rounds} rounds "
              f"(min {min(cheap_times) * 1000:.1f}, max {max(cheap_times) * 1000:.1f})")
        print(f"  of which: scanning the tree (lstat of every file) {statistics.median(scan_times) * 1000:.1f} ms, "
              f"reading the index {statistics.median(read_times) * 1000:.1f} ms (medians)")
        print(f"full re-hash: median {full_median:.2f} s over {args.full_rounds} rounds "
              f"(min {min(full_times):.2f}, max {max(full_times):.2f}); "
              f"{size / MB / full_median:.0f} MiB/s")
        print(f"stat check with one small file touched (re-hashed): {one_changed * 1000:.1f} ms")
        print(f"ratio full / stat check: {full_median / cheap_median:.0f}x")
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
