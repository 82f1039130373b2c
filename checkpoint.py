"""Checkpoint folders: what is written, and every check of what is read back.

A model checkpoint (what convert_llama.py and train.py write, what the evals load) is a folder of
    config.json         LlamaConfig's fields (load_config checks every key, type and range)
    model.safetensors   the weights, with n_heads, n_kv_heads and head_dim in its metadata (shapes alone cannot tell
                        them), and nothing else: safetensors holds tensors only, so loading it runs no code
    tokenizer files     as convert_llama.py copied them (tokenizer.py reads them)

A training run folder (train.py --out-dir) holds
    step_N/     torch.distributed.checkpoint shards of the model and optimizer (each process writes its own; any
                number of processes can read them back), meta.json (step, data key) and rng_RANK.pt
    latest      the name of the newest complete step_N (written last, atomically)
    run.json    the settings; --resume must repeat those that change the numbers (RUN_KEYS)
    log.jsonl   one line per step
A step_N is written as step_N.tmp and renamed once every process has finished, so a kill at any point leaves the
previous checkpoint as `latest`.
"""
import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from common import write_atomic, write_json
from model import Llama, LlamaConfig

LAYOUT_KEYS = ("n_heads", "n_kv_heads", "head_dim")  # recorded in model.safetensors' metadata


# ----------------------------------------------------------------------------- model checkpoints

