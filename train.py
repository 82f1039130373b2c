"""YaRN fine-tuning, the paper's recipe (Peng et al., arXiv 2309.00071, §4.1 and App. B.4), with FSDP2.

The paper extended Llama 2 7B and 13B from 4k to 64k tokens (YaRN s = 16) by fine-tuning 400 steps on PG19 cut into
64k-token sequences, each document bookended by BOS and EOS: global batch 64, AdamW β = (0.9, 0.95), lr 2e-5 after
20 linear warm-up steps, no weight decay, PyTorch FSDP and FlashAttention 2. Those are this script's defaults (the lr
then stays constant, as the paper says; its reference code decayed it linearly by default: --lr-schedule linear).
The same code runs as `python train.py` (one process, CPU or one GPU), under `torchrun` on one node, and on many.

    # Llama 2 7B, 4k -> 64k on 8 GPUs: YaRN s = 16, sequences of 16 x 4096 tokens
    python convert_llama.py path/to/Llama-2-7b-hf checkpoints/llama-2-7b
    torchrun --nproc_per_node=8 train.py --scale 16 --model checkpoints/llama-2-7b --data pg19/ --out-dir runs/7b-64k
    # 64k -> 128k: 200 more steps at s = 32 from the 64k model (s counts from its original 4k)
    torchrun --nproc_per_node=8 train.py --scale 32 --steps 200 --model runs/7b-64k/final --out-dir runs/7b-128k ...
    # Llama 2 70B: s = 8, lr 1e-5.  Mistral 7B: s = 8 at 16k tokens, lr 1e-6, 1000 steps, its reference beta_fast/slow
    torchrun --nproc_per_node=8 train.py --scale 8 --lr 1e-5 --model checkpoints/llama-2-70b ...
    torchrun --nproc_per_node=8 train.py --scale 8 --seq-len 16384 --lr 1e-6 --steps 1000 --beta-fast 128 --beta-slow 2
    # two nodes (run on each; --out-dir must be on a file system that both nodes see)
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$HOST --master_port=29500 train.py ...
    # ablations: another RoPE variant (linear = PI, ntk, dynamic, ntk-by-parts, dynamic-yarn, llama3)
    torchrun --nproc_per_node=8 train.py --scale 16 --rope linear ...
    # on a CPU: SmolLM2-135M (the default model, 8k context) to 16k, trained here on short 1024-token sequences
    python train.py --scale 2 --seq-len 1024 --batch-size 4 --steps 10 --out-dir runs/smollm2-cpu
    # after an interruption, the same command with --resume continues exactly as if it had never stopped
    torchrun --nproc_per_node=8 train.py ... --resume
    python train.py --plan                                       # estimated memory per GPU, Llama 2 7B/13B/70B
    python train.py --export-hf runs/7b-64k/final runs/7b-64k/hf  # transformers export (done after every run)

--out-dir receives run.json (the arguments), log.jsonl (one line per step), step_N/ (sharded checkpoints of the
model, optimizer, step, data position and RNG states; the newest --keep are kept), latest (the newest step_N's name),
final/ (a checkpoint for Llama.from_pretrained whose config.json records the scaling, so evals need no flags), and
hf/ (the same model for Hugging Face transformers).
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from tqdm import tqdm

import assets
import rope
from model import Llama, LlamaConfig
from tokenizer import Tokenizer

AC_MIN_SEQ_LEN = 4096  # activation checkpointing is on by default from this sequence length
# run.json keys that --resume must match: what changes the numbers (--steps too when the lr decays towards it)
RUN_KEYS = ("model", "data", "scale", "rope", "seq_len", "beta_fast", "beta_slow", "batch_size", "micro_batch_size",
            "lr", "warmup_steps", "lr_schedule", "adam_betas", "weight_decay", "grad_clip", "seed")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    arg("--model", help="checkpoint directory to fine-tune, as convert_llama.py writes (default: SmolLM2-135M, "
                        "fetched by assets.py)")
    arg("--data", nargs="+", help=".txt files (one document each), .jsonl files (one {\"text\": ...} document per "
                                  "line) or folders of them (default: the books of assets.py)")
    arg("--out-dir", default="runs/yarn", help="checkpoints, log and final model (default: %(default)s)")
    arg("--scale", type=float, default=16.0, help="s, the context extension factor (YaRN's `factor`): sequences of "
                                                  "s x the checkpoint's original context (default: %(default)s)")
    arg("--rope", default="yarn", choices=[t for t in rope.TYPES if t != "default"],
        help="RoPE scaling to fine-tune with; the others are for ablations (default: %(default)s)")
    arg("--seq-len", type=int, help="tokens per training sequence (default: scale x original context)")
    arg("--beta-fast", type=float, help="YaRN/NTK-by-parts β (default: 32; Mistral's reference: 128)")
    arg("--beta-slow", type=float, help="YaRN/NTK-by-parts α (default: 1; Mistral's reference: 2)")
    arg("--steps", type=int, default=400, help="optimizer steps; with a constant lr, --resume may raise it "
                                               "(default: %(default)s)")
    arg("--batch-size", type=int, default=64, help="global batch in sequences = processes x --micro-batch-size x "
                                                   "gradient accumulation steps (default: %(default)s)")
    arg("--micro-batch-size", type=int, default=1, help="sequences per forward/backward (default: %(default)s)")
    arg("--lr", type=float, default=2e-5, help="learning rate; the paper's 70B used 1e-5, Mistral 1e-6 "
                                               "(default: %(default)s)")
    arg("--warmup-steps", type=int, default=20, help="linear warm-up steps (default: %(default)s)")
    arg("--lr-schedule", choices=["constant", "linear"], default="constant", help="after warm-up: constant (the "
        "paper), or linear decay to 0 at --steps (its reference code's default) (default: %(default)s)")
    arg("--adam-betas", type=float, nargs=2, default=[0.9, 0.95], metavar=("BETA1", "BETA2"),
        help="AdamW's betas (default: 0.9 0.95)")
    arg("--weight-decay", type=float, default=0.0, help="AdamW's, on every weight (default: %(default)s)")
    arg("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this, 0: off; the paper "
        "gives no value and its reference code's --grad-norm flag never clipped (default: %(default)s)")
    arg("--activation-checkpointing", action=argparse.BooleanOptionalAction,
        help=f"recompute each block in backward (default: on when seq_len >= {AC_MIN_SEQ_LEN})")
    arg("--compile", action="store_true", help="torch.compile each block")
    arg("--save-every", type=int, default=50, help="checkpoint every this many steps (default: %(default)s)")
    arg("--keep", type=int, default=2, help="keep this many newest checkpoints, 0: all (default: %(default)s)")
    arg("--resume", action="store_true", help="continue from --out-dir's latest checkpoint, if there is one")
    arg("--overwrite", action="store_true", help="replace whatever --out-dir holds")
    arg("--seed", type=int, default=0, help="seeds the order in which sequences are read (default: %(default)s)")
    arg("--cache-dir", default="data/cache", help="where tokenized data is cached (default: %(default)s)")
    arg("--peak-tflops", type=float, help="peak TFLOP/s of one process, for MFU (default: a measured matmul)")
    arg("--plan", action="store_true", help="print the estimated memory per GPU for Llama 2, and exit")
    arg("--export-hf", nargs=2, metavar=("CKPT", "OUT"), help="export a checkpoint directory for Hugging Face "
                                                              "transformers, and exit")
    return p.parse_args(argv)


def check_args(args, world):
    if not args.scale >= 1:
        raise ValueError(f"--scale must be >= 1 (got {args.scale:g}): it is the factor by which the context grows")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (got {args.seq_len})")
    for name in ("steps", "batch_size", "micro_batch_size", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.batch_size % (world * args.micro_batch_size):
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {world} processes x --micro-batch-size "
                         f"{args.micro_batch_size}: pick a multiple of {world * args.micro_batch_size}")
    if args.keep < 0:
        raise ValueError(f"--keep must be >= 0 (got {args.keep}); 0 keeps every checkpoint")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")


# ----------------------------------------------------------------------------- data

def data_files(data):
    files = []
    for path in map(Path, data):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--data {path} does not exist")
    if not files:
        raise ValueError(f"--data {' '.join(data)} holds no .txt or .jsonl file")
    return files


def documents(files):
    for path in files:
        if path.suffix != ".jsonl":
            yield path.read_text(encoding="utf-8")
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{path}:{n} is not a JSON object with a \"text\" string") from None


def tokenize(files, tokenizer, tokenizer_key, cache_dir):
    """All documents as one stream of token ids [BOS doc EOS BOS doc EOS ...] (paper §4.1), tokenized once into a
    uint32 np.memmap cached under a name keyed by the tokenizer and the files' paths, sizes and mtimes."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([tokenizer_key, stats]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tokens-{key}.u32"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
        with open(tmp, "wb") as out:
            for doc in documents(files):
                np.array(tokenizer.encode(doc, bos=True, eos=True), dtype=np.uint32).tofile(out)
        os.replace(tmp, path)
    return np.memmap(path, dtype=np.uint32, mode="r") if path.stat().st_size else np.zeros(0, np.uint32), key


