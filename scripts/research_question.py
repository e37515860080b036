"""Does L2 supervision change what the latent knows? One command, CPU scale.

Synthesizes TEMPO granules with known truth, makes shards, trains the L2-supervised model
(the config's loss.l2_weights) and the unsupervised one (all weights 0) on the same data
with the same seed and steps (one process each), exports both, evaluates both with
``train.evaluate`` (head, probe protocol, ridge baseline, L2 vs truth) and prints them side
by side. Everything lands in OUT:

    data/granules, data/shards        the synthetic data (reused when present)
    supervised/, unsupervised/        run folders; model/ and eval/ inside each
    comparison.json, comparison.md    the side-by-side table

    python scripts/research_question.py runs/research                 # a few minutes on CPU
    python scripts/research_question.py runs/research --steps 20 train.val_every=0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_prep.tempo import L2_ORDER  # noqa: E402
from data_prep.util import HelpFormatter  # noqa: E402


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, cwd=ROOT, env=env)
    if p.returncode != 0:
        sys.exit(f"error: command failed with exit code {p.returncode}: {' '.join(cmd)}")


def _g(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def compare(sup: dict, uns: dict) -> tuple[str, dict]:
    """Side-by-side R^2 table (markdown) and its numbers."""
    rows = [("head vs L2, cell", lambda r, p: r["head"]["cell"][p]["r2"]),
            ("head vs truth, pixel", lambda r, p: r.get("head_vs_truth", {})
             .get("pixel", {}).get(p, {}).get("r2")),
            ("linear probe (model space)", lambda r, p: r["probes"]["linear"][p]
             ["r2_model_space"]),
            ("MLP probe (model space)", lambda r, p: r["probes"]["mlp"][p]["r2_model_space"]),
            ("linear probe (physical)", lambda r, p: r["probes"]["linear"][p]["r2"]),
            ("MLP probe (physical)", lambda r, p: r["probes"]["mlp"][p]["r2"])]
    baselines = [("ridge spectrum+geometry vs L2, pixel", lambda r, p: r["ridge"][p]["r2"]),
                 ("operational L2 vs truth, pixel", lambda r, p: r.get("l2_vs_truth", {})
                  .get("pixel", {}).get(p, {}).get("r2"))]
    lines = ["| R^2 (validation) | " + " | ".join(f"{p} sup | {p} unsup" for p in L2_ORDER)
             + " |", "|---|" + "---|" * (2 * len(L2_ORDER))]
    numbers: dict = {}
    for name, get in rows:
        cells = []
        for p in L2_ORDER:
            a, b = get(sup, p), get(uns, p)
            numbers.setdefault(name, {})[p] = {"supervised": a, "unsupervised": b}
            cells += [_g(a), _g(b)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| baseline R^2 (same data) | " + " | ".join(L2_ORDER) + " |",
              "|---|" + "---|" * len(L2_ORDER)]
    for name, get in baselines:
        numbers[name] = {p: get(sup, p) for p in L2_ORDER}
        lines.append(f"| {name} | " + " | ".join(_g(get(sup, p)) for p in L2_ORDER) + " |")
    return "\n".join(lines), numbers


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python scripts/research_question.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("out", help="folder for data, runs, models and the comparison")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "training", "demo.yaml"),
                   help="training config of both runs (its loss.l2_weights = supervised)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each run")
    p.add_argument("--granules", type=int, default=16)
    p.add_argument("--mirror-steps", type=int, default=48)
    p.add_argument("--xtrack", type=int, default=64)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--tile-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    p.add_argument("--mlp-epochs", type=int, default=100, help="MLP probe epochs")
    p.add_argument("--xsec-dir", default=None, help="real cross-sections for the synthesis "
                                                    "(data_prep.synthesize --xsec-dir)")
    p.add_argument("overrides", nargs="*", help="section.key=value for both runs")
    return p.parse_intermixed_args(argv)


def pipeline(out: str, config: str, steps: int, granules: int, mirror_steps: int, xtrack: int,
             channels: int, tile_size: int, seed: int, mlp_epochs: int, overrides: list[str],
             xsec_dir: str | None = None, val_fraction: float | None = None,
             max_samples_per_shard: int = 24, eval_args: tuple = ()
             ) -> tuple[dict, dict, list]:
    """Synthesize (reused when OUT/data/shards exists) -> shards -> train supervised and
    unsupervised -> export -> evaluate. Returns ({"supervised"|"unsupervised":
    evaluation.json}, {phase: wall seconds}, the supervised L2 weights)."""
    py = sys.executable
    out = os.path.abspath(out)
    granules_dir = os.path.join(out, "data", "granules")
    shards = os.path.join(out, "data", "shards")
    seconds: dict = {}
    if not os.path.exists(os.path.join(shards, "sizes.json")):
        t0 = time.perf_counter()
        run([py, "-m", "data_prep.synthesize", granules_dir, "--granules", str(granules),
             "--mirror-steps", str(mirror_steps), "--xtrack", str(xtrack), "--channels",
             str(channels), "--seed", str(seed)]
            + (["--xsec-dir", xsec_dir] if xsec_dir else []))
        seconds["synthesize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run([py, "-m", "data_prep.make_shards", granules_dir, shards, "--tile-size",
             str(tile_size), "--max-samples-per-shard", str(max_samples_per_shard), "--quiet"]
            + (["--val-fraction", str(val_fraction)] if val_fraction is not None else []))
        seconds["make_shards"] = time.perf_counter() - t0
    from train.config import load_config

    weights = load_config(config, overrides).loss.l2_weights
    if not any(w > 0 for w in weights):
        sys.exit(f"error: {config} has loss.l2_weights={weights}: nothing to compare; give a "
                 "supervised config")
    results = {}
    for name, w in (("supervised", weights), ("unsupervised", [0.0] * len(weights))):
        run_dir = os.path.join(out, name)
        t0 = time.perf_counter()
        run([py, "train/main.py", "--config", config, f"data.shards={shards}",
             f"train.output_dir={run_dir}", f"train.steps={steps}", f"train.seed={seed}",
             f"data.seed={seed}", f"model.in_channels={channels}",
             f"model.tile_size={tile_size}", "train.progress=false",
             f"loss.l2_weights=[{','.join(str(x) for x in w)}]", *overrides])
        seconds[f"train_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = os.path.join(run_dir, "model")
        run([py, "-m", "train.export", run_dir, model, "--overwrite"])
        ev = os.path.join(run_dir, "eval")
        run([py, "-m", "train.evaluate", model, shards, "--truth",
             os.path.join(granules_dir, "truth"), "--out", ev, "--quiet", "--mlp-epochs",
             str(mlp_epochs), *eval_args])
        seconds[f"evaluate_{name}"] = time.perf_counter() - t0
        results[name] = json.load(open(os.path.join(ev, "evaluation.json")))
    return results, seconds, weights


def main(argv=None) -> int:
    a = parse_args(argv)
    results, _, weights = pipeline(a.out, a.config, a.steps, a.granules, a.mirror_steps,
                                   a.xtrack, a.channels, a.tile_size, a.seed, a.mlp_epochs,
                                   a.overrides, a.xsec_dir)
    out = os.path.abspath(a.out)
    table, numbers = compare(results["supervised"], results["unsupervised"])
    head = (f"L2-supervised (loss.l2_weights={weights}) vs unsupervised, {a.steps} steps "
            f"each, same data ({results['supervised']['tiles']['train']} train / "
            f"{results['supervised']['tiles']['val']} val tiles) and seed; R^2 on validation")
    md = head + "\n\n" + table + "\n"
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump({"steps": a.steps, "l2_weights": weights, "r2": numbers}, f, indent=1)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
