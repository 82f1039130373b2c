"""YaRN fine-tuning, the paper's recipe (Peng et al., arXiv 2309.00071, §4.1), with FSDP2.

The paper extended Llama 2 7B and 13B from 4k to 64k tokens (YaRN s = 16) by fine-tuning 400 steps on PG19 cut into
64k-token sequences, each document bookended by BOS and EOS: global batch 64, AdamW β = (0.9, 0.95), lr 2e-5 after
20 linear warm-up steps, no weight decay, PyTorch FSDP and FlashAttention 2. Those are this script's defaults (the lr
then stays constant, as the paper says; its reference code decayed it linearly by default: --lr-schedule linear).
The recipe is `scaled_config` (what changes in the model) and `train_step` (one optimizer step); the rest is
machinery: the data (`Sequences`), the sharded model (`build_model`), the run folder and its checkpoints
(checkpoint.py). The
same code runs as `python train.py` (one process, CPU or one GPU), under `torchrun` on one node, and on many.

    # The paper's runs, as its reference run script made them (docs/method.md, "The recipe"):
    # Llama 2 7B, 4k -> 64k (s = 16): 400 steps on 64k-token sequences
    torchrun --nproc_per_node=8 train.py --scale 16 --model checkpoints/llama-2-7b --data pg19/ --out-dir runs/7b-64k
    # Llama 2 7B, 64k -> 128k (s = 32): 200 more steps from the 64k model on the same 64k-token sequences
    torchrun --nproc_per_node=8 train.py --scale 32 --seq-len 65536 --steps 200 --seed 31337 \\
        --model runs/7b-64k/final --data pg19/ --out-dir runs/7b-128k
    # Llama 2 70B, 4k -> 32k (s = 8): 8k-token sequences, lr 1e-5 constant after the warm-up
    torchrun ... train.py --scale 8 --seq-len 8192 --lr 1e-5 --model checkpoints/llama-2-70b --data pg19/ ...
    # Mistral 7B, 8k -> 64k (s = 8): 16k-token sequences, lr 1e-6, 1000 steps, the reference's beta_fast/slow
    torchrun ... train.py --scale 8 --original-max-position-embeddings 8192 --seq-len 16384 --lr 1e-6 --steps 1000 \\
        --beta-fast 128 --beta-slow 2 --model checkpoints/mistral-7b --data long-data/ --out-dir runs/mistral-64k
    # on a CPU: SmolLM2-135M (the default model, 8k context) to 16k, trained on 1024-token sequences
    python train.py --scale 2 --seq-len 1024 --batch-size 4 --steps 10 --warmup-steps 2 --out-dir runs/smollm2-cpu
    # after an interruption, the same command with --resume continues exactly as if it had never stopped
    torchrun --nproc_per_node=8 train.py ... --resume

--out-dir receives run.json (the arguments), log.jsonl (one line per step), step_N/ (sharded checkpoints of the
model, optimizer, step, data position and RNG states; the newest --keep are kept), latest (the newest step_N's name),
final/ (a checkpoint for checkpoint.load_model whose config.json records the scaling, so evals need no flags), and
hf/ (the same model for Hugging Face transformers, written by convert_llama.py).
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy
from tqdm import tqdm

import rope
from checkpoint import (RunFolderLock, check_out_dir, copy_tokenizer, load_config, load_model, open_run_folder, resume,
                        save_checkpoint, save_model, weights_dtype)
from common import (DEFAULT_CHECKPOINT, ArgumentParser, add_dtype_arg, check_not_an_input, cli, compute_dtype,
                    document_files, dtype_reason, is_within, keep_freed_memory, matmul_peak, model_flops, number,
                    peak_memory, read_documents, shard, write_atomic, write_dir_atomic)
from model import Llama
from tools import assets
from tokenizer import Tokenizer

DEFAULT_DATA = assets.FINE_TUNING_BOOKS  # fetched on first use; disjoint from eval_ppl.py's default books
AC_MIN_SEQ_LEN = 4096  # activation checkpointing is on by default from this sequence length


def get_args(argv=None):
    p = ArgumentParser(__file__, __doc__)
    arg = p.add_argument
    positive, non_negative = number(int, min=1), number(int, min=0)
    arg("--model", help=f"checkpoint directory to fine-tune, as convert_llama.py writes (default: {DEFAULT_CHECKPOINT},"
                        " SmolLM2-135M)")
    arg("--data", nargs="+", help=".txt files (one document each), .jsonl files (one {\"text\": ...} document per "
                                  "line) or folders of them (default: botchan, lcet10 and plrabn12 of "
                                  "tools/assets.py; the evals' default books, alice29 and asyoulik, are held out)")
    arg("--out-dir", default="runs/yarn", help="checkpoints, log and final model (default: %(default)s)")
    arg("--scale", type=number(float, min=1), default=16.0, help="s, the context extension factor (YaRN's `factor`) "
        "over the original context L (default: %(default)s)")
    arg("--rope", default="yarn", choices=[t for t in rope.TYPES if t not in ("default", "longrope")],
        help="RoPE scaling to fine-tune with; the others are for ablations, linear = PI (default: %(default)s)")
    arg("--original-max-position-embeddings", type=positive, metavar="L", help="the context the model was "
        "pre-trained at (default: the checkpoint's; Mistral 7B's reference runs use 8192)")
    arg("--seq-len", type=number(int, min=2), help="tokens per training sequence (default: scale x L)")
    arg("--pose", action="store_true", help="PoSE (Zhu et al. 2023): give each --seq-len sequence position ids that "
        "skip at random across scale x L, so that short windows train the whole context")
    arg("--beta-fast", type=number(float, above=0), help="YaRN/NTK-by-parts β (default: 32; Mistral's reference: 128)")
    arg("--beta-slow", type=number(float, above=0), help="YaRN/NTK-by-parts α (default: 1; Mistral's reference: 2)")
    arg("--steps", type=positive, default=400, help="optimizer steps; with a constant lr, --resume may raise it "
                                                    "(default: %(default)s)")
    arg("--batch-size", type=positive, default=64, help="global batch in sequences = processes x --micro-batch-size "
                                                        "x gradient accumulation steps (default: %(default)s)")
    arg("--micro-batch-size", type=positive, default=1, help="sequences per forward/backward (default: %(default)s)")
    arg("--lr", type=number(float, above=0), default=2e-5, help="learning rate; the paper's 70B used 1e-5, Mistral "
                                                                "1e-6 (default: %(default)s)")
    arg("--warmup-steps", type=non_negative, default=20, help="linear warm-up steps (default: %(default)s)")
    arg("--lr-schedule", choices=["constant", "linear"], default="constant", help="after warm-up: constant (the "
        "paper), or linear decay to 0 at --steps (its reference code's default) (default: %(default)s)")
    arg("--adam-betas", type=number(float, min=0, max=0.9999), nargs=2, default=[0.9, 0.95],
        metavar=("BETA1", "BETA2"), help="AdamW's betas (default: 0.9 0.95)")
    arg("--weight-decay", type=number(float, min=0), default=0.0, help="AdamW's, on every weight (default: 0)")
    arg("--grad-clip", type=number(float, min=0), default=1.0, help="clip the global gradient norm to this, 0: off; "
        "the paper gives no value and its reference code's --grad-norm flag never clipped (default: %(default)s)")
    add_dtype_arg(p)
    arg("--activation-checkpointing", action=argparse.BooleanOptionalAction,
        help=f"recompute each block in backward (default: on when seq_len >= {AC_MIN_SEQ_LEN})")
    arg("--compile", action="store_true", help="torch.compile each block")
    arg("--save-every", type=positive, default=50, help="checkpoint every this many steps (default: %(default)s)")
    arg("--keep", type=non_negative, default=2, help="keep this many newest checkpoints, 0: all (default: %(default)s)")
    arg("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    arg("--overwrite", action="store_true", help="replace whatever --out-dir holds")
    arg("--seed", type=int, default=42, help="seeds the order in which sequences are read, as the reference's "
                                             "(default: %(default)s)")
    arg("--cache-dir", default="data/cache", help="where tokenized data is cached (default: %(default)s)")
    arg("--peak-tflops", type=number(float, above=0), help="peak TFLOP/s of one process, for MFU (default: a "
                                                           "measured matmul of the compute dtype)")
    return p.parse_args(argv)


def check_args(args, world):
    """Checks that need more than one flag, made before anything is loaded or written."""
    if args.batch_size % (world * args.micro_batch_size):
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {world} processes x --micro-batch-size "
                         f"{args.micro_batch_size}: pick a multiple of {world * args.micro_batch_size}")
    if args.warmup_steps > args.steps:
        raise ValueError(f"--warmup-steps {args.warmup_steps} is more than --steps {args.steps}: the run would end "
                         f"before the lr reaches --lr. Give --warmup-steps {args.steps} or fewer; to train part of a "
                         "longer run, give its full --steps and stop it when you like (--resume continues it)")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    rope.parse_rope_scaling(scaling_of(args, 1))  # a bad --beta-fast fails now, not after loading
    out_dir = Path(args.out_dir)
    for flag, paths in (("--model", [args.model or DEFAULT_CHECKPOINT]), ("--data", args.data or DEFAULT_DATA)):
        for path in paths:
            if args.overwrite and is_within(path, out_dir):
                raise ValueError(f"{flag} {path} lies inside --out-dir {out_dir}, which --overwrite would delete")
            check_not_an_input(out_dir, "--out-dir", [(flag, path)])


def check_seq_len(seq_len, config):
    """--seq-len past s x L would train positions beyond the context the scaled model is built for (its
    max_position_embeddings), where its RoPE scaling was never meant to reach."""
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len:,} is longer than s x L = {config.max_position_embeddings:,} tokens, the "
                         "context the scaled model is built for: lower --seq-len, or raise --scale")


# ----------------------------------------------------------------------------- the recipe

def scaling_of(args, original):
    """The RoPE scaling fine-tuned with: YaRN with factor s over the original context L (paper §4.1)."""
    betas = {k: getattr(args, k) for k in ("beta_fast", "beta_slow") if getattr(args, k) is not None}
    return {"rope_type": args.rope, "factor": args.scale, "original_max_position_embeddings": original, **betas}


def scaled_config(config, args):
    """The checkpoint's config with the scaling it is fine-tuned with, and max_position_embeddings s·L."""
    original = args.original_max_position_embeddings or config.original_max_position_embeddings
    return dataclasses.replace(config, rope_scaling=scaling_of(args, original),
                               max_position_embeddings=round(args.scale * original))


