"""Peak memory of preparing a Parquet file of ~2 GB vs one of ~200 MB: the Parquet source reads a
record batch at a time, so the larger file should cost about the same memory, not ten times more.

    python benchmarks/parquet_memory.py                  # launch/prepare_data.py --from on each file
    python benchmarks/parquet_memory.py --reader-only    # only iterate open_parquet(...).cases()
    python benchmarks/parquet_memory.py --small-mb 20 --large-mb 200 --keep --workdir /tmp/pq --out pq.json

Both files hold random float32 sequences of 50-250 steps x 16 channels, labels 0-9, in the
list<list<float>> layout with row groups of 1,000 rows, generated from a fixed seed a row group at
a time (so generating them is bounded too). Each measurement runs in a fresh subprocess; its peak
RSS is the kernel's (os.wait4's ru_maxrss), and the summed RSS of its process tree is polled as
well in case the preparation starts workers. A child that only imports pyarrow and the source
gives the floor. Exit 1 when peak(large) / peak(small) exceeds --max-ratio (1.5).

This process stays small on purpose (generation runs in a child too, and numpy/pyarrow are never
imported here): a child's ru_maxrss starts from its parent's RSS at fork, so a parent grown by
generating 2 GB would set every child's figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import PY, ROOT, env_for_children, say, table

CHANNELS = 16
CLASSES = 10
ROW_GROUP = 1000
STEPS = (50, 250)  # inclusive
MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where the Parquet files (and prepared data) go (default: a new dir under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (files are reused by a later run with the same sizes)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--reader-only", action="store_true", help="measure iterating open_parquet(...).cases(), not prepare_data.py")
    p.add_argument("--small-mb", type=int, default=200)
    p.add_argument("--large-mb", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ratio", type=float, default=1.5, help="fail when peak RSS large/small exceeds this")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measured subprocess")
    p.add_argument("--child-read", metavar="FILE", help=argparse.SUPPRESS)  # the measured reader, in its own process
    p.add_argument("--child-import", action="store_true", help=argparse.SUPPRESS)  # the floor: imports only
    p.add_argument("--child-generate", nargs=3, metavar=("FILE", "MB", "SEED"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def generate(path: Path, megabytes: int, seed: int) -> dict:
    """Write `path` a row group at a time until its values reach `megabytes`; reuse a file generated
    before with the same parameters (its .json sidecar says so)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    params = {"megabytes": megabytes, "seed": seed, "channels": CHANNELS, "steps": list(STEPS), "row_group": ROW_GROUP}
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("params") == params:
        return json.loads(sidecar.read_text())
    rng = np.random.default_rng(seed)
    schema = pa.schema([("x", pa.list_(pa.list_(pa.float32()))), ("y", pa.int64())])
    rows = steps = written = 0
    start = time.perf_counter()
    # Dictionary encoding is pointless for random floats (pyarrow would try it, then fall back).
    with pq.ParquetWriter(path, schema, compression="snappy", use_dictionary=["y"]) as writer:
        while written < megabytes * MIB:
            lengths = rng.integers(STEPS[0], STEPS[1] + 1, ROW_GROUP)
            total = int(lengths.sum())
            values = pa.array(rng.random(total * CHANNELS, dtype=np.float32))
            inner = pa.ListArray.from_arrays(pa.array(np.arange(0, total * CHANNELS + 1, CHANNELS, dtype=np.int32)), values)
            outer = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), inner)
            labels = pa.array(rng.integers(0, CLASSES, ROW_GROUP))
            writer.write_table(pa.table([outer, labels], schema=schema), row_group_size=ROW_GROUP)
            rows, steps, written = rows + ROW_GROUP, steps + total, written + total * CHANNELS * 4 + (total + ROW_GROUP) * 4
    info = {"params": params, "rows": rows, "steps": steps, "bytes": path.stat().st_size,
            "generate_s": round(time.perf_counter() - start, 1)}
    sidecar.write_text(json.dumps(info))
    return info


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of `root` and its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(rss.get(pid, 0) for pid in tree)