class Sequences:
    """The token stream cut into sequences of seq_len tokens, read as an endless stream of positions in which epoch
    e is a permutation of all sequences seeded by (seed, e). Step k's global batch is positions k·B .. k·B + B - 1
    whatever the number of processes, so a run gives the same result on 1 GPU or on 64 (up to float rounding)."""

    def __init__(self, tokens, seq_len, seed):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n = len(tokens) // seq_len
        self._epoch = (None, None)

    def __getitem__(self, position):
        epoch, i = divmod(position, self.n)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        start = int(self._epoch[1][i]) * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len].astype(np.int64))

    def batch(self, step, micro, rank, world, micro_batch_size, batch_size):
        """(inputs, targets) [micro_batch_size, seq_len] of one process's micro-batch; the last target is -100
        (ignored), so every token of the sequence is seen, as in the paper, and seq_len - 1 are predicted."""
        first = step * batch_size + (micro * world + rank) * micro_batch_size
        x = torch.stack([self[first + i] for i in range(micro_batch_size)])
        return x, torch.cat((x[:, 1:], torch.full_like(x[:, :1], -100)), dim=1)


def lr_at(step, args):
    """Linear warm-up over --warmup-steps (step 0 already trains, at lr/warmup; paper §4.1), then constant, or
    decaying linearly to 0 at --steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "linear":
        return args.lr * (args.steps - step) / max(1, args.steps - args.warmup_steps)
    return args.lr


# ----------------------------------------------------------------------------- speed and memory

def flops_per_token(cfg, seq_len):
    """Model FLOPs per trained token (PaLM, Chowdhery et al. 2022, App. B): 6·N for the N weights of every matmul
    (forward 2N, backward 4N; the head counts, the embedding lookup does not) plus 12·n_layers·n_heads·head_dim·T
    for the attention scores and values (counted in full, as PaLM does, though causal attention computes half).
    Recomputation under activation checkpointing is not counted: this is model FLOPs, for MFU."""
    attn = cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
    n = cfg.n_layers * (attn + 3 * cfg.dim * cfg.hidden_dim) + cfg.vocab_size * cfg.dim
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def matmul_tflops(device, dtype, n=None, seconds=1.0):
    """Measured TFLOP/s of an n x n matmul (2048 fp32 on CPU, 8192 on GPU): the peak that MFU is reported against."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        sync()
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def estimate_memory(cfg, seq_len, n_gpus, activation_checkpointing, micro_batch_size=1, loss_chunk=1024):
    """Estimated per-GPU memory in bytes of this script's training step, by part: FSDP2 shards the fp32 weights,
    fp32 gradients and AdamW's two fp32 moments over n_gpus (16 bytes per parameter); it all-gathers bf16 weights
    of a block at a time (two with prefetching; the root's embeddings and head stay gathered) and reduces one
    block's gradients in fp32. Activations: SDPA/flash attention keeps no T x T matrix, so per token and layer
    the block keeps its bf16 tensors for backward (the two normed inputs, q, k, v, rotated q and k, the attention
    output and its reshaped copy, the four SwiGLU tensors) plus the two fp32 RMSNorm inputs: 20·dim + 6·kv_dim +
    8·hidden_dim bytes. With activation checkpointing a layer keeps only its bf16 input and one layer at a time is
    recomputed. The loss holds fp32 logits for loss_chunk tokens at a time. Allocator fragmentation, temporary
    buffers and the CUDA context (a few GB) are not counted."""
    kv_dim, tokens = cfg.n_kv_heads * cfg.head_dim, seq_len * micro_batch_size
    block = 2 * cfg.dim + cfg.dim * (cfg.n_heads * cfg.head_dim * 2 + 2 * kv_dim) + 3 * cfg.dim * cfg.hidden_dim
    root = cfg.vocab_size * cfg.dim * (1 if cfg.tie_word_embeddings else 2) + cfg.dim
    layer_activations = tokens * (20 * cfg.dim + 6 * kv_dim + 8 * cfg.hidden_dim)
    if activation_checkpointing:
        activations = tokens * cfg.n_layers * 2 * cfg.dim + layer_activations
    else:
        activations = cfg.n_layers * layer_activations
    parts = {
        "sharded state": 16 * (cfg.n_layers * block + root) / n_gpus,
        "gathered": 2 * (2 * block + root) + 4 * (block + root),
        "activations": activations + tokens * 8 * cfg.dim,  # + the final norm and hidden states
        "loss": loss_chunk * cfg.vocab_size * 10,  # fp32 logits, their gradient, bf16 logits
    }
    return {**parts, "total": sum(parts.values())}


