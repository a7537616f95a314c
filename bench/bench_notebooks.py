"""How long each course notebook takes with its default parameters, from a cold and a warm cache.

    python bench/bench_notebooks.py                          # all eight notebooks, cold then warm
    python bench/bench_notebooks.py 03 07 --write-back       # two of them; keep the warm run's outputs

For each notebook: `jupyter nbconvert --to notebook --execute` twice, with `TACQ_LITE_CACHE` pointed
at a new empty folder. The first run is cold (the GGUF is parsed and converted, gradients and
Q(W) are computed and cached); the second reuses that folder, as a learner's second run does.
Each run's wall time, user + system CPU time and peak resident memory come from `/usr/bin/time`;
the load average before each run and the CPU time the hypervisor took from this machine during it
("steal", from /proc/stat) are recorded, since these numbers mean little on a busy machine or host.
`--write-back` copies the warm run's executed notebook over the committed one, so its outputs are
the ones measured. Writes bench/results/notebooks/times.json (merged with earlier entries).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tacq_lite.io import read_json, write_json_atomic  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "bench" / "results" / "notebooks" / "times.json"
TIME = "/usr/bin/time"  # GNU time: wall, CPU and peak memory of the whole process tree


def steal_seconds() -> float | None:
    """CPU seconds taken by the hypervisor from this machine since boot, summed over cores (None off Linux)."""
    try:
        # "cpu  user nice system idle iowait irq softirq steal ...", in clock ticks
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else None


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with family, model and AVX-512 ("unknown" elsewhere).

    Cloud machines of one kind can be different CPU generations behind the same name ("AMD EPYC"),
    and PyTorch's CPU kernels run much faster on one with AVX-512: the family and model tell them apart."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    info = {}
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    name = info.get("model name", "unknown")
    avx512 = "avx512f" in info.get("flags", "").split()
    return f"{name} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}" + \
        (", AVX-512)" if avx512 else ", no AVX-512)")


def timed_execute(notebook: Path, out_dir: Path, cache: Path, cwd: Path = NOTEBOOKS) -> dict:
    """Execute `notebook` into out_dir with the cache folder `cache`; wall, CPU and memory of the run."""
    stats = out_dir / "time.txt"
    load, steal = os.getloadavg()[0], steal_seconds()
    cmd = [TIME, "-f", "%e %U %S %M", "-o", str(stats), str(Path(sys.executable).parent / "jupyter"),
           "nbconvert", "--to", "notebook", "--execute", "--output-dir", str(out_dir),
           "--ExecutePreprocessor.timeout=3600", str(notebook)]
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, "TACQ_LITE_CACHE": str(cache)},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{notebook.name} failed:\n{done.stderr[-3000:]}")
    wall, user, system, rss_kib = stats.read_text().split()[-4:]
    stolen = None if steal is None else round(steal_seconds() - steal, 1)
    return {"wall_s": float(wall), "cpu_s": round(float(user) + float(system), 1), "peak_rss_gib":
            round(int(rss_kib) / 2**20, 2), "load_before": round(load, 2), "steal_s": stolen}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prefixes", nargs="*", help="notebook number prefixes, e.g. 03 07 (default: all)")
    ap.add_argument("--write-back", action="store_true", help="keep the warm run's outputs in notebooks/")
    args = ap.parse_args(argv)
    found = sorted(NOTEBOOKS.glob("0*.ipynb"))
    chosen = [p for p in found if not args.prefixes or p.name[:2] in args.prefixes]
    unknown = set(args.prefixes) - {p.name[:2] for p in found}
    if unknown:
        names = ", ".join(p.name[:2] for p in found)
        fail(f"no notebook starts with {', '.join(sorted(unknown))}; choose from {names}")
    if not Path(TIME).is_file():
        fail(f"{TIME} is missing; install GNU time (apt install time) to measure CPU time and peak memory")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    record = read_json(OUT) if OUT.is_file() else {"notebooks": {}}
    for nb in chosen:
        status = subprocess.run(["git", "status", "--porcelain", str(nb)], cwd=ROOT, capture_output=True, text=True)
        edited = bool(status.stdout.strip())  # the notebook measured differs from the one at `commit`
        with tempfile.TemporaryDirectory(prefix="tacq-nb-") as tmp:
            cache, runs = Path(tmp) / "cache", {}
            cache.mkdir()
            for kind in ("cold", "warm"):
                (Path(tmp) / kind).mkdir()
                runs[kind] = timed_execute(nb, Path(tmp) / kind, cache)
                print(f"{nb.name} {kind}: {runs[kind]['wall_s']:.0f} s wall, {runs[kind]['cpu_s']:.0f} s CPU, "
                      f"{runs[kind]['peak_rss_gib']} GiB, load before {runs[kind]['load_before']}, "
                      f"steal {runs[kind]['steal_s']} s", flush=True)
            if args.write_back:
                shutil.copyfile(Path(tmp) / "warm" / nb.name, nb)
        record["notebooks"][nb.name] = {**runs, "commit": commit.strip(), "uncommitted_edits": edited,
                                        "threads": os.cpu_count(), "cpu": cpu_model(),
                                        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        write_json_atomic(OUT, record)
    print(f"wrote {OUT.relative_to(ROOT)}\n\n{markdown_table(record)}")


def markdown_table(record: dict) -> str:
    """The table BENCHMARKS.md shows: one row per notebook measured."""
    rows = ["| notebook | cold: wall, CPU | warm: wall, CPU | peak memory | measured |",
            "| --- | --- | --- | --- | --- |"]
    for name, r in sorted(record["notebooks"].items()):
        c, w = r["cold"], r["warm"]
        commit = r["commit"] + (" + edits" if r.get("uncommitted_edits") else "")
        peak = max(c["peak_rss_gib"], w["peak_rss_gib"])
        rows.append(f"| `{name[:-6]}` | {c['wall_s']:.0f} s, {c['cpu_s']:.0f} s | {w['wall_s']:.0f} s, "
                    f"{w['cpu_s']:.0f} s | {peak:.1f} GiB | {r['date']}, {commit} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
