"""The GPU check: the CUDA tests, then speed and memory against transformers on the same random weights, as one
command that fits a short GPU lease (about 5 minutes on one H200; --budget bounds it).

    python -m tools.gpu_check --out docs/speed/gpu_check.json    # on a GPU; prints a summary, writes everything
    python -m tools.gpu_check --tiny --device cpu --out x.json   # the dry run the test suite makes (tiny sizes, CPU)

1. tests/test_cuda.py under pytest, each test's outcome, time and message recorded (where CUDA is absent every one
   is skipped, and recorded as skipped, never as passed).
2. The benchmark: our Llama against transformers' LlamaForCausalLM (SDPA attention) on the same random weights of
   real shapes (speed does not depend on the values): SmolLM2-135M's and Llama 3.2 1B's, both with YaRN s = 16 over
   L = 8192, so 128k tokens lie inside s·L. The sides run one after the other in this process, with nothing else on
   the GPU, so each side's peak memory (torch.cuda.max_memory_allocated, weights included) is its own.
   - score: the perplexity path, forward + mean loss under inference_mode in bf16 (ours: model.nll; HF: the loss of
     model(input_ids, labels), what users write), at 8k, 32k and 128k tokens;
   - train: forward, backward and a fused AdamW step over fp32 master weights, computing in bf16 (ours: train.py's
     FSDP2 MixedPrecisionPolicy; HF: torch.autocast, as its Trainer's bf16=True), at 8k with activation checkpointing
     off on both sides and at 32k with it on on both (train.py's default turns it on from 4096 tokens);
   - decode: greedy decoding of 128 tokens after a 2048-token prompt through the KV cache (ours: Llama.generate;
     HF: generate with its default cache).
   Each case: one warm-up run, then the median of --repeats timed runs, the GPU synchronized around each. MFU is
   model FLOPs (common.model_flops; attention counts only the causal half of the score matrix, as the FlashAttention
   papers count it; a training step is 3 forward passes, recomputation not counted) per second, over the measured
   bf16 matmul peak (8192 x 8192 x 8192) and over the H200's datasheet dense bf16 peak, 989 TFLOP/s.
A case that runs out of memory is recorded as such. Cases start only while --budget seconds have not passed since
the start; the JSON is rewritten after each, so a run cut short keeps what it measured.
"""
import contextlib
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy

from common import (ArgumentParser, check_output_file, cli, clock, compile_blocks, matmul_peak, model_flops, number, shard,
                    write_json)
from convert_llama import HF_LAYERS, HF_NAMES, hf_rope, ours_to
from model import Llama, LlamaConfig
from tools.bench import compute_context, decode_case, random_tokens, score_case, train_case

ROOT = Path(__file__).resolve().parents[1]
H200_BF16_FLOPS = 989e12  # dense bf16, the vendor's datasheet (H100 and H200 SXM)
YARN_16 = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192}
SHAPES = {  # HF's config.json of each (SmolLM2-135M; Llama 3.2 1B), with YaRN s = 16 over L = 8192
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                     rope_theta=500000.0, tie_word_embeddings=True),
}
CASES = {"score": [8192, 32768, 131072], "train": [8192, 32768], "decode": [(2048, 128)]}
TINY_SHAPES = {"tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=320,
                            rope_theta=10000.0, tie_word_embeddings=True)}
TINY_YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32}
TINY_CASES = {"score": [64, 256], "train": [64, 256], "decode": [(32, 8)]}
AC_FROM = 16384  # activation checkpointing on from this length, on both sides (on at 32k, off at 8k)


# ----------------------------------------------------------------------------- 1. the CUDA tests