def lr_at(step, args):
    """Linear warm-up over --warmup-steps (step 0 already trains, at lr/warmup), then constant, or decaying
    linearly to 0 at --steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "linear":
        return args.lr * (args.steps - step) / max(1, args.steps - args.warmup_steps)
    return args.lr


def pose_position_ids(seq_len, context, rng):
    """PoSE (Zhu et al. 2023, arXiv 2309.10400, §3.2): position ids [seq_len] for a window of seq_len tokens that
    span `context` (s·L) positions. As the paper's runs and its code (train_pose.py): two chunks, the first of
    length l uniform in 1..ceil(seq_len/2) at 0..l-1, the second (the remainder) at l+u .. seq_len-1+u with the skip
    u uniform in 0..context-seq_len; so the last id is below `context`, and with seq_len = context, u = 0."""
    first = int(rng.integers(1, (seq_len + 1) // 2, endpoint=True))
    skip = int(rng.integers(0, context - seq_len, endpoint=True))
    ids = torch.arange(seq_len)
    ids[first:] += skip
    return ids


def train_step(model, optimizer, data, step, args, log):
    """One optimizer step over one global batch of --batch-size sequences, accumulated over micro-batches: forward,
    loss, backward, clip the gradient norm, set the lr, AdamW step, log."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), next(model.parameters()).device
    accum = args.batch_size // (world * args.micro_batch_size)
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        where = (step, micro, rank, world, args.micro_batch_size, args.batch_size)
        x, y = (t.to(device) for t in data.batch(*where))
        positions = data.position_ids(*where)  # --pose: PoSE's, skipping across s·L; else None (0..seq_len-1)
        # mean over this process's tokens; FSDP2 averages gradients over processes: the global mean nll
        loss = model.nll(x, y, positions=positions).sum() / (accum * args.micro_batch_size * (data.seq_len - 1))
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # sharded: the global
    lr = lr_at(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(loss_sum)
    log(step, loss_sum.item() / world, lr, grad_norm.item(), time.perf_counter() - start)


def train(model, optimizer, data, args, start, log):
    """Steps start .. --steps - 1, with a sharded checkpoint every --save-every steps and after the last."""
    for step in range(start, args.steps):
        train_step(model, optimizer, data, step, args, log)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            meta = {"step": step + 1, "sequences_read": (step + 1) * args.batch_size, "data": data.key,
                    "world_size": dist.get_world_size()}
            save_checkpoint(Path(args.out_dir), step + 1, model, optimizer, meta, args.keep)


# ----------------------------------------------------------------------------- data

def tokenize(files, tokenizer, tokenizer_key, cache_dir):
    """All documents as one stream of token ids [BOS doc EOS BOS doc EOS ...] (paper §4.1), tokenized once into a
    uint32 np.memmap cached under a name keyed by the tokenizer and the files' contents (sha256 of their bytes), with
    its own size and sha256 recorded beside it: a cache file that does not match them is tokenized again."""
    key = hashlib.sha256(json.dumps([tokenizer_key, [assets.sha256(f) for f in files]]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tokens-{key}.u32"
    if not assets.is_intact(path):
        def write(tmp):
            with open(tmp, "wb") as out:
                for _, text in read_documents(files):
                    np.array(tokenizer.encode(text, bos=True, eos=True), dtype=np.uint32).tofile(out)
        write_atomic(path, write)
        assets.write_record(path)
    return np.memmap(path, dtype=np.uint32, mode="r") if path.stat().st_size else np.zeros(0, np.uint32), key


class Sequences:
    """The token stream cut into sequences of seq_len tokens, read as an endless stream of positions in which epoch
    e is a permutation of all sequences seeded by (seed, e). Step k's global batch is positions k·B .. k·B + B - 1
    whatever the number of processes, so a run gives the same result on 1 GPU or on 64 (up to float rounding)."""

    def __init__(self, tokens, key, seq_len, seed, pose_context=None):
        self.tokens, self.seq_len, self.seed, self.key = tokens, seq_len, seed, key
        self.pose_context = pose_context  # s·L with --pose: position ids skip across it (position_ids)
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

    def position_ids(self, step, micro, rank, world, micro_batch_size, batch_size):
        """The position ids [micro_batch_size, seq_len] of batch()'s sequences: None (0..seq_len-1) without PoSE;
        with it, each sequence's own draw (pose_position_ids) seeded by (seed, its position in the stream), so that
        a resumed run and a run on any number of processes give every sequence the same ids. (The trailing 1 keeps
        these seeds apart from the epochs' [seed, e], which numpy pads with zeros: [seed, 1, 0] equals [seed, 1].)"""
        if self.pose_context is None:
            return None
        first = step * batch_size + (micro * world + rank) * micro_batch_size
        return torch.stack([pose_position_ids(self.seq_len, self.pose_context, np.random.default_rng([self.seed, p, 1]))
                            for p in range(first, first + micro_batch_size)])


def load_data(args, src, vocab_size, seq_len, pose_context=None):
    """Sequences of --data tokenized with the model's tokenizer: once per node, then every process reads the shared
    memmap. pose_context: s·L with --pose (Sequences.position_ids)."""
    tokenizer = Tokenizer.from_pretrained(src)
    tokenizer.check_fits(vocab_size, src)
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError(f"the tokenizer of {src} has no BOS or EOS token, which bookend every document")
    tokenizer_key = [hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(src.iterdir())
                     if f.is_file() and f.name not in ("model.safetensors", "config.json")]
    cached = (document_files(args.data), tokenizer, tokenizer_key, args.cache_dir)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        tokenize(*cached)
    dist.barrier()
    data = Sequences(*tokenize(*cached), seq_len=seq_len, seed=args.seed, pose_context=pose_context)
    if data.n == 0:
        raise ValueError(f"--data has {len(data.tokens):,} tokens, fewer than one training sequence of {seq_len:,}: "
                         "add text, or lower --seq-len")
    return data


# ----------------------------------------------------------------------------- the model, sharded

def build_model(config, src, args, device, seq_len):
    """The scaled model with fp32 master weights, sharded over the processes, computing in --dtype (FSDP2's
    MixedPrecisionPolicy: bf16 parameters and activations, gradients reduced in fp32, as on GPUs)."""
    with torch.device("meta"):
        model = Llama(config)
    use_ac = args.activation_checkpointing
    model.activation_checkpointing = seq_len >= AC_MIN_SEQ_LEN if use_ac is None else use_ac
    dtype = compute_dtype(args.dtype, device)
    # cast_forward_inputs=False: each block receives the fp32 RoPE tables as they are (the hidden states are already
    # in `dtype`), so that the rotation stays in fp32 as model.py says
    mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if dtype != torch.float32 else MixedPrecisionPolicy()
    shard(model, mp_policy, args.compile)
    model.to_empty(device=device)
    # rank 0 reads the checkpoint, every rank receives its shard (cast to fp32)
    full = load_model(src, device="cpu").state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, dtype


def save_final(model, config, src, out_dir, training):
    """The trained model, gathered on rank 0 (on CPU) in the source checkpoint's dtype: final/ for
    checkpoint.load_model, with the scaling it was trained with in its config.json (and, under "training", settings
    that change no inference: --pose, --seq-len), and hf/ for transformers."""
    import convert_llama

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        dtype = weights_dtype(src)
        with torch.device("meta"):
            final = Llama(dataclasses.replace(config, rope_scaling={**config.rope_scaling, "finetuned": True}))
        final.load_state_dict({k: v.to(dtype) for k, v in full.items()}, assign=True)
        write_dir_atomic(out_dir / "final", lambda tmp: (save_model(final, tmp, extra={"training": training}),
                                                         copy_tokenizer(src, tmp)), force=True)
        print(f"wrote {out_dir / 'final'} (for checkpoint.load_model)")
        try:
            print(f"wrote {convert_llama.convert(out_dir / 'final', out_dir / 'hf', force=True)} (for transformers)")
        except ValueError as e:  # a RoPE variant that transformers lacks
            print(f"no {out_dir / 'hf'}: {e}")
    dist.barrier()


# ----------------------------------------------------------------------------- putting it together

def run(args, device):
    """Load and check everything, then train and save; nothing is written to --out-dir before everything has
    loaded."""
    fetch_defaults(args)
    out_dir, src = Path(args.out_dir), Path(args.model)
    start = check_out_dir(out_dir, args)
    torch.manual_seed(args.seed)
    config = scaled_config(load_config(src), args)
    seq_len, context = args.seq_len or config.max_position_embeddings, config.max_position_embeddings
    if args.pose and seq_len > context:
        raise ValueError(f"--pose trains on windows no longer than s x L = {context:,}, the context its position ids "
                         f"span: --seq-len {seq_len:,} is longer; lower it")
    check_seq_len(seq_len, config)
    data = load_data(args, src, config.vocab_size, seq_len, context if args.pose else None)
    model, dtype = build_model(config, src, args, device, seq_len)
    # fused: one kernel updates every parameter (the default on CPU is a loop of ~10 ops per parameter tensor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.adam_betas),
                                  weight_decay=args.weight_decay, fused=True)
    if start:
        resume(out_dir, model, optimizer, data.key)
    if dist.get_rank() == 0:
        open_run_folder(out_dir, args, start)
        print_plan(args, src, config, model, data, seq_len, dtype, device, start)
    dist.barrier()
    with StepLog(args, config, seq_len, dtype, device, start) as log:
        train(model, optimizer, data, args, start, log)
    save_final(model, config, src, out_dir, {"pose": args.pose, "seq_len": seq_len, "scale": args.scale,
                                             "rope": args.rope})


def fetch_defaults(args):
    """The default model (SmolLM2-135M) and books, fetched once per node by its local rank 0."""
    if args.model is None or args.data is None:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            import convert_llama
            convert_llama.default_checkpoint()
            assets.ensure_books()
        dist.barrier()
        args.model = args.model or DEFAULT_CHECKPOINT
        args.data = args.data or DEFAULT_DATA


def print_plan(args, src, config, model, data, seq_len, dtype, device, start):
    world = dist.get_world_size()
    print(f"{src}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, rope_scaling "
          f"{config.rope_scaling}, max_position_embeddings {config.max_position_embeddings}\n{world} processes x "
          f"micro-batch {args.micro_batch_size} x {args.batch_size // (world * args.micro_batch_size)} "
          f"accumulation = {args.batch_size} sequences of {seq_len:,} tokens per step"
          + (f" (PoSE: position ids spread over {config.max_position_embeddings:,})" * args.pose)
          + ", activation checkpointing "
          f"{'on' if model.activation_checkpointing else 'off'}, {device.type}\ndtype: "
          f"{dtype_reason(args.dtype, device)}\ndata: {len(data.tokens):,} tokens, {data.n:,} sequences; "
          f"{args.steps} steps read {args.steps * args.batch_size / data.n:.2f} epochs"
          + (f"\nresuming after step {start}" * bool(start)))


def check_step_finite(step, loss, grad_norm, out_dir):
    """Stop on a step whose loss or gradient norm is NaN or infinite (every process sees the same global values): the
    weights it updated are lost, nothing of it is logged or saved, and the checkpoints written before it stay."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise ValueError(f"step {step + 1}: the loss is {loss} and the gradient norm {grad_norm}: training diverged "
                         f"and stops; nothing of this step is saved, and the checkpoints of {out_dir} written before "
                         "it stay. Lower --lr or raise --warmup-steps, in a new --out-dir")


class StepLog:
    """log(step, loss, lr, grad_norm, seconds): on rank 0, one log.jsonl line per step and the progress bar, with
    tokens/s and MFU (model FLOPs, common.model_flops, over the measured matmul peak of the compute dtype). A peak
    below what a step achieves (measured while the machine was busy, or a wrong --peak-tflops) is raised to it, with
    a note, so MFU never exceeds 100%. A step whose loss or gradient norm is not finite stops the run
    (check_step_finite)."""

    def __init__(self, args, config, seq_len, dtype, device, start):
        self.rank0, self.world, self.path = dist.get_rank() == 0, dist.get_world_size(), Path(args.out_dir) / "log.jsonl"
        self.peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(dtype, device) if self.rank0 else 0
        self.device = device
        self.step_flops = 3 * model_flops(config, seq_len) * args.batch_size
        self.tokens_per_step = args.batch_size * seq_len
        self.bar = tqdm(total=args.steps, initial=start, disable=not self.rank0, unit="step", dynamic_ncols=True)

    def __call__(self, step, loss, lr, grad_norm, seconds):
        check_step_finite(step, loss, grad_norm, self.path.parent)
        if self.rank0:
            achieved = self.step_flops / seconds / self.world
            if achieved > self.peak:
                self.bar.write(f"MFU: step {step + 1} ran at {achieved / 1e12:.3g} TFLOP/s, above the peak it is "
                               f"measured against ({self.peak / 1e12:.3g}): the peak is raised to it, and MFU "
                               "figures are unreliable (the machine was busy when the peak was measured?)")
                self.peak = achieved
            mfu = achieved / self.peak
            record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": (step + 1) * self.tokens_per_step, "tokens_per_s": self.tokens_per_step / seconds,
                      "mfu": mfu, "peak_tflops": self.peak / 1e12, "seconds": seconds,
                      "peak_memory_bytes": peak_memory(self.device)}  # this process, so far
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                 mfu=f"{mfu:.1%}")
        self.bar.update()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.bar.close()


def main(argv=None):
    args = get_args(argv)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        # the same checks would fail on every process; made on rank 0 alone, the error is said once, and torchrun
        # stops the others (waiting for rank 0 at the rendezvous below) when rank 0 exits
        check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    lock = RunFolderLock(Path(args.out_dir)) if rank == 0 else None  # one run per --out-dir, for the run's life
    keep_freed_memory()  # every step frees and allocates the same big tensors again: no page faults for them
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # torchrun
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # `python train.py`: the same code path, as a group of one
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        run(args, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
    except (ValueError, OSError) as e:
        raise type(e)(f"rank {rank}: {e}") if rank else e from None
    finally:
        dist.destroy_process_group()
        if lock:
            lock.release()


if __name__ == "__main__":
    cli(main)