LLAMA2 = {  # Llama 2 shapes (Touvron et al. 2023), vocabulary 32000, trained at 4096 tokens
    "7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
}


def print_plan(n_gpus=8, gpu_gib=80):
    gib = 1024 ** 3
    print(f"ESTIMATED per-GPU memory (GiB) of YaRN fine-tuning with this script on {n_gpus} GPUs of {gpu_gib} GiB: "
          "FSDP2, bf16 compute, fp32 weights, gradients and AdamW moments sharded, flash attention, micro-batch 1, "
          "chunked loss, with activation checkpointing (AC) and without. A model of memory, not a measurement: see "
          "estimate_memory(); '*' marks totals over the GPU's memory.\n")
    print(f"{'model':>5} {'seq_len':>8} {'sharded':>8} {'gathered':>9} {'act (AC)':>9} {'total (AC)':>11} "
          f"{'total (no AC)':>14} {'GPUs needed (AC)':>17}")
    for name, shape in LLAMA2.items():
        cfg = LlamaConfig(**shape, vocab_size=32000, max_position_embeddings=4096)
        for seq_len in (16384, 32768, 65536, 131072):
            def gib_of(n, activation_checkpointing):
                return {k: v / gib for k, v in estimate_memory(cfg, seq_len, n, activation_checkpointing).items()}

            ac, no_ac = gib_of(n_gpus, True), gib_of(n_gpus, False)
            # more GPUs shrink the sharded state, not the activations (no sequence parallelism here)
            needed = next((n for n in range(n_gpus, 1025, n_gpus) if gib_of(n, True)["total"] <= gpu_gib), None)

            def total(m):
                return f"{m['total']:.0f}{'*' if m['total'] > gpu_gib else ''}"

            print(f"{name:>5} {seq_len:>8} {ac['sharded state']:>8.1f} {ac['gathered']:>9.1f} "
                  f"{ac['activations']:>9.1f} {total(ac):>11} {total(no_ac):>14} {needed or '-':>17}")


