"""Speed and memory of our Llama next to Hugging Face transformers' LlamaForCausalLM: same weights, threads and work.

    python -m tools.bench --out bench.json     # SmolLM2-135M: score 1k..16k, train step 1k/2k, decode 64 after 2k, fp32 and bf16
    python -m tools.bench --quick              # a subset in a few minutes
    python -m tools.bench --score 16384 --train --decode --modes bfloat16 --repeats 1
    python -m tools.bench --checkpoint DIR --hf HF_DIR   # any checkpoint of ours and the same weights as an HF directory

Cases, each a closure run the same way for both sides:
  score   the perplexity path: forward + mean loss over a window of T tokens, under inference_mode
          (ours: model.nll(x[:, :-1], x[:, 1:]).mean(); HF: model(input_ids, labels=...).loss, what users write)
  train   forward, backward and AdamW step over T tokens (fused AdamW: train.py's, and HF Trainer's default)
  decode  greedy decoding of N tokens after a P-token prompt through the KV cache (ours: model.generate;
          HF: generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)); the prefill ends when the final norm
          first runs, and every later run of it is one decode step
Modes (--modes): float32; bfloat16, bf16 weights for score and decode (RMSNorm, RoPE, softmax statistics and the loss
stay in fp32 on our side), and for train bf16 compute over fp32 master weights and AdamW state, as each side trains
in bf16 (ours: FSDP2's MixedPrecisionPolicy, as train.py; HF: torch.autocast, as its Trainer's bf16=True); autocast,
fp32 weights under torch.autocast(bfloat16) on both sides.
Each case of each side runs in its own fresh process, so that its peak memory is its own: peak RSS of that process on
CPU (absolute: weights, inputs, framework and compute together, nothing subtracted), torch.cuda.max_memory_allocated
on CUDA. Each process does one warm-up run (full size up to 4096 tokens), then the timed runs, ours and HF's
alternated so that other load on the machine hits both alike (with --one-side-at-a-time, ours then HF's, for cases
whose two processes do not fit in memory together); figures are medians. MFU is model FLOPs
(common.model_flops) per second over the best of several 2048x2048 matmuls of the compute dtype on the same machine.
Our side keeps freed memory for reuse as our scripts do (common.keep_freed_memory: train.py every tensor, the
evaluations those up to 64 MB); HF's runs with glibc's defaults, as transformers does, unless --hf-keeps-freed-memory.
The HF side loads the GGUF once (transformers needs the `gguf` package for that) and saves it as an HF directory for
its processes; without transformers installed, or with --no-hf, only our side runs.
"""
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from tools import assets
from common import (DEFAULT_CHECKPOINT, EVALUATION_REUSES_UP_TO, ArgumentParser, check_not_an_input,
                    check_output_file, cli, clock, compile_blocks, default_device, keep_freed_memory, matmul_peak,
                    model_flops, native_bf16, number, peak_memory, shard, write_json)
from checkpoint import load_config, load_model

FULL = {"score": [1024, 2048, 4096, 8192, 16384], "train": [1024, 2048], "decode": [2048, 64]}
QUICK = {"score": [1024], "train": [512], "decode": [256, 16]}
MODES = ("float32", "bfloat16", "autocast")
WARMUP_MAX = 4096


# ---- one side, one case, one mode: what runs inside a worker process ----

def load(side, path, mode, device, train, rope_scaling=None, compile=False):
    dtype = torch.bfloat16 if mode == "bfloat16" and not train else torch.float32
    if side == "ours":
        model = load_model(path, rope_scaling=rope_scaling, dtype=dtype, device=device)
        if train and mode == "bfloat16":  # train.py's way: bf16 compute, fp32 master weights and gradient reduction
            import torch.distributed as dist
            from torch.distributed.fsdp import MixedPrecisionPolicy

            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            shard(model, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                              cast_forward_inputs=False), compile=compile)
        elif compile:
            compile_blocks(model)
        return model
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()