def run_tests(timeout, device):
    """tests/test_cuda.py under pytest in a fresh process: [{name, outcome, seconds, message}] from its JUnit XML.
    On the GPU machine, pytest-xdist (if present) runs them on 4 processes."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
               f"--junitxml={xml}"]
        with contextlib.suppress(ImportError):
            if device.type == "cuda":
                import xdist  # noqa: F401
                cmd += ["-n", "4"]
        start = time.perf_counter()
        # in a process group of its own, so that a hung test's torchrun processes are stopped with it
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            tail = proc.communicate(timeout=timeout)[0][-4000:]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            tail = f"pytest did not finish in {timeout} s and was stopped: " + proc.communicate()[0][-4000:]
        results = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for kind in ("failure", "error", "skipped"):
                    node = case.find(kind)
                    if node is not None:
                        outcome = {"failure": "failed"}.get(kind, kind)
                        message = (node.get("message") or node.text or "")[:1500]
                results.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                                "message": message})
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("passed", "failed", "error", "skipped")}
    return {"command": " ".join(cmd[1:]), "seconds": time.perf_counter() - start, "counts": counts,
            "results": results, "output_tail": tail}


# ----------------------------------------------------------------------------- 2. the benchmark

def configs(shape, yarn):
    """Our LlamaConfig and transformers' LlamaConfig of one shape, with the same RoPE."""
    from transformers import LlamaConfig as HFConfig

    s = SHAPES.get(shape) or TINY_SHAPES[shape]
    ours = LlamaConfig(**s, max_position_embeddings=round(yarn["factor"] * yarn["original_max_position_embeddings"]),
                       rope_scaling=yarn)
    theta, scaling, mpe = hf_rope(ours)
    theirs = HFConfig(vocab_size=s["vocab_size"], hidden_size=s["dim"], intermediate_size=s["hidden_dim"],
                      num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                      num_key_value_heads=s["n_kv_heads"], head_dim=ours.head_dim, rms_norm_eps=ours.norm_eps,
                      max_position_embeddings=mpe, rope_parameters={"rope_theta": theta, **scaling},
                      tie_word_embeddings=s["tie_word_embeddings"], attn_implementation="sdpa")
    return ours, theirs


