"""Run the fault catalogue (tests/test_faults.py) against another checkout of sftscope.

Used once to count how many of the catalogue's bad inputs an older version handled badly
(anything but exit status 2 with one line on stderr and no traceback). Flags renamed since are
translated; cases whose option did not exist then are left out of the count.

    python bench/faults_before.py --src /path/to/old/checkout/src [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))
sys.path.insert(0, str(HERE / "src"))

# new flag -> old flag, per command ("" = the option did not exist)
RENAMES = {
    "*": {"--limit": {"analyze": "--n-pooled", "probe": "--n", "swap": "--n",
                      "suggest": "--n-samples"},
          "--entropy-alpha": "--alpha", "--figure-formats": "--formats",
          "--task": {"sweep": "--eval"}, "--eval-limit": "--limit", "--eval-shots": "--shots",
          "--eval-max-new-tokens": "--max-new-tokens", "--no-baseline": "--no-baseline",
          "--bootstrap": {"sweep": "--n-boot"},
          "--entropy-normalisations": "", "--checkpoint-every": "", "--skip-bad-records": "",
          "--overwrite": "", "--allow-mixed-pair": "", "--rescore": "", "--num-fewshot": "",
          "--device-map": {"weights": ""}, "--cache-dir": {"probe": "", "swap": ""},
          "--config": {c: "" for c in ("analyze", "weights", "probe", "swap", "tune", "eval",
                                       "sweep", "suggest", "report", "demo")}},
}


def translate(argv: list[str]) -> list[str] | None:
    cmd = argv[0]
    out = [cmd]
    for a in argv[1:]:
        if a.startswith("--"):
            rule = RENAMES["*"].get(a)
            if isinstance(rule, dict):
                rule = rule.get(cmd, a)
            if rule == "":
                return None
            out.append(rule or a)
        else:
            out.append(a)
    return out


def build_inputs(root: Path) -> dict[str, str]:
    """The same inputs as the catalogue's ``paths`` fixture, built without pytest."""
    from sftscope.load.tiny import save_tiny_model, train_tokenizer

    tok = train_tokenizer()
    made: dict[tuple, Path] = {}

    def model_dir(family: str = "llama", seed: int = 0, **cfg) -> Path:
        key = (family, seed, tuple(sorted(cfg.items())))
        if key not in made:
            out = root / f"{family}-{seed}-{len(made)}"
            made[key] = save_tiny_model(out, family, seed=seed, tokenizer=tok, **cfg)
        return made[key]

    import test_faults as T

    return T.make_inputs(root, model_dir)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="src/ folder of the checkout to test")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="bench/results/faults_before.json")
    args = ap.parse_args()
    import test_faults as T

    root = Path(tempfile.mkdtemp(prefix="faults-before-"))
    paths = build_inputs(root)
    finished = str(root / "no-finished-run")
    results = []

    def one(i_case):
        i, (cmd, over, extra, needle) = i_case
        tmp = root / f"case{i}"
        tmp.mkdir()
        fmt = {**paths, "cache": str(tmp / "cache"), "finished": finished, "cmd": cmd}
        extra = [a.replace("{root}/cfg_", str(Path(paths["root"])) + "/cfg_") for a in extra]
        argv = translate(T.argv_of(cmd, over, extra, fmt, str(tmp / "run")))
        if argv is None:
            return {"case": i, "cmd": cmd, "needle": needle, "skipped": True}
        env = {**os.environ, "PYTHONPATH": args.src, "SFTSCOPE_NO_PROGRESS": "1",
               "HF_HUB_OFFLINE": "1", "SFTSCOPE_CACHE": str(tmp / "cache"),
               "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-m", "sftscope", *argv], capture_output=True,
                           text=True, env=env, timeout=600, cwd=tmp)
        lines = p.stderr.strip().splitlines()
        ok = (p.returncode == 2 and "Traceback" not in p.stderr
              and sum(1 for ln in lines if ln.startswith("sftscope: error")) == 1
              and len([ln for ln in lines if ln.strip()]) == 1)
        return {"case": i, "cmd": cmd, "needle": needle, "rc": p.returncode, "ok": ok,
                "traceback": "Traceback" in p.stderr,
                "last": lines[-1][:200] if lines else ""}

    with ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(one, enumerate(T.CASES)):
            results.append(r)
            print(json.dumps(r), flush=True)
    counted = [r for r in results if not r.get("skipped")]
    bad = [r for r in counted if not r["ok"]]
    summary = {"cases": len(results), "comparable": len(counted), "failed_before": len(bad),
               "exit_0": sum(r["rc"] == 0 for r in bad),
               "traceback": sum(r["traceback"] for r in bad),
               "by_command": {c: sum(1 for r in bad if r["cmd"] == c)
                              for c in sorted({r["cmd"] for r in counted})}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
