"""The standard synthetic benchmark: does the model learn the trace gases? One command.

Synthesizes a fixed data set (64 granules of 64 x 64 pixels x 1028 channels, seed 0, tiles of
16 x 16: 720 training / 304 validation tiles from 45 / 19 granules), trains the L2-supervised
model (the config's loss.l2_weights) and the unsupervised one (all weights 0) on it with the
same seed and steps (one process each), exports and evaluates both against the synthetic
truth (``train.evaluate``: head, probe protocol, ridge baseline, operational L2), and prints
one table plus how it was measured. Data are reused when OUT/data/shards exists (give the
same --xsec-dir as when they were made). The model's slant-column fit (model.slant_columns)
uses the cross-sections the granules were synthesised with: model.xsec_dir is set to
--xsec-dir, or 'analytic' without it (an override after it wins).

    python scripts/benchmark.py runs/benchmark --xsec-dir ../shared/reference_data
    python scripts/benchmark.py runs/bench_parity \\
        --config configs/training/benchmark_research_parity.yaml --xsec-dir ...

The goal (issue "make the model learn the trace gases"): on validation cells against the
truth, the supervised head at least matches the ridge baseline for every product, R^2 >= 0.9
for O3TOT and CLDO4, >= 0.7 for NO2. Written to OUT: benchmark.md, benchmark.json (every
number, timings), and the runs (supervised/, unsupervised/, each with model/ and eval/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from research_question import pipeline  # noqa: E402

from data_prep.tempo import L2_ORDER  # noqa: E402
from data_prep.util import HelpFormatter  # noqa: E402

# the fixed data set
DATA = {"granules": 64, "mirror_steps": 64, "xtrack": 64, "channels": 1028, "tile_size": 16,
        "seed": 0, "val_fraction": 0.3}
# a few seconds, for the test of this script (not a benchmark)
SMOKE = {"granules": 4, "mirror_steps": 16, "xtrack": 32, "channels": 64, "tile_size": 16,
         "seed": 0, "val_fraction": 0.3}
GOAL = {"O3TOT": 0.9, "CLDO4": 0.9, "NO2": 0.7}


def _g(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def table(sup: dict, uns: dict) -> tuple[str, dict]:
    """The benchmark table (markdown) and its numbers: R^2 on validation, per product."""
    rows = [
        ("supervised head vs truth", "cell", lambda p: _get(sup, "head_vs_truth", "cell", p, "r2")),
        ("supervised head vs L2", "cell", lambda p: _get(sup, "head", "cell", p, "r2")),
        ("linear probe, supervised latent vs L2", "cell",
         lambda p: _get(sup, "probes", "linear", p, "r2")),
        ("linear probe, unsupervised latent vs L2", "cell",
         lambda p: _get(uns, "probes", "linear", p, "r2")),
        ("MLP probe, supervised latent vs L2", "cell",
         lambda p: _get(sup, "probes", "mlp", p, "r2")),
        ("MLP probe, unsupervised latent vs L2", "cell",
         lambda p: _get(uns, "probes", "mlp", p, "r2")),
        ("ridge (spectrum + geometry) vs truth", "cell",
         lambda p: _get(sup, "ridge", p, "truth_cell", "r2")),
        ("ridge (spectrum + geometry) vs L2", "pixel", lambda p: _get(sup, "ridge", p, "r2")),
        ("operational L2 vs truth", "pixel",
         lambda p: _get(sup, "l2_vs_truth", "pixel", p, "r2")),
    ]
    lines = ["| R^2, validation | level | " + " | ".join(L2_ORDER) + " |",
             "|---|---|" + "---|" * len(L2_ORDER)]
    numbers: dict = {}
    for name, level, get in rows:
        vals = {p: get(p) for p in L2_ORDER}
        numbers[name] = vals
        lines.append(f"| {name} | {level} | " + " | ".join(_g(vals[p]) for p in L2_ORDER) + " |")
    head = numbers["supervised head vs truth"]
    ridge = numbers["ridge (spectrum + geometry) vs truth"]
    checks = {}
    for p in L2_ORDER:
        h, r = head[p], ridge[p]
        ok_ridge = h is not None and r is not None and h >= r
        checks[p] = {"head": h, "ridge": r, "matches_ridge": ok_ridge,
                     "target": GOAL.get(p), "meets_target": (h is not None and h >= GOAL[p])
                     if p in GOAL else None}
    goal = ["", "Goal (validation cells vs truth): head >= ridge for every product; "
            + ", ".join(f"{p} >= {v}" for p, v in GOAL.items()) + ".", ""]
    for p, c in checks.items():
        t = f"; target {c['target']}: {'met' if c['meets_target'] else 'not met'}" \
            if c["target"] is not None else ""
        goal.append(f"- {p}: head {_g(c['head'])} vs ridge {_g(c['ridge'])}: "
                    f"{'matches' if c['matches_ridge'] else 'below'}{t}")
    return "\n".join(lines + goal), {"r2": numbers, "goal": checks}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python scripts/benchmark.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("out", help="folder for data, runs and the table")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "training",
                                                    "benchmark.yaml"),
                   help="training config of both runs (its loss.l2_weights = supervised)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of each run; none given: the config's train.steps")
    p.add_argument("--xsec-dir", default=None,
                   help="real cross-sections and solar spectrum for the synthesis (the "
                        "shared reference data); built-in analytic shapes otherwise")
    p.add_argument("--mlp-epochs", type=int, default=10, help="MLP probe epochs")
    p.add_argument("--max-cells", type=int, default=6000,
                   help="training cells the probes are fit on (train.evaluate --max-cells)")
    p.add_argument("--smoke", action="store_true",
                   help="a few-second run on a tiny data set (tests the command, measures "
                        "nothing)")
    p.add_argument("overrides", nargs="*", help="section.key=value for both runs")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from train.config import load_config

    data = SMOKE if a.smoke else DATA
    # the model's slant-column fit uses the cross-sections the granules were synthesised with
    a.overrides = [f"model.xsec_dir={os.path.abspath(a.xsec_dir) if a.xsec_dir else 'analytic'}",
                   *a.overrides]
    cfg = load_config(a.config, a.overrides)
    steps = a.steps or cfg.train.steps
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    t0 = time.perf_counter()
    results, seconds, weights = pipeline(
        a.out, a.config, steps, data["granules"], data["mirror_steps"], data["xtrack"],
        data["channels"], data["tile_size"], data["seed"], a.mlp_epochs, a.overrides,
        a.xsec_dir, data["val_fraction"], max_samples_per_shard=64,
        eval_args=("--max-cells", str(a.max_cells)))
    total = time.perf_counter() - t0
    sup, uns = results["supervised"], results["unsupervised"]
    md_table, numbers = table(sup, uns)
    how = (f"Measured by `python scripts/benchmark.py {' '.join(argv or sys.argv[1:])}`: "
           f"{data['granules']} synthetic granules {data['mirror_steps']} x {data['xtrack']} x "
           f"{data['channels']} (seed {data['seed']}, spectra "
           f"{'from ' + a.xsec_dir if a.xsec_dir else 'analytic'}), tiles "
           f"{data['tile_size']} x {data['tile_size']}, {sup['tiles']['train']} train / "
           f"{sup['tiles']['val']} val tiles; config {os.path.relpath(a.config, ROOT)} "
           f"(loss.l2_weights={weights}, model.geometry={cfg.model.geometry}, "
           f"model.slant_columns={cfg.model.slant_columns}), {steps} steps "
           f"of batch {cfg.data.batch_size} per run, one process, "
           f"OMP_NUM_THREADS={threads}, {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}); "
           f"unsupervised = the same config with all L2 weights 0. Cells are "
           f"{sup['latent_factor']} x {sup['latent_factor']} pixels. Probes: latent means per "
           f"cell, fit on {a.max_cells} training cells (MLP {a.mlp_epochs} epochs); ridge: per pixel from spectrum + geometry, fit on "
           f"training pixels where the L2 is valid, applied to validation cell means.")
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    md = ("\n".join([how, "", md_table, "", f"Wall time: {total:.0f} s in all ({timing})."])
          + "\n")
    out = os.path.abspath(a.out)
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump({"data": data, "config": os.path.abspath(a.config), "steps": steps,
                   "overrides": a.overrides, "l2_weights": weights, "seconds": seconds,
                   "total_seconds": total, "omp_num_threads": threads,
                   "cpus": os.cpu_count()} | numbers, f, indent=1)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