def random_weights(config, seed=0):
    """fp32 weights on the CPU, in our names: N(0, 0.02), norms near 1 (as the tests' tiny models)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Llama(config)
    state = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape)
        state[name] = t.uniform_(0.5, 1.5) if "norm" in name else t.normal_(0, 0.02)
    return state


def load_side(side, cfgs, state, device, dtype):
    """One side's model on the device in dtype (fp32: the master weights of training), from the same weights."""
    ours_cfg, hf_cfg = cfgs
    if side == "ours":
        with torch.device("meta"):
            model = Llama(ours_cfg)
        model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, assign=True)
        return model.eval()
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg).to(dtype)
    missing, unexpected = model.load_state_dict({ours_to(k, HF_NAMES, HF_LAYERS): v for k, v in state.items()},
                                                strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is the tied embedding
        raise ValueError(f"the HF model's weights do not match ours: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def sharded_for_training(cfgs, state, device, activation_checkpointing, compile):
    """Ours as train.py builds it (build_model): fp32 master weights sharded by FSDP2 (one process here), computing
    in bf16 with the gradients reduced in fp32."""
    with torch.device("meta"):
        model = Llama(cfgs[0])
    model.activation_checkpointing = activation_checkpointing
    shard(model, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                      cast_forward_inputs=False), compile=compile)
    model.to_empty(device=device)
    # a copy: set_model_state_dict replaces the values of the dict it is given with the shards it made
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def same_logits(cfgs, state, device, tokens=512):
    """Max abs difference of the two sides' fp32 logits over 512 tokens: both compute the same function (the
    figures compare like with like). Recorded, not asserted: the tests assert it."""
    try:
        x = random_tokens(cfgs[0].vocab_size, tokens, device)
        with torch.no_grad():
            ours = load_side("ours", cfgs, state, device, torch.float32)(x)
            theirs = load_side("hf", cfgs, state, device, torch.float32)(x).logits
        return {"tokens": tokens, "max_abs_diff": (ours - theirs).abs().max().item(),
                "max_abs_logit": ours.abs().max().item()}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        ours = theirs = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def side_model(side, case, tokens, cfgs, state, device, compile):
    """The model one side runs a case with; with compile, ours has its blocks torch.compiled (score and train, as
    eval_ppl.py and train.py --compile do; decoding stays eager), HF's stays eager."""
    if case != "train":
        model = load_side(side, cfgs, state, device, torch.bfloat16)
        if compile and side == "ours" and case == "score":
            compile_blocks(model)
        return model
    if side == "ours":
        return sharded_for_training(cfgs, state, device, tokens >= AC_FROM, compile)
    model = load_side(side, cfgs, state, device, torch.float32)
    if tokens >= AC_FROM:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def measure(side, case, tokens, new_tokens, cfgs, state, device, args):
    """One side of one case: {seconds or prefill/decode figures, peak_memory_bytes, runs}, or {error}; with
    --profile, where the GPU time of one more run went (gpu_profile)."""
    model, repeats = None, args.repeats
    try:
        model = side_model(side, case, tokens, cfgs, state, device, args.compile)
        context = compute_context(side, "bfloat16", device, case == "train")
        x = random_tokens(cfgs[0].vocab_size, tokens + 1, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if case == "decode":
            run = decode_case(model, side, context, device)
            runs = []
            for _ in range(repeats + 1):  # the first is the warm-up
                t0, steps = clock(device), run(x[:, :tokens], new_tokens)
                runs.append({"prefill_s": steps[0] - t0,
                             "decode_s_per_token": (steps[-1] - steps[0]) / (len(steps) - 1)})
            runs = runs[1:]
            out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        else:
            run = (score_case if case == "score" else train_case)(model, side, context)
            run(x)
            runs = []
            for _ in range(repeats):
                t0 = clock(device)
                run(x)
                runs.append(clock(device) - t0)
            out = {"seconds": statistics.median(runs)}
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        if args.profile:
            out["profile"] = gpu_profile(lambda: run(x[:, :tokens], new_tokens) if case == "decode" else run(x),
                                         device)
        return {**out, "runs": runs}
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}
    except Exception as e:  # recorded, and the other cases go on: the lease is too short to stop at the first
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.compile:  # each case compiles afresh, as in its own process: no case meets dynamo's limit of 8
            torch._dynamo.reset()  # compiled variants per function (one run here met it, and then failed)


def gpu_profile(run, device):
    """One run under torch.profiler: the share of its wall time the GPU was busy (kernel time over wall time: far
    below 1, the GPU waits for the CPU to launch work) and the kernels that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = clock(device)
        run()
        wall = clock(device) - start
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:10]
    return {"wall_s": wall, "gpu_busy_s": busy, "gpu_busy_share": busy / wall,
            "top_kernels": [{"name": e.key[:120], "seconds": e.self_device_time_total / 1e6, "calls": e.count}
                            for e in top]}


def figures(case, tokens, new_tokens, m, cfg, peak):
    """tokens/s and MFU (over the measured peak and the datasheet's) of one side's median timings."""
    if "error" in m:
        return m
    if case == "decode":
        step = model_flops(cfg, 1, past=tokens + new_tokens // 2, head_tokens=1)  # a step at the average context
        return {**m, "prefill_tokens_per_s": tokens / m["prefill_s"], "decode_tokens_per_s": 1 / m["decode_s_per_token"],
                "decode_mfu": step / m["decode_s_per_token"] / peak}
    flops = model_flops(cfg, tokens) * (3 if case == "train" else 1)
    return {**m, "tokens_per_s": tokens / m["seconds"], "tflops": flops / m["seconds"] / 1e12,
            "mfu": flops / m["seconds"] / peak, "mfu_datasheet": flops / m["seconds"] / H200_BF16_FLOPS}


def plan(shapes, cases):
    """(shape, case, tokens, new_tokens) in the order they run: the cheap, most asked-for cases first."""
    out = []
    for shape in shapes:
        out += [(shape, "score", t, 0) for t in cases["score"][:2]]
        out += [(shape, "train", t, 0) for t in cases["train"][:1]]
        out += [(shape, "decode", p, n) for p, n in cases["decode"]]
    for shape in shapes:
        out += [(shape, "score", t, 0) for t in cases["score"][2:]] + [(shape, "train", t, 0) for t in cases["train"][1:]]
    return out


def benchmark(args, device, report, save):
    shapes, cases = (TINY_SHAPES, TINY_CASES) if args.tiny else (SHAPES, CASES)
    yarn = TINY_YARN if args.tiny else YARN_16
    # on a CPU (the dry run) the fp32 peak: bf16 is emulated, and its product takes a minute, on many CPUs
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(dtype, device, repeats=6 if device.type == "cuda" else 1)
    report["bench"] = {"matmul_peak_tflops": peak / 1e12, "matmul_peak_dtype": str(dtype).removeprefix("torch."), "datasheet_bf16_tflops": H200_BF16_FLOPS / 1e12,
                       "flops": " ".join(model_flops.__doc__.split()), "rope_scaling": yarn, "repeats": args.repeats,
                       "activation_checkpointing_from": AC_FROM, "results": []}
    current = None
    cases = {k: [t for t in v if (t[0] if isinstance(t, tuple) else t) <= args.max_tokens] if k in args.cases else []
             for k, v in cases.items()}
    report["bench"]["compile"] = args.compile
    for shape, case, tokens, new_tokens in plan(shapes, cases):
        row = {"shape": shape, "case": case, "tokens": tokens, "new_tokens": new_tokens}
        if time.perf_counter() - args.start > args.budget:
            row["skipped"] = f"the --budget of {args.budget} s was spent"
        else:
            if shape != current:  # one shape's weights at a time, on the CPU
                current, cfgs = shape, configs(shape, yarn)
                state = random_weights(cfgs[0])
                report["bench"].setdefault("same_logits", {})[shape] = same_logits(cfgs, state, device)
            print(f"{shape} {case} {tokens:,}" + (f"+{new_tokens}" if new_tokens else "") + " ...", flush=True)
            for side in ("ours", "hf"):
                m = measure(side, case, tokens, new_tokens, cfgs, state, device, args)
                row[side] = figures(case, tokens, new_tokens, m, cfgs[0], peak)
        report["bench"]["results"].append(row)
        save()


def summary(report):
    """The lines printed at the end: the tests' counts and failures, then a table of the benchmark."""
    lines = []
    tests = report.get("tests")
    if tests:
        lines.append("tests: " + ", ".join(f"{n} {k}" for k, n in tests["counts"].items()) +
                     f" in {tests['seconds']:.0f} s")
        lines += [f"  {r['outcome'].upper()} {r['name']}: {r['message'][:300]}" for r in tests["results"]
                  if r["outcome"] in ("failed", "error")]
    bench = report.get("bench")
    if bench:
        lines.append(f"{bench['matmul_peak_dtype']} matmul peak {bench['matmul_peak_tflops']:.3g} TFLOP/s (H200 "
                     f"datasheet bf16: {bench['datasheet_bf16_tflops']:.0f}); MFU below is over the measured peak")
        lines.append(f"{'shape':<13}{'case':<14}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>7}{'ours GB':>9}"
                     f"{'HF GB':>8}{'ours MFU':>10}")
        for r in bench["results"]:
            name = f"{r['case']} {r['tokens'] // 1024 or r['tokens']}{'k' if r['tokens'] >= 1024 else ''}" + \
                (f"+{r['new_tokens']}" if r["new_tokens"] else "")
            if "skipped" in r:
                lines.append(f"{r['shape']:<13}{name:<14}skipped: {r['skipped']}")
                continue
            key = "decode_tokens_per_s" if r["case"] == "decode" else "tokens_per_s"
            cells = []
            for side in ("ours", "hf"):
                cells.append(f"{r[side][key]:,.0f}" if key in r[side] else "OOM" if "memory" in r[side]["error"]
                             else "error")
            ratio = f"{r['ours'][key] / r['hf'][key]:.2f}" if key in r["ours"] and key in r["hf"] else "-"
            gb = [f"{r[s]['peak_memory_bytes'] / 1e9:.1f}" if r[s].get("peak_memory_bytes") else "-"
                  for s in ("ours", "hf")]
            mfu = r["ours"].get("decode_mfu" if r["case"] == "decode" else "mfu")
            lines.append(f"{r['shape']:<13}{name:<14}{cells[0]:>12}{cells[1]:>12}{ratio:>7}{gb[0]:>9}{gb[1]:>8}"
                         f"{'-' if mfu is None else f'{mfu:.1%}':>10}")
    return "\n".join(lines)


def machine(device):
    import transformers

    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
            platform.machine(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
    return info


def get_args(argv=None):
    p = ArgumentParser(__file__, __doc__)
    p.add_argument("--out", default="docs/speed/gpu_check.json", help="the JSON written (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where there is one")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and lengths: the dry run, on any machine")
    p.add_argument("--no-tests", action="store_true", help="the benchmark only")
    p.add_argument("--no-bench", action="store_true", help="the tests only")
    p.add_argument("--tests-timeout", type=number(int, min=1), default=240, help="seconds (default: %(default)s)")
    p.add_argument("--budget", type=number(int, min=0), default=420,
                   help="no benchmark case starts after this many seconds from the start (default: %(default)s)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="default: all")
    p.add_argument("--max-tokens", type=number(int, min=1), default=1 << 30, help="only cases up to this length")
    p.add_argument("--compile", action="store_true", help="our side's blocks torch.compiled for score and train")
    p.add_argument("--profile", action="store_true", help="where each case's GPU time goes (one more run, profiled)")
    p.add_argument("--repeats", type=number(int, min=1), default=3, help="timed runs per case and side (default: "
                                                                         "%(default)s; the median is reported)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    args.start = time.perf_counter()
    check_output_file(args.out, "--out")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here (pass --device cpu for the dry run)")
    report = {"command": "python -m tools.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine(device)}
    save = lambda: write_json(args.out, {**report, "seconds": time.perf_counter() - args.start})  # noqa: E731
    print(json.dumps(report["machine"]), flush=True)
    if not args.no_tests:
        report["tests"] = run_tests(args.tests_timeout, device)
        save()
        print(summary({"tests": report["tests"]}), flush=True)
    if not args.no_bench:
        if device.type == "cuda":
            device = torch.device("cuda", device.index or 0)  # torch.cuda.set_device needs the index
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)  # FSDP2's group of one, as `python train.py` makes it
        try:
            benchmark(args, device, report, save)
        finally:
            dist.destroy_process_group()
    save()
    print(summary(report))
    print(f"wrote {args.out} ({time.perf_counter() - args.start:.0f} s)")


if __name__ == "__main__":
    cli(main)
