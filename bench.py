"""Speed and memory of our Llama next to Hugging Face transformers' LlamaForCausalLM, same weights, dtype and threads.

    python bench.py                      # SmolLM2-135M: score 1k..16k, train step 1k/2k, decode 64 after 2k
    python bench.py --quick              # a subset in under two minutes
    python bench.py --score 16384 --train --decode --repeats 1 --out bench-16k.json
    python bench.py --checkpoint DIR --hf HF_DIR   # any checkpoint of ours and the same weights as an HF directory

Cases, each a closure run the same way for both sides:
  score   the perplexity path: forward + mean loss over a window of T tokens, under inference_mode
          (ours: model.nll(x[:, :-1], x[:, 1:]).mean(); HF: model(input_ids, labels=...).loss, what users write)
  train   forward, backward and AdamW step over T tokens
  decode  greedy decoding of N tokens after a P-token prompt through the KV cache (ours: model.generate;
          HF: generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)); the prefill ends when the final norm
          first runs, and every later run of it is one decode step
Each case of each side runs in its own fresh process, so that its peak memory is its own: peak RSS of that process on
CPU (absolute: weights, inputs, framework and compute together, nothing subtracted), torch.cuda.max_memory_allocated
on CUDA. Each process does one warm-up run (full size up to 4096 tokens), then the timed runs, ours and HF's
alternated so that other load on the machine hits both alike; figures are medians. MFU is model FLOPs (see `flops`)
per second over the best of several 2048x2048 matmuls of the same dtype on the same machine. The HF side loads the
GGUF once (transformers needs the `gguf` package for that) and saves it as an HF directory for its processes; without
transformers installed, or with --no-hf, only our side runs.
"""
import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import assets
from eval_ppl import peak_memory
from model import Llama, LlamaConfig

DEFAULT_CHECKPOINT = "checkpoints/smollm2-135m"
FULL = {"score": [1024, 2048, 4096, 8192, 16384], "train": [1024, 2048], "decode": [2048, 64]}
QUICK = {"score": [1024], "train": [512], "decode": [256, 16]}
WARMUP_MAX = 4096


def flops(cfg, new_tokens, past=0, head_tokens=None):
    """Model FLOPs of one forward over new_tokens positions that follow `past` cached ones (no recomputation).
    2 per multiply-add: 2·N_matmul per token (N_matmul = the weights of every linear layer; the output head only for
    head_tokens positions), plus attention: q·k and p·v cost 2·2·d_attn per (query, key) pair and layer, with
    d_attn = n_heads·head_dim and only the causal pairs counted: past·T + T(T+1)/2 for T new tokens.
    A training step is 3 forwards' worth (backward = 2x forward)."""
    d_attn, d_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    n_body = cfg.n_layers * (2 * cfg.dim * d_attn + 2 * cfg.dim * d_kv + 3 * cfg.dim * cfg.hidden_dim)
    n_head = cfg.vocab_size * cfg.dim
    pairs = past * new_tokens + new_tokens * (new_tokens + 1) // 2
    head_tokens = new_tokens if head_tokens is None else head_tokens
    return 2 * n_body * new_tokens + 2 * n_head * head_tokens + 2 * 2 * d_attn * cfg.n_layers * pairs


