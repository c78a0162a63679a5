"""Side by side in one run: idle-path cold start (`serve-shard --verify cached`, spawn to first
answered Gather, 1 GB shard) of another source tree vs this one, interleaved run by run so both
see the same machine load; plus `-X importtime` of each tree's serve path.

    git archive <commit> | tar -x -C /tmp/base
    python benchmarks/cold_start_compare.py /tmp/base [--runs 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import cold_start as cs  # noqa: E402

from ultramem_dist.reliability.synthetic import make_synthetic_store  # noqa: E402

HERE = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path, help="the other source tree (e.g. a git archive)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "benchmarks/results/cold_start_compare.json")
    args = ap.parse_args()
    trees = {"base": args.base.resolve(), "this": HERE}
    os.chdir(tempfile.gettempdir())  # `python -c` would import the package from the cwd
    with tempfile.TemporaryDirectory(prefix="ultramem-cold-") as tmp:
        work = Path(tmp)
        store = make_synthetic_store(work / "store", shards=1, tables={"row": ("row", False)},
                                     n_rows=cs.ROWS, dv=cs.DV, d_model=8, topm=2)  # fmt: skip
        load0 = open("/proc/loadavg").read().split()[:3]
        envs = {k: dict(os.environ, ULTRAMEM_VERIFY_CACHE=str(work / "vc"),
                        PYTHONPATH=f"{v}{os.pathsep}{v / 'operators'}")
                for k, v in trees.items()}  # fmt: skip
        for k in trees:
            cs.cold_start(store, "cached", envs[k], work)  # the record, a warm page cache
        runs: dict[str, list[float]] = {k: [] for k in trees}
        for _ in range(args.runs):
            for k in trees:
                runs[k].append(cs.cold_start(store, "cached", envs[k], work))
        out = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "trees": {k: str(v) for k, v in trees.items()},
            "load_before_after": [load0, open("/proc/loadavg").read().split()[:3]],
            "cached_cold_start_s": {
                k: {"median": statistics.median(v), "runs": v} for k, v in runs.items()
            },
            "ratio_base_over_this": statistics.median(runs["base"])
            / statistics.median(runs["this"]),
            "import_s": {k: cs.import_profile(envs[k]) for k in trees},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
