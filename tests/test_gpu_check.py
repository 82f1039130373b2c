"""tools/gpu_check.py's dry run: the whole script at tiny sizes on this machine's CPU, so that it cannot rot while no
GPU is at hand (a GPU is lent to this project only now and then, for minutes)."""
import json
import math
import subprocess
import sys

import torch

from conftest import ROOT
from tools import gpu_check


def gpu_check_run(*args):
    return subprocess.run([sys.executable, "-m", "tools.gpu_check", "--tiny", "--device", "cpu", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_dry_run_records_every_cuda_test_and_every_case_against_transformers(tmp_path):
    proc = gpu_check_run("--out", tmp_path / "gpu.json", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert {"device", "torch", "cuda", "transformers"} <= report["machine"].keys()
    assert report["command"].startswith("python -m tools.gpu_check --tiny")

    tests = report["tests"]
    names = [t["name"] for t in tests["results"]]
    assert len(names) >= 30 and any(n.startswith("test_a_killed_gpu_run_resumes_exactly") for n in names)
    # without CUDA every test is recorded as skipped with the reason, none as passed
    expected = "passed" if torch.cuda.is_available() else "skipped"
    assert all(t["outcome"] == expected for t in tests["results"]), tests["results"]
    if expected == "skipped":
        assert all("needs CUDA" in t["message"] for t in tests["results"])
        assert tests["counts"] == {"passed": 0, "failed": 0, "error": 0, "skipped": len(names)}

    bench = report["bench"]
    assert bench["same_logits"]["tiny"]["max_abs_diff"] <= 1e-4  # both sides compute the same function
    plan = [(r["shape"], r["case"], r["tokens"], r["new_tokens"]) for r in bench["results"]]
    assert plan == gpu_check.plan(gpu_check.TINY_SHAPES, gpu_check.TINY_CASES)
    for r in bench["results"]:
        for side in ("ours", "hf"):
            keys = ["decode_tokens_per_s", "prefill_s"] if r["case"] == "decode" else ["tokens_per_s", "mfu"]
            assert all(math.isfinite(r[side][k]) and r[side][k] > 0 for k in keys), (r["case"], side, r[side])
    assert "ours tok/s" in proc.stdout and "tests: 0 passed" in proc.stdout


def test_no_case_starts_once_the_budget_is_spent(tmp_path):
    proc = gpu_check_run("--out", tmp_path / "gpu.json", "--no-tests", "--budget", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())["bench"]["results"]
    assert results and all(r["skipped"] == "the --budget of 0 s was spent" for r in results)
    assert "skipped: the --budget of 0 s was spent" in proc.stdout