# ----------------------------------------------------------------------------- checkpoints

def replace_dir(tmp, dst):
    """Move the finished directory tmp to dst; an older dst is moved aside first and removed after."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def step_dirs(out_dir):
    return sorted((p for p in out_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name)),
                  key=lambda p: int(p.name[5:]))


def rng_states():
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def save_checkpoint(out_dir, step, model, optimizer, meta, keep):
    """Sharded checkpoint (torch.distributed.checkpoint, every rank writes its own shards, nothing is gathered)
    written into step_N.tmp and renamed to step_N once complete; then `latest` is replaced to name it."""
    rank, tmp, final = dist.get_rank(), out_dir / f"step_{step}.tmp", out_dir / f"step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save(rng_states(), tmp / f"rng_{rank}.pt")
    dist.barrier()
    if rank == 0:
        assets.write_json(tmp / "meta.json", meta)
        shutil.rmtree(final, ignore_errors=True)  # the same step, redone after a crash before `latest` moved
        os.replace(tmp, final)
        assets.write_atomic(out_dir / "latest", lambda f: f.write(final.name.encode()))
        for old in step_dirs(out_dir)[:-keep] if keep else []:
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(path, model, optimizer):
    """Load a step_N directory into the sharded model and optimizer (any number of processes may have written it);
    returns its meta.json. Any failure to read it is reported as a corrupt checkpoint; nothing on disk changes."""
    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to load into
    state = {"model": model_state, "optim": optim_state}
    try:
        meta = json.loads((path / "meta.json").read_text())
        dcp.FileSystemReader(path).read_metadata()  # fails on a bad .metadata before dcp.load logs tracebacks
        dcp.load(state, checkpoint_id=path)
        rng_file = path / f"rng_{dist.get_rank()}.pt"  # absent when resuming on more processes than saved it
        rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else rng_states()
    except (Exception, dcp.CheckpointException) as e:  # a truncated shard, a bad .metadata, a missing file
        if isinstance(e, dcp.CheckpointException):  # the first rank's own error says what is wrong
            e = next(iter(e.failures.values()))[0]
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: {why}); point "
                         f"{path.parent / 'latest'} at an older step_N, or start over with --overwrite") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta


def check_out_dir(out_dir, args):
    """A run never writes into another run's directory: without --overwrite, an existing non-empty --out-dir must be
    this run's (same run.json settings) and --resume must be given."""
    if args.overwrite or not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not args.resume:
        raise ValueError(f"{out_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --out-dir")
    if not (out_dir / "run.json").exists():
        raise ValueError(f"{out_dir} is not empty and has no run.json (no train.py run): choose another --out-dir")
    saved, now = json.loads((out_dir / "run.json").read_text()), run_settings(args)
    keys = RUN_KEYS + (("steps",) if args.lr_schedule == "linear" else ())
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in keys if saved.get(k) != now[k]]
    if changed:
        raise ValueError(f"{out_dir} holds a run with other settings ({', '.join(changed)}): resume it with its own "
                         "settings (see its run.json), or choose another --out-dir")