def compute_context(side, mode, device, train):
    """torch.autocast in the autocast mode, and for HF's bf16 training (its Trainer's bf16=True)."""
    if mode == "autocast" or (mode == "bfloat16" and train and side == "hf"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score_case(model, side, context):
    @torch.inference_mode()
    def run(x):
        with context:
            if side == "ours":
                return model.nll(x[:, :-1], x[:, 1:]).mean()
            return model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # HF shifts the labels itself
    return run


def train_case(model, side, context):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # train.py's, and HF Trainer's default

    def run(x):
        with context:
            if side == "ours":
                loss = model.nll(x[:, :-1], x[:, 1:]).mean()
            else:
                loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def decode_case(model, side, context, device, dynamic_cache="pre-rope"):
    """run(prompt, n) -> the times at which the final norm finished, one per forward (the prefill, then one per new
    token, whether that step reads the KV cache or, with dynamic_cache="recompute", runs the whole sequence again)."""
    times = []

    def ready(*_):
        times.append(clock(device))
    (model.norm if side == "ours" else model.model.norm).register_forward_hook(ready)

    def run(prompt, n):
        times.clear()
        with context:
            if side == "ours":
                model.generate(prompt, n, dynamic_cache=dynamic_cache)
            else:
                model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, min_new_tokens=n,
                               max_new_tokens=n, pad_token_id=model.config.eos_token_id)
        return list(times)
    return run


def random_tokens(vocab_size, n, device):
    """The same n token ids for every side, case and process."""
    return torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(device)


def warmup_length(tokens):
    """Warm up (threads, kernels, optimizer state, the allocator's buffers) at full size up to WARMUP_MAX tokens, on
    256 tokens above it, so that an 8k or 16k case does not run one more time."""
    return tokens if tokens <= WARMUP_MAX else 256


def worker(conn, job):
    """Load one side, warm up once, then answer each "run" from the driver with that run's timings."""
    try:
        if job["keep_freed_memory"]:  # our side, as our scripts do; HF's with --hf-keeps-freed-memory
            keep_freed_memory(None if job["case"] == "train" else EVALUATION_REUSES_UP_TO)
        torch.set_num_threads(job["threads"])
        device, train = torch.device(job["device"]), job["case"] == "train"
        model = load(job["side"], job["path"], job["mode"], device, train, job["rope_scaling"], job["compile"])
        context = compute_context(job["side"], job["mode"], device, train)
        run = decode_case(model, job["side"], context, device, job["dynamic_cache"]) if job["case"] == "decode" else \
            {"score": score_case, "train": train_case}[job["case"]](model, job["side"], context)
        x = random_tokens(job["vocab_size"], job["tokens"] + 1, device)

        def timed():
            if job["case"] == "decode":
                t0, steps = clock(device), run(x[:, :job["tokens"]], job["new_tokens"])
                return {"prefill_s": steps[0] - t0, "decode_s_per_token": (steps[-1] - steps[0]) / (len(steps) - 1)}
            t0 = clock(device)
            run(x)
            return {"seconds": clock(device) - t0}

        # compiled: the warm-up at full size, so that no compilation falls in a timed run
        warm = job["tokens"] if job["compile"] else warmup_length(job["tokens"])
        if job["case"] == "decode":
            run(x[:, :warm], job["new_tokens"])
        else:
            run(x[:, :warm + 1])
        conn.send("ready")
        while conn.recv() == "run":
            conn.send(timed())
        conn.send({"peak_memory_bytes": peak_memory(device)})
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        raise


class Worker:
    """One side of one case in a fresh process, forked from a server process that has imported torch and model.py
    but run nothing, so that it starts fast and clean; the HF side imports transformers itself."""

    def __init__(self, job):
        ctx = multiprocessing.get_context("forkserver")
        # imported once by the server: torch, model.py, and torch._dynamo, which both sides import while loading
        # (model.py's meta-device init, transformers itself) and which takes seconds
        ctx.set_forkserver_preload(["model", "torch._dynamo"])
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, job), daemon=True)
        self.proc.start()
        self.name = f"{job['side']} {job['case']} {job['tokens']} {job['mode']}"
        self.receive()

    def receive(self):
        try:
            answer = self.conn.recv()
        except EOFError:  # killed: most often out of memory
            self.proc.join()
            raise ValueError(f"the benchmark process for {self.name} died (exit code {self.proc.exitcode})") from None
        if isinstance(answer, str) and answer != "ready":
            raise ValueError(f"the benchmark process for {self.name} failed: {answer}")
        return answer

    def run(self):
        self.conn.send("run")
        return self.receive()

    def finish(self):
        self.conn.send("exit")
        result = self.receive()
        self.proc.join()
        return result


# ---- the driver ----

def measure(jobs, repeats, one_side_at_a_time=False):
    """Start one worker per side (one after the other, so the warm-ups do not overlap), alternate their timed runs,
    and return per side the medians of the timings and the process's peak memory. one_side_at_a_time: each side's
    worker runs all its repeats and exits before the next one starts, for cases whose two processes do not fit in
    memory together (not alternated, so load on the machine may fall on one side only)."""
    if one_side_at_a_time:
        return {side: measure({side: job}, repeats)[side] for side, job in jobs.items()}
    workers = {side: Worker(job) for side, job in jobs.items()}
    runs = {side: [] for side in jobs}
    for r in range(repeats):
        for side in (list(workers) if r % 2 == 0 else list(workers)[::-1]):
            runs[side].append(workers[side].run())
    out = {}
    for side, w in workers.items():
        out[side] = {k: statistics.median(run[k] for run in runs[side]) for k in runs[side][0]}
        out[side]["runs"] = runs[side]
        out[side].update(w.finish())
    return out