def measure(args: list[str], timeout: float) -> dict:
    """Run `args` in a fresh process; its peak RSS (kernel), the peak polled RSS of its tree, seconds, output."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env=env_for_children(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_tree, done = [0], threading.Event()

    def poll() -> None:  # every 50 ms: a tree's peak between two polls is missed, the kernel's figure is not
        while not done.wait(0.05):
            peak_tree[0] = max(peak_tree[0], _tree_rss(proc.pid))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    out, err = proc.stdout.read(), proc.stderr.read()  # to EOF: the child has ended or closed them
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN's running maximum
    proc.returncode = os.waitstatus_to_exitcode(status)
    timer.cancel()
    done.set()
    poller.join()
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "peak_tree_rss_mib": round(peak_tree[0] / MIB, 1),
            "stdout": out, "stderr": err}


def child_read(path: str) -> None:
    """The measured reader: every case of the file, values touched (summed) so none is skipped."""
    from pipeline.sources.parquet import open_parquet

    source = open_parquet(Path(path), label_column="y", sequence_column="x")
    rows = steps = batches = 0
    total = 0.0
    for cases in source.cases():
        rows, steps, batches = rows + len(cases), steps + int(cases.lengths.sum()), batches + 1
        total += float(cases.values.sum(dtype="float64"))
    import pyarrow

    print(json.dumps({"rows": rows, "steps": steps, "batches": batches, "sum": total, "pyarrow": pyarrow.__version__}))


def child_import() -> None:
    import pyarrow
    import pyarrow.parquet  # noqa: F401

    import pipeline.sources.parquet  # noqa: F401

    print(json.dumps({"pyarrow": pyarrow.__version__}))


def _has_from_flag() -> bool:
    proc = subprocess.run([PY, "launch/prepare_data.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc.returncode == 0 and "--from" in proc.stdout


def _command(path: Path, work: Path, reader_only: bool) -> list[str]:
    if reader_only:
        return [PY, str(Path(__file__).resolve()), "--child-read", str(path)]
    return [PY, "launch/prepare_data.py", "--from", str(path), "--out", str(work / f"prepared-{path.stem}"),
            "--label-column", "y", "--sequence-column", "x"]


def _generated(path: Path, megabytes: int, seed: int, timeout: float) -> dict:
    """generate() in a child, so that this process stays small (see the module's docstring)."""
    r = measure([PY, str(Path(__file__).resolve()), "--child-generate", str(path), str(megabytes), str(seed)], timeout)
    if r["rc"] != 0:
        raise SystemExit(f"[bench] generating {path} failed (exit {r['rc']}):\n{r['stderr'][-4000:]}")
    return json.loads(r["stdout"])


def run(args: argparse.Namespace, work: Path) -> dict:
    files = {"small": _generated(work / "small.parquet", args.small_mb, args.seed, args.timeout),
             "large": _generated(work / "large.parquet", args.large_mb, args.seed + 1, args.timeout)}
    for name, info in files.items():
        say(f"{name}: {info['bytes'] / MIB:,.0f} MiB, {info['rows']:,} rows (generated in {info['generate_s']} s)")
    floor = measure([PY, str(Path(__file__).resolve()), "--child-import"], args.timeout)
    results = {}
    for name, info in files.items():
        path = work / f"{name}.parquet"
        r = measure(_command(path, work, args.reader_only), args.timeout)
        if r["rc"] != 0:
            raise SystemExit(f"[bench] {name}: exit {r['rc']}\n{r['stdout'][-2000:]}\n{r['stderr'][-4000:]}")
        if args.reader_only and json.loads(r["stdout"])["rows"] != info["rows"]:
            raise SystemExit(f"[bench] {name}: read {r['stdout']}, but the file has {info['rows']} rows")
        if not args.keep:  # the prepared copy of the large file is as large as it: drop it before the next
            shutil.rmtree(work / f"prepared-{path.stem}", ignore_errors=True)
        results[name] = {**{k: info[k] for k in ("bytes", "rows", "steps", "generate_s")},
                         **{k: r[k] for k in ("seconds", "peak_rss_mib", "peak_tree_rss_mib")}}
        say(f"{name}: peak RSS {r['peak_rss_mib']:,.0f} MiB in {r['seconds']:.1f} s")
    peak = {k: max(v["peak_rss_mib"], v["peak_tree_rss_mib"]) for k, v in results.items()}
    ratio = peak["large"] / peak["small"]
    return {"mode": "reader-only" if args.reader_only else "prepare_data", "files": results,
            "floor_rss_mib": floor["peak_rss_mib"], "ratio": round(ratio, 3), "max_ratio": args.max_ratio,
            "ok": ratio <= args.max_ratio, "pyarrow": json.loads(floor["stdout"])["pyarrow"], "cores": os.cpu_count(), "python": sys.version.split()[0]}


def report(result: dict) -> str:
    rows = [[name, r["bytes"] / MIB, r["rows"], r["peak_rss_mib"], r["peak_tree_rss_mib"], r["seconds"]]
            for name, r in result["files"].items()]
    rows.append(["(imports only)", None, None, result["floor_rss_mib"], None, None])
    verdict = "ok" if result["ok"] else "TOO HIGH"
    return (table(f"Parquet peak memory ({result['mode']})", ["file", "MiB", "rows", "peak RSS MiB", "tree RSS MiB", "s"], rows)
            + f"\nratio large/small: {result['ratio']:.2f} (limit {result['max_ratio']}: {verdict})")


def _clean(work: Path, created: bool) -> None:
    """Remove what this benchmark wrote; the workdir itself only if it made it (a user's --workdir may hold more)."""
    for stem in ("small", "large"):
        for path in (work / f"{stem}.parquet", work / f"{stem}.json"):
            path.unlink(missing_ok=True)
        shutil.rmtree(work / f"prepared-{stem}", ignore_errors=True)
    if created and not any(work.iterdir()):
        work.rmdir()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_read:
        child_read(args.child_read)
        return 0
    if args.child_import:
        child_import()
        return 0
    if args.child_generate:
        path, megabytes, seed = args.child_generate
        print(json.dumps(generate(Path(path), int(megabytes), int(seed))))
        return 0
    if not args.reader_only and not _has_from_flag():
        say("launch/prepare_data.py has no --from option yet: measure the reader alone with --reader-only")
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="parquet-memory-", dir="/tmp"))
    created = not work.exists() or not args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    finally:
        if not args.keep:
            _clean(work, created)
    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