def run_settings(args):
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in ("plan", "export_hf")}))


# ----------------------------------------------------------------------------- export

HF_BLOCK_NAMES = {"attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj",
                  "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
                  "attention.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                  "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                  "feed_forward.w3": "mlp.up_proj"}
HF_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
HF_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
                "mscale_all_dim", "truncate")


def hf_rope(cfg):
    """(rope_theta, rope_scaling, max_position_embeddings) with which transformers computes our rotation."""
    s, mpe = cfg.rope_scaling, cfg.max_position_embeddings
    kind = s and s["rope_type"]
    if kind is None:
        return cfg.rope_theta, None, mpe
    if kind == "ntk":  # transformers has no static NTK-aware scaling: it is plain RoPE with the changed base
        return cfg.rope_theta * s["factor"] ** (cfg.head_dim / (cfg.head_dim - 2)), None, mpe
    if kind == "linear":
        return cfg.rope_theta, {"rope_type": "linear", "factor": s["factor"]}, mpe
    if kind == "dynamic":  # transformers grows from max_position_embeddings where we grow from the original length
        return cfg.rope_theta, {"rope_type": "dynamic", "factor": s["factor"]}, s["original_max_position_embeddings"]
    if kind in ("yarn", "ntk-by-parts"):  # NTK-by-parts is YaRN without the attention temperature
        scaling = {"rope_type": "yarn", **{k: s[k] for k in HF_YARN_KEYS if s.get(k) is not None}}
        if kind == "ntk-by-parts":
            scaling["attention_factor"] = 1.0
        # some transformers versions derive the factor from max_position_embeddings / original: keep them equal
        return cfg.rope_theta, scaling, round(s["factor"] * s["original_max_position_embeddings"])
    if kind == "llama3":
        return cfg.rope_theta, {"rope_type": "llama3", "factor": s["factor"],
                                "original_max_position_embeddings": s["original_max_position_embeddings"],
                                "low_freq_factor": s.get("low_freq_factor", 1.0),
                                "high_freq_factor": s.get("high_freq_factor", 4.0)}, mpe
    raise ValueError(f"transformers has no {kind} RoPE scaling, so this checkpoint cannot be exported; fine-tune "
                     "with --rope yarn (dynamic-yarn equals yarn up to the fine-tuned length)")