def matmul_peak(dtype, device, n=2048, repeats=6):
    """Best FLOP/s of an n x n by n x n matmul: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        t = clock(device)
        a @ b
        best = min(best, clock(device) - t)
    return 2 * n ** 3 / best


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ---- one side, one case: what runs inside a worker process ----

def load(side, path, dtype, device):
    if side == "ours":
        return Llama.from_pretrained(path, dtype=dtype, device=device)
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()


def score_case(model, side, device):
    @torch.inference_mode()
    def run(x):
        if side == "ours":
            return model.nll(x[:, :-1], x[:, 1:]).mean()
        return model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # HF shifts the labels itself
    return run


def train_case(model, side, device):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run(x):
        if side == "ours":
            loss = model.nll(x[:, :-1], x[:, 1:]).mean()
        else:
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def decode_case(model, side, device):
    """run(prompt, n) -> the times at which the final norm finished, one per forward (prefill, then each step)."""
    times = []
    (model.norm if side == "ours" else model.model.norm).register_forward_hook(lambda *_: times.append(clock(device)))

    def run(prompt, n):
        times.clear()
        if side == "ours":
            model.generate(prompt, n)
        else:
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, min_new_tokens=n,
                           max_new_tokens=n, pad_token_id=model.config.eos_token_id)
        return list(times)
    return run


def worker(conn, job):
    """Load one side, warm up once, then answer each "run" from the driver with that run's timings."""
    try:
        torch.set_num_threads(job["threads"])
        device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
        model = load(job["side"], job["path"], dtype, device)
        run = {"score": score_case, "train": train_case, "decode": decode_case}[job["case"]](model, job["side"], device)
        x = torch.randint(0, job["vocab_size"], (1, job["tokens"] + 1), generator=torch.Generator().manual_seed(0))
        x = x.to(device)

        def timed():
            if job["case"] == "decode":
                t0, steps = clock(device), run(x[:, :job["tokens"]], job["new_tokens"])
                return {"prefill_s": steps[0] - t0, "decode_s_per_token": (steps[-1] - steps[0]) / (len(steps) - 1)}
            t0 = clock(device)
            run(x)
            return {"seconds": clock(device) - t0}

        # warm-up (threads, kernels, optimizer state, the allocator's buffers) at full size up to WARMUP_MAX tokens,
        # on 256 tokens above it, so that an 8k or 16k case does not run one more time
        warm = job["tokens"] if job["tokens"] <= WARMUP_MAX else 256
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
        self.name = f"{job['side']} {job['case']} {job['tokens']}"
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