def summarize(case, tokens, new_tokens, timing, cfg, peak):
    """tokens/s and MFU from the median timings of one side."""
    if case == "decode":
        step_flops = model_flops(cfg, 1, past=tokens + new_tokens // 2, head_tokens=1)  # the average context of a step
        return {"prefill_s": timing["prefill_s"], "prefill_tokens_per_s": tokens / timing["prefill_s"],
                "prefill_mfu": model_flops(cfg, tokens, head_tokens=1) / timing["prefill_s"] / peak,
                "decode_tokens_per_s": 1 / timing["decode_s_per_token"],
                "decode_mfu": step_flops / timing["decode_s_per_token"] / peak,
                "peak_memory_bytes": timing["peak_memory_bytes"], "runs": timing["runs"]}
    flops = model_flops(cfg, tokens) * (3 if case == "train" else 1)
    return {"seconds": timing["seconds"], "tokens_per_s": tokens / timing["seconds"],
            "mfu": flops / timing["seconds"] / peak, "peak_memory_bytes": timing["peak_memory_bytes"],
            "runs": timing["runs"]}


def hf_directory(args, tmp):
    """The HF side's weights: --hf as given, or --gguf (default: SmolLM2's) loaded by transformers and saved."""
    if args.hf:
        return args.hf
    from transformers import LlamaForCausalLM

    gguf = Path(args.gguf) if args.gguf else assets.smollm2_gguf()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} not found; pass --gguf PATH or --no-hf")
    print(f"loading {gguf} with transformers (dequantizing) ...", flush=True)
    try:
        hf = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ValueError(f"transformers cannot read GGUF here ({e}); pip install gguf, or pass --hf DIR or --no-hf")
    del hf.config.quantization_config  # the dequantized weights are plain tensors: save them as such
    hf.hf_quantizer = None
    hf.save_pretrained(tmp)
    return tmp


LABELS = {"tokens_per_s": "tokens/s", "mfu": "MFU", "prefill_s": "prefill s", "decode_tokens_per_s": "decode tokens/s",
          "prefill_mfu": "prefill MFU", "decode_mfu": "decode MFU", "peak_memory_bytes": "peak memory"}


def table(results, modes, hf):
    """One row per case and metric; per mode ours, HF and ours/HF, and ours in bf16 over HF in fp32."""
    head = ["case", "metric"] + [f"{side} {mode}" for mode in modes for side in (("ours", "HF", "ratio") if hf
                                                                                  else ("ours",))]
    switch = hf and {"float32", "bfloat16"} <= set(modes)
    rows = [head + (["ours bf16 / HF fp32"] if switch else [])]
    for r in results:
        name = f"{r['case']} {r['tokens']}" + (f"+{r['new_tokens']}" if r["case"] == "decode" else "")
        metrics = ["prefill_s", "decode_tokens_per_s", "prefill_mfu", "decode_mfu"] if r["case"] == "decode" \
            else ["tokens_per_s", "mfu"]
        for m in metrics + ["peak_memory_bytes"]:
            scale, unit = (1e-9, " GB") if m == "peak_memory_bytes" else (100, " %") if "mfu" in m else (1, "")
            cells = []
            for mode in modes:
                ours = r[mode]["ours"][m]
                cells.append(f"{ours * scale:.3g}{unit}")
                if hf:
                    cells += [f"{r[mode]['hf'][m] * scale:.3g}{unit}", f"{ours / r[mode]['hf'][m]:.2f}"]
            if switch:
                cells.append("-" if "mfu" in m else f"{r['bfloat16']['ours'][m] / r['float32']['hf'][m]:.2f}")
            rows.append([name, LABELS[m], *cells])
            name = ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    if hf:
        lines.append("ratio = ours/HF in the same mode: above 1 is better for tokens/s and MFU, below 1 for seconds "
                     "and memory")
    return "\n".join(lines)


PROFILE_GROUPS = {"attention": ("scaled_dot_product",), "matmuls": ("aten::mm", "aten::addmm", "aten::bmm"),
                  "loss": ("log_softmax", "nll_loss", "cross_entropy")}


