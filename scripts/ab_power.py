"""How well `infermatrix ab` sees a regression on this machine: repeated A/A runs, and
A/B runs against a copy of the code where one variant does a planted amount of extra
work. Every timing comes from `infermatrix ab` (and one `infermatrix run` for the wall
time ratio); this script only prepares the sides and tallies the verdicts.

    python scripts/ab_power.py --reps 10 --plant 0 --out results/power-aa
    python scripts/ab_power.py --reps 10 --plant 0.05 --out results/power-5
    python scripts/ab_power.py --reps 10 --plant 0.02 --out results/power-2 [--fail latency_ms_p50:+2%]
    python scripts/ab_power.py --reps 1 --plant 0 --wall --out results/power-wall

The matrix is the default matrix's speed cases (its drift rows excluded). The planted
copy slows the `sdpa` variant: every forward of a model using it (or, in the attention
workload, every attention call) busy-waits `plant` times its own duration afterwards,
so the case takes exactly that much longer whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANTED = "sdpa"

_PLANT = '''
    def apply(self, model: Transformer) -> Transformer:  # planted by scripts/ab_power.py
        import time as _time

        def slower(fn):
            def call(*args, **kwargs):
                t0 = _time.perf_counter()
                out = fn(*args, **kwargs)
                until = t0 + (_time.perf_counter() - t0) * (1 + {plant!r})
                while _time.perf_counter() < until:
                    pass
                return out
            return call

        swapped = with_attention(model, sdpa_attention)
        if isinstance(model, Transformer):
            swapped.forward = slower(swapped.forward)
        else:  # the attention workload's holder: the op is the attention call
            swapped.attention = slower(sdpa_attention)
        return swapped
'''


def speed_matrix(out: Path) -> Path:
    """The default matrix without its drift rows."""
    text = (ROOT / "benchmarks" / "default.toml").read_text(encoding="utf-8")
    path = out / "speed.toml"
    path.write_text(text + '\n[[exclude]]\nworkload = "drift"\n', encoding="utf-8")
    return path


def copy_side(out: Path, plant: float) -> Path:
    """A copy of the package (both sides are copies, so neither is the installed one),
    whose `sdpa` variant is `plant` slower when plant > 0."""
    side = out / f"side-{plant:g}"
    shutil.copytree(ROOT / "infermatrix", side / "infermatrix", ignore=shutil.ignore_patterns("__pycache__"))
    if not plant:
        return side
    sdpa = side / "infermatrix" / "variants" / "sdpa.py"
    text = sdpa.read_text(encoding="utf-8")
    old = "\n    def apply(self, model: Transformer) -> Transformer:\n        return with_attention(model, sdpa_attention)\n"
    if old not in text:
        sys.exit(f"cannot plant: {sdpa} changed shape")
    sdpa.write_text(text.replace(old, _PLANT.format(plant=plant)), encoding="utf-8")
    return side


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--plant", type=float, default=0.0, help="extra work of the sdpa variant (0: A/A)")
    parser.add_argument("--fail", action="append", help="rules passed to ab (default: its defaults)")
    parser.add_argument("--wall", action="store_true", help="also time one `infermatrix run` of the matrix")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=False)
    matrix = speed_matrix(out)
    base = copy_side(out, 0.0)
    new = copy_side(out, args.plant) if args.plant else base
    cli = [sys.executable, "-m", "infermatrix.cli"]
    rules = [x for rule in args.fail or [] for x in ("--fail", rule)]
    rows = []
    for rep in range(1, args.reps + 1):
        folder = out / f"rep{rep}"
        wall = run([*cli, "ab", str(base), str(new), str(matrix), "--out", str(folder), *rules])
        result = json.loads((folder / "ab.json").read_text(encoding="utf-8"))
        flagged = {c["case_id"] for c in result["paired"] if c["verdict"] == "regression"}
        planted = {c["case_id"] for c in result["paired"] if PLANTED in c["case_id"].split("/")[1].split("+")}
        inconclusive = {c["case_id"] for c in result["paired"] if c["verdict"] == "inconclusive"}
        rows.append({"rep": rep, "wall_s": wall, "planted": sorted(planted), "flagged": sorted(flagged),
                     "caught": sorted(planted & flagged) if args.plant else [],
                     "false_alarms": sorted(flagged - planted) if args.plant else sorted(flagged),
                     "inconclusive": sorted(inconclusive), "failures": result["failures"]})
        r = rows[-1]
        print(f"rep {rep}: {wall:.0f} s; {len(r['caught'])}/{len(planted) if args.plant else 0} planted caught, "
              f"{len(r['false_alarms'])} false alarms, {len(r['inconclusive'])} inconclusive checks, "
              f"{'PASS' if result['passed'] else 'FAIL'}", flush=True)
    summary = {"plant": args.plant, "reps": rows}
    if args.wall:
        summary["single_run_wall_s"] = run([*cli, "run", str(matrix), "--out", str(out / "single"), "-q"])
        print(f"one `infermatrix run` of the matrix: {summary['single_run_wall_s']:.0f} s; "
              f"ab: {rows[0]['wall_s']:.0f} s ({rows[0]['wall_s'] / summary['single_run_wall_s']:.2f}x)")
    if args.plant:
        cases = {cid for r in rows for cid in r["planted"]}
        caught = sum(1 for r in rows if set(r["caught"]) >= cases) if cases else 0
        print(f"planted {args.plant:.0%}: every planted case caught in {caught}/{len(rows)} reps; "
              f"reps with a false alarm: {sum(1 for r in rows if r['false_alarms'])}")
    else:
        print(f"A/A: reps with a failure: {sum(1 for r in rows if r['failures'])}/{len(rows)}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