def load_model(path, rope_scaling=None, dtype=None, device=None):
    """The Llama of a checkpoint folder, memory-mapped (no second copy of the weights). rope_scaling (HF-style dict)
    replaces the checkpoint's own; {"rope_type": "default"} means plain RoPE. dtype: default fp32 on CPU, bf16 on
    CUDA."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    config = load_config(path, **({} if rope_scaling is None else {"rope_scaling": rope_scaling}))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    weights = path / "model.safetensors"
    try:
        with safe_open(weights, "pt") as f:
            layout = f.metadata() or {}
        state = load_file(weights, device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{weights} is truncated or corrupt ({e})") from None
    for key in LAYOUT_KEYS:
        if key in layout and layout[key] != str(getattr(config, key)):
            raise ValueError(f"{path / 'config.json'} says {key} {getattr(config, key)} but {weights} was written "
                             f"with {layout[key]}: the config was edited; restore its {key}")
    check_weights(config, {k: v.shape for k, v in state.items()}, f"{weights} and its config.json disagree")
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval()


def save_model(model, out_dir, dtype=None):
    """Write config.json and model.safetensors (in dtype, default the model's) into out_dir, each atomically."""
    out, config = Path(out_dir), model.config
    state = {k: v.detach().to(dtype or v.dtype) for k, v in model.state_dict().items()}
    write_atomic(out / "model.safetensors", lambda tmp: save_weights(state, tmp, layout(config)))
    write_atomic(out / "config.json",
                 lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n"))


def layout(config):
    return {key: str(getattr(config, key)) for key in LAYOUT_KEYS}


def save_weights(state, path, metadata):
    """safetensors' save_file, with its I/O failures (a full disk) raised as the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file({name: t.contiguous() for name, t in state.items()}, path, metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"cannot write {path}: {e}") from None


def weights_dtype(path):
    """The dtype a checkpoint folder's weights are stored in (a fine-tune is saved back in it)."""
    from safetensors import safe_open

    with safe_open(Path(path) / "model.safetensors", "pt") as f:
        return f.get_slice(next(iter(f.keys())))[:1].dtype


def copy_tokenizer(src, out):
    """Copy the tokenizer files of checkpoint folder src (every file but the config, the weights and hidden ones)."""
    for f in Path(src).iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.startswith("."):
            shutil.copy2(f, Path(out) / f.name)


def load_config(path, **overrides):
    """The LlamaConfig of a checkpoint folder. Keys it does not know are errors (a misspelt key would otherwise
    be ignored), and so are values of the wrong type or range; overrides replace fields after the checks."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (config.json and model.safetensors): "
                                f"make one with `python convert_llama.py SRC {path}`")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "hidden_size" in raw or "model_type" in raw:
        raise ValueError(f"{file} is not this project's config (a Hugging Face checkpoint? convert it with "
                         f"`python convert_llama.py {path} OUT`)")
    fields = [f.name for f in dataclasses.fields(LlamaConfig)]
    if unknown := sorted(raw.keys() - {*fields, "source"}):
        raise ValueError(f"{file}: unknown key {unknown[0]!r} (known: {', '.join(fields)}, source)")
    if missing := [f.name for f in dataclasses.fields(LlamaConfig)
                   if f.default is dataclasses.MISSING and f.name not in raw]:
        raise ValueError(f"{file} has no {missing[0]!r}")
    raw.pop("source", None)
    try:
        return dataclasses.replace(llama_config(raw), **overrides)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def llama_config(fields):
    """LlamaConfig(**fields), once every value has the type and range it must have: a one-line error, not an
    assertion, for a config that comes from a file."""
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_position_embeddings",
                 "head_dim", "bos_token_id", "eos_token_id"):
        value = fields.get(name, 0 if name == "head_dim" else None if name.endswith("token_id") else 1)
        optional = name in ("head_dim", "bos_token_id", "eos_token_id")
        if not (optional and value is None) and (not isinstance(value, int) or isinstance(value, bool)
                                                 or value < (0 if optional else 1)):
            raise ValueError(f"{name} must be a {'non-negative' if optional else 'positive'} integer (got {value!r})")
    for name in ("norm_eps", "rope_theta"):
        value = fields.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive number (got {value!r})")
    if not isinstance(fields.get("tie_word_embeddings", False), bool):
        raise ValueError(f"tie_word_embeddings must be true or false (got {fields['tie_word_embeddings']!r})")
    head_dim = fields.get("head_dim") or fields["dim"] // fields["n_heads"]
    if fields["n_heads"] % fields["n_kv_heads"] or head_dim % 2:
        raise ValueError(f"n_heads ({fields['n_heads']}) must be a multiple of n_kv_heads ({fields['n_kv_heads']}), "
                         f"and head_dim ({head_dim}) even")
    return LlamaConfig(**fields)


def check_weights(config, shapes, where):
    """Every tensor the config implies, with its shape, and no other: name the first that differs."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llama(config).state_dict().items()}
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"{where}: tensor {name} is missing (the config has {config.n_layers} layers, "
                             f"tie_word_embeddings={config.tie_word_embeddings})")
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(shapes[name])} but the config implies {shape} (dim "
                             f"{config.dim}, {config.n_heads} heads, {config.n_kv_heads} kv heads, head_dim "
                             f"{config.head_dim}, hidden_dim {config.hidden_dim}, vocab_size {config.vocab_size})")
    if extra := sorted(shapes.keys() - expected.keys()):
        raise ValueError(f"{where}: unexpected tensor {extra[0]} (not part of a Llama with this config)")


# ----------------------------------------------------------------------------- training run folders

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


def resume(out_dir, model, optimizer, data_key):
    """Load the run's latest checkpoint into the sharded model and optimizer; the data must be what it was."""
    meta = load_checkpoint(out_dir / (out_dir / "latest").read_text().strip(), model, optimizer)
    if meta["data"] != data_key:
        raise ValueError(f"the data changed since {out_dir} was checkpointed (its files, sizes or mtimes differ): "
                         "resume with the same --data, or start a new run")


def open_run_folder(out_dir, args, start):
    """On rank 0, once everything has loaded: --overwrite replaces the folder, leftovers of a killed checkpoint
    write go, run.json records the settings and log.jsonl keeps the lines up to the step resumed from."""
    if args.overwrite:
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    write_json(out_dir / "run.json", run_settings(args))
    start_log(out_dir, start)