def measure(jobs, repeats):
    """Start one worker per side (one after the other, so the warm-ups do not overlap), alternate their timed runs,
    and return per side the medians of the timings and the process's peak memory."""
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
        context = tokens + new_tokens / 2  # the average context a decode step attends to
        step_flops = flops(cfg, 1, past=context, head_tokens=1)
        return {"prefill_s": timing["prefill_s"], "prefill_tokens_per_s": tokens / timing["prefill_s"],
                "prefill_mfu": flops(cfg, tokens, head_tokens=1) / timing["prefill_s"] / peak,
                "decode_tokens_per_s": 1 / timing["decode_s_per_token"],
                "decode_mfu": step_flops / timing["decode_s_per_token"] / peak,
                "peak_memory_bytes": timing["peak_memory_bytes"], "runs": timing["runs"]}
    f = flops(cfg, tokens) * (3 if case == "train" else 1)
    return {"seconds": timing["seconds"], "tokens_per_s": tokens / timing["seconds"],
            "mfu": f / timing["seconds"] / peak, "peak_memory_bytes": timing["peak_memory_bytes"],
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


def table(results, hf):
    rows = [("case", "metric", "ours", "HF", "ours/HF")]
    for r in results:
        name = f"{r['case']} {r['tokens']}" + (f"+{r['new_tokens']}" if r["case"] == "decode" else "")
        metrics = ["prefill_s", "decode_tokens_per_s", "prefill_mfu", "decode_mfu"] if r["case"] == "decode" \
            else ["tokens_per_s", "mfu"]
        for m in metrics + ["peak_memory_bytes"]:
            scale, unit = (1e-9, " GB") if m == "peak_memory_bytes" else (100, " %") if "mfu" in m else (1, "")
            ours = r["ours"][m]
            cells = [f"{ours * scale:.3g}{unit}", "-", "-"]
            if hf:
                cells[1:] = [f"{r['hf'][m] * scale:.3g}{unit}", f"{ours / r['hf'][m]:.2f}"]
            rows.append((name, LABELS[m], *cells))
            name = ""
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    if hf:
        lines.append("ours/HF: above 1 is better for tokens/s and MFU, below 1 for seconds and memory")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"our checkpoint directory (default {DEFAULT_CHECKPOINT}, fetched by assets.py when missing)")
    p.add_argument("--gguf", help="GGUF file the HF side loads (default: SmolLM2-135M's, from assets.py)")
    p.add_argument("--hf", help="an HF model directory the HF side loads instead of --gguf (saves the conversion)")
    p.add_argument("--no-hf", action="store_true", help="run our side only")
    p.add_argument("--quick", action="store_true",
                   help=f"a subset: score {QUICK['score']}, train {QUICK['train']}, decode {QUICK['decode']}")
    p.add_argument("--score", type=int, nargs="*", metavar="T", help=f"window lengths to score (default {FULL['score']}; "
                   "given without values: none)")
    p.add_argument("--train", type=int, nargs="*", metavar="T", help=f"training step lengths (default {FULL['train']})")
    p.add_argument("--decode", type=int, nargs="*", metavar="N",
                   help=f"PROMPT NEW: prompt length and new tokens (default {FULL['decode']}; given without values: none)")
    p.add_argument("--repeats", type=int, help="timed runs per case and side; the median is reported "
                   "(default 3, with --quick 1; 1 is fine for the 16k cases, which take minutes per run)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads for both sides (default torch.get_num_threads())")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the results as JSON to this file")
    args = p.parse_args()

    defaults = QUICK if args.quick else FULL
    cases = {name: defaults[name] if getattr(args, name) is None else getattr(args, name) for name in defaults}
    if cases["decode"] and len(cases["decode"]) != 2:
        raise ValueError(f"--decode takes a prompt length and a number of new tokens (got {cases['decode']})")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1 (got {args.repeats})")
    checkpoint = Path(args.checkpoint)
    if args.checkpoint == DEFAULT_CHECKPOINT and not checkpoint.exists():
        checkpoint = assets.ensure_smollm2(DEFAULT_CHECKPOINT)
    cfg = LlamaConfig.from_checkpoint(checkpoint)
    hf = not args.no_hf
    if hf:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: running our side only")
            hf = False

    device = torch.device(args.device)
    dtypes = {"float32": torch.float32} | ({"bfloat16": torch.bfloat16} if device.type == "cuda" else {})
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    torch.set_num_threads(args.threads)
    peaks = {name: matmul_peak(d, device) for name, d in dtypes.items()}
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads,
               "dtype": dtype, "torch": torch.__version__,
               "transformers": transformers.__version__ if hf else None}
    print(f"{machine['device']}, {args.threads} threads, {machine['dtype']}, torch {torch.__version__}"
          + (f", transformers {machine['transformers']}" if hf else ", our side only"))
    print(f"FLOPs: {' '.join(flops.__doc__.split())}")
    print(f"peak memory: {'max_memory_allocated' if device.type == 'cuda' else 'absolute peak RSS of the process'} "
          f"(one fresh process per case and side); figures are medians of {args.repeats} run(s) after a warm-up")

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"ours": str(checkpoint.resolve())}
        if hf:
            paths["hf"] = str(Path(hf_directory(args, tmp)).resolve())
        plan = [("score", t, 0) for t in cases["score"]] + [("train", t, 0) for t in cases["train"]]
        if cases["decode"]:
            plan.append(("decode", *cases["decode"]))
        timings = []
        for case, tokens, new_tokens in plan:
            print(f"{case} {tokens}{f'+{new_tokens}' if new_tokens else ''} ...", flush=True)
            jobs = {side: {"side": side, "case": case, "tokens": tokens, "new_tokens": new_tokens, "path": path,
                           "threads": args.threads, "device": str(device), "dtype": dtype,
                           "vocab_size": cfg.vocab_size} for side, path in paths.items()}
            timings.append(measure(jobs, args.repeats))

    # the peak again, at the end: other load on the machine may have lowered the first measurement
    peaks = {name: max(peaks[name], matmul_peak(d, device)) for name, d in dtypes.items()}
    print("matmul peak (best 2048x2048 product, at the start and the end): "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    results = []
    for (case, tokens, new_tokens), timing in zip(plan, timings):
        result = {"case": case, "tokens": tokens, "new_tokens": new_tokens, "hf": None}
        for side, t in timing.items():
            result[side] = summarize(case, tokens, new_tokens, t, cfg, peaks[dtype])
        results.append(result)
    print(table(results, hf))
    report = {"machine": machine, "repeats": args.repeats, "matmul_peak_flops": peaks,
              "flops_formula": " ".join(flops.__doc__.split()),
              "peak_memory": "max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
              "results": results}
    if args.out:
        assets.write_json(args.out, report)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"bench.py: error: {e}")