def profile_score(path, tokens, mode, device):
    """Where our scoring time goes at one length: self time of the profiled ops, grouped into attention (SDPA),
    matmuls, the loss (log-softmax and cross-entropy over the vocabulary) and everything else."""
    from torch.profiler import ProfilerActivity, profile

    model = load("ours", path, mode, device, train=False)
    run = score_case(model, "ours", compute_context("ours", mode, device, False))
    x = random_tokens(model.config.vocab_size, tokens + 1, device)
    run(x[:, :warmup_length(tokens) + 1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = clock(device)
        run(x)
        seconds = clock(device) - start
    groups = dict.fromkeys([*PROFILE_GROUPS, "rest"], 0.0)
    for event in prof.key_averages():
        group = next((g for g, names in PROFILE_GROUPS.items() if any(n in event.key for n in names)), "rest")
        groups[group] += event.self_cpu_time_total / 1e6
    total = sum(groups.values())
    return {"tokens": tokens, "mode": mode, "seconds": seconds, "share": {g: t / total for g, t in groups.items()},
            "profiled_seconds": groups}


def get_args(argv=None):
    p = ArgumentParser(__file__, __doc__)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"our checkpoint directory (default {DEFAULT_CHECKPOINT}, converted on first use)")
    p.add_argument("--gguf", help="GGUF file the HF side loads (default: SmolLM2-135M's, from assets.py)")
    p.add_argument("--hf", help="an HF model directory the HF side loads instead of --gguf (saves the conversion)")
    p.add_argument("--no-hf", action="store_true", help="run our side only")
    p.add_argument("--quick", action="store_true",
                   help=f"a subset: score {QUICK['score']}, train {QUICK['train']}, decode {QUICK['decode']}")
    p.add_argument("--score", type=number(int, min=2), nargs="*", metavar="T",
                   help=f"window lengths to score (default {FULL['score']}; given without values: none)")
    p.add_argument("--train", type=number(int, min=2), nargs="*", metavar="T",
                   help=f"training step lengths (default {FULL['train']})")
    p.add_argument("--decode", type=number(int, min=1), nargs="*", metavar="N",
                   help=f"PROMPT NEW: prompt length and new tokens (default {FULL['decode']}; given without values: "
                        "none)")
    p.add_argument("--rope", type=json.loads, metavar="JSON", help="our side only (with --no-hf): this rope_scaling "
                   "instead of the checkpoint's, e.g. a dynamic variant for --decode")
    p.add_argument("--dynamic-cache", choices=["pre-rope", "recompute"], default="pre-rope",
                   help="decoding with a dynamic variant: keys cached before RoPE (default), or recompute")
    p.add_argument("--compile", action="store_true", help="our side's blocks torch.compiled for score and train "
                   "(eval_ppl.py --compile, train.py --compile); decoding stays eager")
    p.add_argument("--hf-keeps-freed-memory", action="store_true", help="HF's runs keep freed memory "
                   "for reuse as ours do (common.keep_freed_memory), to compare the models alone")
    p.add_argument("--one-side-at-a-time", action="store_true", help="run our side's timed runs, then HF's, "
                   "instead of alternating them in two live processes (for cases too big for both in memory)")
    p.add_argument("--profile", type=number(int, min=2), nargs="+", metavar="T", help="instead of the comparison: "
                   "where our scoring time goes at these lengths, per mode (torch.profiler)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="compute modes (default: float32, and bfloat16 on CUDA "
                   "and on CPUs with native bf16)")
    p.add_argument("--repeats", type=number(int, min=1), help="timed runs per case and side; the median is reported "
                   "(default 3, with --quick 1; 1 is fine for the 16k cases, which take minutes per run)")
    p.add_argument("--threads", type=number(int, min=1), default=torch.get_num_threads(),
                   help="CPU threads for both sides (default torch.get_num_threads())")
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--out", help="write the results as JSON to this file")
    return p.parse_args(argv)


def profile(args, checkpoint, modes, device, machine):
    profiles = [profile_score(checkpoint, T, mode, device) for T in args.profile for mode in modes]
    for p in profiles:
        print(f"score {p['tokens']} {p['mode']}: {p['seconds']:.1f} s under the profiler; " + ", ".join(
            f"{group} {share:.0%}" for group, share in p["share"].items()))
    if args.out:
        write_json(args.out, {"machine": machine, "profiles": profiles})


def compare(args, cases, checkpoint, cfg, modes, device, hf, repeats, machine):
    """Every case of `cases` in every mode, ours and HF's; prints the table and writes --out."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "autocast": torch.bfloat16}
    peaks = {mode: matmul_peak(dtypes[mode], device) for mode in modes}
    print(f"FLOPs: {' '.join(model_flops.__doc__.split())}")
    print(f"peak memory: {'max_memory_allocated' if device.type == 'cuda' else 'absolute peak RSS of the process'} "
          f"(one fresh process per case, mode and side); figures are medians of {repeats} run(s) after a warm-up")

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"ours": str(checkpoint.resolve())}
        if hf:
            paths["hf"] = str(Path(hf_directory(args, tmp)).resolve())
        plan = [("score", t, 0) for t in cases["score"]] + [("train", t, 0) for t in cases["train"]]
        if cases["decode"]:
            plan.append(("decode", *cases["decode"]))
        results = []
        for case, tokens, new_tokens in plan:
            result = {"case": case, "tokens": tokens, "new_tokens": new_tokens}
            for mode in modes:
                print(f"{case} {tokens}{f'+{new_tokens}' if new_tokens else ''} {mode} ...", flush=True)
                jobs = {side: {"side": side, "case": case, "tokens": tokens, "new_tokens": new_tokens, "path": path,
                               "threads": args.threads, "device": str(device), "mode": mode,
                               "vocab_size": cfg.vocab_size, "rope_scaling": args.rope,
                               "dynamic_cache": args.dynamic_cache,
                               "compile": args.compile and side == "ours" and case != "decode",
                               "keep_freed_memory": side == "ours" or args.hf_keeps_freed_memory}
                        for side, path in paths.items()}
                result[mode] = measure(jobs, repeats, args.one_side_at_a_time)
            results.append(result)

    # the peak again, at the end: other load on the machine may have lowered the first measurement
    peaks = {mode: max(peaks[mode], matmul_peak(dtypes[mode], device)) for mode in modes}
    print("matmul peak (best 2048x2048 product, at the start and the end): "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    for r in results:
        for mode in modes:
            r[mode] = {side: summarize(r["case"], r["tokens"], r["new_tokens"], t, cfg, peaks[mode])
                       for side, t in r[mode].items()} | ({} if hf else {"hf": None})
    print(table(results, modes, hf))
    if args.out:
        write_json(args.out, {"machine": machine, "repeats": repeats, "matmul_peak_flops": peaks,
                              "flops_formula": " ".join(model_flops.__doc__.split()),
                              "peak_memory": "max_memory_allocated" if device.type == "cuda"
                              else "peak RSS of the process", "results": results})


def main(argv=None):
    args = get_args(argv)
    defaults = QUICK if args.quick else FULL
    cases = {name: defaults[name] if getattr(args, name) is None else getattr(args, name) for name in defaults}
    if cases["decode"] and len(cases["decode"]) != 2:
        raise ValueError(f"--decode takes a prompt length and a number of new tokens (got {cases['decode']})")
    if args.rope is not None and not args.no_hf:
        raise ValueError("--rope changes our side only: pass --no-hf with it")
    if args.out:  # before the minutes of measurements that end in it
        check_output_file(args.out, "--out")
        check_not_an_input(args.out, "--out", [("--checkpoint", args.checkpoint), ("--gguf", args.gguf),
                                               ("--hf", args.hf)])
    device = torch.device(args.device)
    modes = args.modes or ["float32"] + (["bfloat16"] if device.type == "cuda" or native_bf16() else [])
    repeats = args.repeats or (1 if args.quick else 3)
    checkpoint = Path(args.checkpoint)
    if args.checkpoint == DEFAULT_CHECKPOINT:
        from convert_llama import default_checkpoint
        default_checkpoint()
    cfg = load_config(checkpoint)
    hf = not args.no_hf
    if hf:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: running our side only")
            hf = False
    torch.set_num_threads(args.threads)
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads, "modes": modes,
               "rope_scaling": args.rope, "dynamic_cache": args.dynamic_cache, "compile": args.compile,
               "hf_keeps_freed_memory": args.hf_keeps_freed_memory, "one_side_at_a_time": args.one_side_at_a_time,
               "native_bf16": native_bf16(), "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
               "torch": torch.__version__,
               "transformers": transformers.__version__ if hf else None}
    print(f"{machine['device']} ({machine['cpu_kernels']} kernels), {args.threads} threads, modes {' '.join(modes)}, "
          f"torch {torch.__version__}" + (f", transformers {machine['transformers']}" if hf else ", our side only"))
    if args.profile:
        return profile(args, checkpoint, modes, device, machine)
    compare(args, cases, checkpoint, cfg, modes, device, hf, repeats, machine)


if __name__ == "__main__":
    cli(main)