def export_hf(model_dir, out_dir):
    """Write a checkpoint directory (config.json + model.safetensors) as a Hugging Face LlamaForCausalLM directory:
    the same tensors under transformers' names (our rotary layout is already HF's), a config.json with
    rope_theta + rope_scaling in the shape transformers reads, and the tokenizer files copied as they are (transformers
    reads a SentencePiece tokenizer.model or a tokenizer.json, not a tiktoken one)."""
    from safetensors.torch import load_file, save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = LlamaConfig.from_checkpoint(model_dir)
    rope_theta, rope_scaling, max_position_embeddings = hf_rope(cfg)
    state = {}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        parts = name.split(".")
        if parts[0] == "layers":
            state[f"model.layers.{parts[1]}.{HF_BLOCK_NAMES['.'.join(parts[2:-1])]}.weight"] = tensor
        else:
            state[f"{HF_NAMES[parts[0]]}.weight"] = tensor
    hf_config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": max_position_embeddings,
        "rope_theta": rope_theta, "rope_scaling": rope_scaling, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
    }
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    copy_tokenizer(model_dir, tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def copy_tokenizer(src, dst):
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)


def safetensors_dtype(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_slice(next(iter(f.keys())))[:1].dtype


# ----------------------------------------------------------------------------- training

def main():
    args = get_args()
    if args.plan:
        return print_plan()
    if args.export_hf:
        return print(f"wrote {export_hf(*args.export_hf)}")
    check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # torchrun
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # `python train.py`: the same code path, as a group of one
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        train(args, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def train(args, device):
    rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if args.model is None or args.data is None:  # the defaults, fetched once per node by its local rank 0
        if local_rank != 0:
            dist.barrier()
        args.model = args.model or str(assets.ensure_smollm2())
        args.data = args.data or [str(p) for p in assets.ensure_books()]
        if local_rank == 0:
            dist.barrier()
    out_dir, src = Path(args.out_dir), Path(args.model)
    check_out_dir(out_dir, args)
    torch.manual_seed(args.seed)

    # the model to fine-tune, and the scaling it is fine-tuned with
    config = LlamaConfig.from_checkpoint(src)
    original = (config.rope_scaling or {}).get("original_max_position_embeddings") or config.max_position_embeddings
    seq_len = args.seq_len or round(args.scale * original)
    scaling = {"rope_type": args.rope, "factor": args.scale, "original_max_position_embeddings": original,
               **{k: getattr(args, k) for k in ("beta_fast", "beta_slow") if getattr(args, k) is not None}}
    config = dataclasses.replace(config, rope_scaling=scaling, max_position_embeddings=round(args.scale * original))
    ac = seq_len >= AC_MIN_SEQ_LEN if args.activation_checkpointing is None else args.activation_checkpointing

    # data: tokenized once per node, then every process reads the shared memmap
    tokenizer = Tokenizer.from_pretrained(src)
    files = data_files(args.data)
    tokenizer_key = [hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(src.iterdir())
                     if f.is_file() and f.name not in ("model.safetensors", "config.json")]
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError(f"the tokenizer of {src} has no BOS or EOS token, which bookend every document")
    cached = (files, tokenizer, tokenizer_key, args.cache_dir)
    if local_rank == 0:
        tokenize(*cached)
    dist.barrier()
    tokens, data_key = tokenize(*cached)
    data = Sequences(tokens, seq_len, args.seed)
    if data.n == 0:
        raise ValueError(f"--data has {len(tokens):,} tokens, fewer than one training sequence of {seq_len:,}: add "
                         "text, or lower --seq-len")
    accum = args.batch_size // (world * args.micro_batch_size)

    # FSDP2 in torchtitan's order: activation checkpointing, compile, shard each block, then the root (embeddings,
    # final norm and head; with tied embeddings the one weight is both, and it lives in the root)
    with torch.device("meta"):
        model = Llama(config)
    model.activation_checkpointing = ac
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for i, block in enumerate(model.layers):
        if args.compile:  # a wrapper, so that FSDP2's hooks stay outside the compiled graph
            model.layers[i] = block = torch.compile(block)
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "nll")  # model.nll, not model(), is what training calls
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")  # nll's output is only summed
    model.to_empty(device=device)
    # fp32 master weights: rank 0 reads the checkpoint, every rank receives its shard
    save_dtype = safetensors_dtype(src / "model.safetensors")
    full = Llama.from_pretrained(src, dtype=save_dtype, device="cpu").state_dict() if rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.adam_betas),
                                  weight_decay=args.weight_decay)

    start = 0
    if args.resume and (out_dir / "latest").exists():
        meta = load_checkpoint(out_dir / (out_dir / "latest").read_text().strip(), model, optimizer)
        if meta["data"] != data_key:
            raise ValueError(f"the data changed since {out_dir} was checkpointed (its files, sizes or mtimes differ): "
                             "resume with the same --data, or start a new run")
        start = meta["step"]
    if rank == 0:
        if args.overwrite:
            shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        assets.write_json(out_dir / "run.json", run_settings(args))
        log_path = out_dir / "log.jsonl"  # keep the lines up to the step we resume from
        lines = log_path.read_text().splitlines() if start and log_path.exists() else []
        kept = "".join(line + "\n" for line in lines if json.loads(line)["step"] <= start)
        assets.write_atomic(log_path, lambda f: f.write(kept.encode()))
        n_params = sum(p.numel() for p in model.parameters())
        tokens_per_step = args.batch_size * seq_len
        print(f"{src}: {n_params / 1e6:.1f}M parameters, rope_scaling {config.rope_scaling}\n"
              f"{world} processes x micro-batch {args.micro_batch_size} x {accum} accumulation = {args.batch_size} "
              f"sequences of {seq_len:,} tokens per step ({tokens_per_step:,} tokens), activation checkpointing "
              f"{'on' if ac else 'off'}, {device.type}\ndata: {len(tokens):,} tokens, {data.n:,} sequences; "
              f"{args.steps} steps read {args.steps * args.batch_size / data.n:.2f} epochs "
              f"(each epoch a new seeded permutation)" + (f"\nresuming after step {start}" if start else ""))
    dist.barrier()

    peak = args.peak_tflops or (matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
                                if rank == 0 else 0)
    flops = flops_per_token(config, seq_len)
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, unit="step", dynamic_ncols=True)
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = (t.to(device) for t in data.batch(step, micro, rank, world, args.micro_batch_size, args.batch_size))
            # mean over this process's tokens; FSDP2 averages gradients over processes: the global mean token nll
            loss = model.nll(x, y).sum() / (accum * args.micro_batch_size * (seq_len - 1))
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a sharded norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / world
        dt = time.perf_counter() - t0
        tokens_per_s = args.batch_size * seq_len / dt
        if rank == 0:
            mfu = flops * tokens_per_s / world / (peak * 1e12)
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens": (step + 1) * args.batch_size * seq_len, "tokens_per_s": tokens_per_s, "mfu": mfu,
                      "peak_tflops": peak, "seconds": dt}
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
        bar.update()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            meta = {"step": step + 1, "lr": lr, "sequences_read": (step + 1) * args.batch_size, "data": data_key,
                    "world_size": world}
            save_checkpoint(out_dir, step + 1, model, optimizer, meta, args.keep)
    bar.close()

    # the final model: gathered on rank 0 (on CPU), saved for Llama.from_pretrained with the scaling it was trained
    # with in its config.json, and exported for transformers
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        final_config = dataclasses.replace(config, rope_scaling={**config.rope_scaling, "finetuned": True})
        with torch.device("meta"):
            final = Llama(final_config)
        final.load_state_dict({k: v.to(save_dtype) for k, v in full.items()}, assign=True)
        tmp = out_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        final.save_pretrained(tmp)
        copy_tokenizer(src, tmp)
        replace_dir(tmp, out_dir / "final")
        print(f"wrote {out_dir / 'final'} (for Llama.from_pretrained)")
        try:
            print(f"wrote {export_hf(out_dir / 'final', out_dir / 'hf')} (for transformers)")
        except ValueError as e:  # a RoPE variant that transformers lacks
            print(f"no {out_dir / 'hf'}: {e}")
    dist.barrier()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        # Checks fail the same way on every process, and torchrun stops them all once one exits: the others give
        # rank 0 time to say it once (and still say it, later, when rank 0 did not fail)
        if int(os.environ.get("RANK", 0)) != 0:
            time.sleep(30)
        sys.exit(f"train.py: error: {e}")
