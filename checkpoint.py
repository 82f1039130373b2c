"""The run directory of train.py: sharded checkpoints that resume exactly, and the rules that keep a run from
writing into another run's directory or losing its own.

    step_N/     torch.distributed.checkpoint shards of the model and optimizer (each process writes its own; any
                number of processes can read them back), meta.json (step, data key) and rng_RANK.pt
    latest      the name of the newest complete step_N (written last, atomically)
    run.json    the settings; --resume must repeat those that change the numbers (RUN_KEYS)
    log.jsonl   one line per step
A step_N is written as step_N.tmp and renamed once every process has finished, so a kill at any point leaves the
previous checkpoint as `latest`.
"""
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from common import write_atomic, write_json

# run.json keys that --resume must match: what changes the numbers (--steps too when the lr decays towards it)
RUN_KEYS = ("model", "data", "scale", "rope", "original_max_position_embeddings", "seq_len", "beta_fast",
            "beta_slow", "batch_size", "micro_batch_size", "lr", "warmup_steps", "lr_schedule", "adam_betas",
            "weight_decay", "grad_clip", "seed", "dtype")


def step_dirs(out_dir):
    return sorted((p for p in out_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name)),
                  key=lambda p: int(p.name[5:]))


def rng_states():
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def save_checkpoint(out_dir, step, model, optimizer, meta, keep):
    """Sharded checkpoint (torch.distributed.checkpoint: every rank writes its own shards, nothing is gathered)
    written into step_N.tmp and renamed to step_N once complete; then `latest` is replaced to name it."""
    rank, tmp, final = dist.get_rank(), out_dir / f"step_{step}.tmp", out_dir / f"step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    dist.barrier()
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        torch.save(rng_states(), tmp / f"rng_{rank}.pt")
    except (dcp.api.CheckpointException, RuntimeError) as e:  # a full disk, most often, which torch.save reports
        free = shutil.disk_usage(out_dir).free / 2 ** 20       # as "unexpected pos": say how much room was left
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(cause(e), KeyboardInterrupt):  # Ctrl-C during the write, which dcp wraps like any error
            raise KeyboardInterrupt from None
        raise OSError(f"cannot write checkpoint {tmp} ({first_line(e)}); {free:.0f} MiB free on its disk") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    if rank == 0:
        write_json(tmp / "meta.json", meta)
        shutil.rmtree(final, ignore_errors=True)  # the same step, redone after a crash before `latest` moved
        os.replace(tmp, final)
        write_atomic(out_dir / "latest", lambda path: path.write_text(final.name))
        for old in step_dirs(out_dir)[:-keep] if keep else []:
            shutil.rmtree(old)
    dist.barrier()


def cause(e):
    """The first rank's own exception inside one that dcp gathered from all ranks; it says what is wrong."""
    return next(iter(e.failures.values()))[0] if isinstance(e, dcp.api.CheckpointException) else e


def first_line(e):
    e = cause(e)
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


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
    except (Exception, dcp.api.CheckpointException) as e:  # a truncated shard, a bad .metadata, a missing file
        if isinstance(cause(e), KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise ValueError(f"checkpoint {path} is corrupt or incomplete ({first_line(e)}); point "
                         f"{path.parent / 'latest'} at an older step_N, or start over with --overwrite") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta


def run_settings(args):
    return json.loads(json.dumps(vars(args)))


def check_out_dir(out_dir, args):
    """A run never writes into another run's directory: without --overwrite, an existing non-empty --out-dir must be
    this run's (same run.json settings) and --resume must be given. Returns the step to resume after (0: none)."""
    if args.overwrite or not out_dir.exists() or not any(out_dir.iterdir()):
        if args.resume:
            print(f"--resume: {out_dir} holds no run yet, starting at step 0")
        return 0
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
    if not (out_dir / "latest").exists():
        print(f"--resume: {out_dir} has no checkpoint yet, starting at step 0")
        return 0
    step = int((out_dir / "latest").read_text().strip().removeprefix("step_") or 0)
    if step > args.steps:
        raise ValueError(f"--steps {args.steps} is below the step of {out_dir}'s latest checkpoint ({step}): give "
                         f"--steps {step} or more")
    return step


def start_log(out_dir, start):
    """log.jsonl keeps the lines up to the step we resume from (a line cut short by a kill is dropped)."""
    kept = []
    if start and (out_dir / "log.jsonl").exists():
        for line in (out_dir / "log.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= start:
                kept.append(line + "\n")
    write_atomic(out_dir / "log.jsonl", lambda path: path.write_text("".join(kept)))
