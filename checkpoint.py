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
    .lock       while a run holds the folder (RunFolderLock: one run per folder)
A step_N is written as step_N.tmp and renamed once every process has finished, so a kill at any point leaves the
previous checkpoint as `latest`. Nothing in a run folder is trusted when it is read back: no file in it can run code
(SafeReader, SafePlanner), and every weight read anywhere must be finite (check_finite).
"""
import dataclasses
import fcntl
import json
import math
import os
import pickle
import re
import shutil
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from common import ctrl_c_held, read_json_object, remove, write_atomic, write_json
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
    check_finite(state, weights)
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval()


def save_model(model, out_dir, dtype=None, extra=None):
    """Write config.json and model.safetensors (in dtype, default the model's) into out_dir, each atomically.
    extra: more config.json keys, of those load_config accepts and ignores (train.py's "training")."""
    out, config = Path(out_dir), model.config
    state = {k: v.detach().to(dtype or v.dtype) for k, v in model.state_dict().items()}
    write_atomic(out / "model.safetensors", lambda tmp: save_weights(state, tmp, layout(config)))
    raw = {**dataclasses.asdict(config), **(extra or {})}
    write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(raw, indent=2) + "\n"))


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
    if unknown := sorted(raw.keys() - {*fields, "source", "training"}):
        raise ValueError(f"{file}: unknown key {unknown[0]!r} (known: {', '.join(fields)}, source, training)")
    if missing := [f.name for f in dataclasses.fields(LlamaConfig)
                   if f.default is dataclasses.MISSING and f.name not in raw]:
        raise ValueError(f"{file} has no {missing[0]!r}")
    raw.pop("source", None)  # where it was converted from, and
    raw.pop("training", None)  # how train.py fine-tuned it (--pose, --seq-len): records, no setting of the model
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
    for name in ("norm_eps", "rope_theta", "partial_rotary_factor"):
        value = fields.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a positive number (got {value!r})")
    for name in ("tie_word_embeddings", "qkv_bias"):
        if not isinstance(fields.get(name, False), bool):
            raise ValueError(f"{name} must be true or false (got {fields[name]!r})")
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


def check_finite(state, where):
    """Every weight a finite number: a NaN or an infinity would make every result NaN without a word. Names the
    first tensor that holds one."""
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = t.numel() - int(torch.isfinite(t).sum())
            raise ValueError(f"{where}: tensor {name} holds {bad:,} value(s) that are not finite (NaN or infinity): "
                             "the checkpoint is damaged, or a training run diverged before it was written")


# ----------------------------------------------------------------------------- training run folders

# run.json keys that --resume must match: what changes the numbers (--steps too when the lr decays towards it)
RUN_KEYS = ("model", "data", "scale", "rope", "original_max_position_embeddings", "seq_len", "beta_fast",
            "beta_slow", "batch_size", "micro_batch_size", "lr", "warmup_steps", "lr_schedule", "adam_betas",
            "weight_decay", "grad_clip", "seed", "dtype", "pose")


def step_dirs(out_dir):
    return sorted((p for p in out_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name)),
                  key=lambda p: int(p.name[5:]))


def rng_states():
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def save_checkpoint(out_dir, step, model, optimizer, meta, keep):
    """Sharded checkpoint (torch.distributed.checkpoint: every rank writes its own shards, nothing is gathered)
    written into step_N.tmp and renamed to step_N once complete; then `latest` is replaced to name it. A Ctrl-C
    meanwhile takes effect once the checkpoint is complete."""
    with ctrl_c_held() as pressed:
        rank, tmp, final = dist.get_rank(), out_dir / f"step_{step}.tmp", out_dir / f"step_{step}"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        dist.barrier()
        try:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
            torch.save(rng_states(), tmp / f"rng_{rank}.pt")
        except (dcp.api.CheckpointException, RuntimeError, OSError) as e:  # a full disk, most often, which
            free = shutil.disk_usage(out_dir).free / 2 ** 20  # torch.save reports as "unexpected pos"
            shutil.rmtree(tmp, ignore_errors=True)
            if pressed:  # a second Ctrl-C, which dcp and torch.save turn into errors of their own
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


# A run folder is read without trust (it may have been copied from elsewhere, or edited): nothing in it can run code.
# dcp itself unpickles step_N/.metadata with plain pickle, which calls whatever functions the file names, and
# torch.load(weights_only=False)s its non-tensor items (the optimizer's param_groups). SafeReader and SafePlanner,
# which load_checkpoint hands to dcp.load, read both with loaders that build data and nothing else; run.json,
# meta.json and log.jsonl are JSON, `latest` is text checked to be "step_N", rng_RANK.pt is read weights_only.

class MetadataUnpickler(pickle.Unpickler):
    """Unpickles dcp's .metadata, admitting only what it is made of (listed by pickling real metadata): the
    dataclasses of torch.distributed.checkpoint.metadata, _StorageInfo, torch.Size, dtypes and layouts, paths and
    plain containers. Any other global (os.system, builtins.eval, ...) is an UnpicklingError, before it is called."""
    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
               ("builtins", "frozenset"), *(("pathlib", p) for p in ("Path", "PosixPath", "PurePosixPath"))}

    def find_class(self, module, name):
        obj = getattr(sys.modules.get(module), name, None)
        if (module, name) in self.ALLOWED or module == "torch.distributed.checkpoint.metadata" and \
                isinstance(obj, type) and obj.__module__ == module or \
                module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f".metadata names {module}.{name}, which checkpoint metadata never holds")


class SafeReader(dcp.FileSystemReader):
    """dcp's FileSystemReader, with .metadata read by MetadataUnpickler and checked: a Metadata whose shards are files
    of step_N itself. (No **kwargs: dcp then never falls back to per-rank metadata files.)"""

    def read_metadata(self):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise ValueError(f"{Path(self.path) / '.metadata'} does not hold checkpoint metadata")
        for info in metadata.storage_data.values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{Path(self.path) / '.metadata'} names a shard {name!r} outside {self.path}")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """dcp's DefaultLoadPlanner, with the non-tensor items (floats, tuples, booleans of the optimizer's param_groups)
    read by torch.load(weights_only=True), which builds plain data only, instead of weights_only=False."""

    def load_bytes(self, read_item, value):
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_rng_states(path):
    """rng_RANK.pt (weights_only: tensors and plain data only), checked to be what rng_states() saved."""
    rng = torch.load(path, weights_only=True)
    if not isinstance(rng, dict) or not all(isinstance(rng.get(k), torch.ByteTensor) for k in ("cpu", *rng)):
        raise ValueError(f"{path} does not hold random number generator states")
    return rng


def latest_step(out_dir):
    """The step of the checkpoint `latest` names (0 without one), which must be "step_N" with step_N/ in out_dir."""
    if not (out_dir / "latest").exists():
        return 0
    name = (out_dir / "latest").read_bytes().decode(errors="replace").strip()
    if not re.fullmatch(r"step_\d+", name) or not (out_dir / name).is_dir():
        raise ValueError(f"{out_dir / 'latest'} should name a checkpoint folder step_N of {out_dir}, but holds "
                         f"{name[:60]!r}: write the name of the newest step_N into it (ls {out_dir}), or start over "
                         "with --overwrite")
    return int(name[5:])


def load_checkpoint(path, model, optimizer):
    """Load a step_N directory into the sharded model and optimizer (any number of processes may have written it);
    returns its meta.json. Any failure to read it is reported as a corrupt checkpoint; nothing on disk changes, and
    nothing in it can run code (SafeReader, SafePlanner, read_rng_states)."""
    model_state, optim_state = get_state_dict(model, optimizer)  # the layout to load into
    state = {"model": model_state, "optim": optim_state}
    try:
        meta = read_json_object(path / "meta.json")
        if not isinstance(meta.get("data"), str):
            raise ValueError(f"{path / 'meta.json'} has no \"data\" key")
        SafeReader(path).read_metadata()  # fails on a bad .metadata before dcp.load logs tracebacks
        dcp.load(state, storage_reader=SafeReader(path), planner=SafePlanner())
        rng_file = path / f"rng_{dist.get_rank()}.pt"  # absent when resuming on more processes than saved it
        rng = read_rng_states(rng_file) if rng_file.exists() else rng_states()
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


LOCK = ".lock"  # in the run folder, while a run holds it


class RunFolderLock:
    """One run per folder: an exclusive fcntl.flock on out_dir/.lock, taken by rank 0 before it reads the folder and
    held for the run's life. The kernel drops it when the process ends, however it ends, so a killed run leaves no
    stuck lock; a second train.py on the folder (fresh, --resume or --overwrite) is refused, naming the holder's pid
    and host. release() removes the file (and the folder, if it was made for the lock and nothing else came)."""

    def __init__(self, out_dir):
        self.out_dir, self.path = out_dir, out_dir / LOCK
        self.created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(self.fd, 200).decode(errors="replace").strip() or "a process that is starting"
                os.close(self.fd)
                raise ValueError(f"{out_dir} is in use by another train.py ({holder}): one run per folder; wait for "
                                 "it to end, stop it, or choose another --out-dir") from None
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                break
            os.close(self.fd)  # the holder removed the file between our open and our lock: lock the new one
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())

    def release(self):
        self.path.unlink(missing_ok=True)  # while still held, so that no one locks the file on its way out
        os.close(self.fd)
        if self.created and self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()  # a start that failed leaves nothing


def run_settings(args):
    return json.loads(json.dumps(vars(args)))


def check_out_dir(out_dir, args):
    """A run never writes into another run's directory: without --overwrite, an existing non-empty --out-dir must be
    this run's (same run.json settings) and --resume must be given; --overwrite replaces a run (a folder with a
    run.json) and nothing else. Returns the step to resume after (0: none)."""
    empty = not out_dir.exists() or not any(p.name != LOCK for p in out_dir.iterdir())  # the lock is this run's
    if args.overwrite and not empty and not (out_dir / "run.json").is_file():
        raise ValueError(f"--overwrite replaces a run, and {out_dir} holds none (no run.json): it is left as it is; "
                         "choose another --out-dir")
    if args.overwrite or empty:
        if args.resume:
            print(f"--resume: {out_dir} holds no run yet, starting at step 0")
        return 0
    if not args.resume:
        raise ValueError(f"{out_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --out-dir")
    if not (out_dir / "run.json").exists():
        raise ValueError(f"{out_dir} is not empty and has no run.json (no train.py run): choose another --out-dir")
    # a run.json written before --pose existed has no "pose": that run trained without it
    saved, now = {"pose": False, **read_json_object(out_dir / "run.json")}, run_settings(args)
    keys = RUN_KEYS + (("steps",) if args.lr_schedule == "linear" else ())
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in keys
               if comparable(k, saved.get(k)) != comparable(k, now[k])]
    if changed:
        raise ValueError(f"{out_dir} holds a run with other settings ({', '.join(changed)}): resume it with its own "
                         "settings (see its run.json), or choose another --out-dir")
    if not (step := latest_step(out_dir)):
        print(f"--resume: {out_dir} has no checkpoint yet, starting at step 0")
        return 0
    if step > args.steps:
        raise ValueError(f"--steps {args.steps} is below the step of {out_dir}'s latest checkpoint ({step}): give "
                         f"--steps {step} or more")
    return step


def comparable(key, value):
    """A run.json setting as --resume compares it: the paths of --model and --data resolved (./doc.txt is doc.txt)."""
    if key == "model" and isinstance(value, str):
        return str(Path(value).resolve())
    if key == "data" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [str(Path(v).resolve()) for v in value]
    return value


def start_log(out_dir, start):
    """log.jsonl keeps the lines up to the step we resume from (a line cut short by a kill is dropped)."""
    kept = []
    if start and (out_dir / "log.jsonl").exists():
        for line in (out_dir / "log.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start:
                kept.append(line + "\n")
    write_atomic(out_dir / "log.jsonl", lambda path: path.write_text("".join(kept)))


def resume(out_dir, model, optimizer, data_key):
    """Load the run's latest checkpoint into the sharded model and optimizer; the data must be what it was."""
    meta = load_checkpoint(out_dir / f"step_{latest_step(out_dir)}", model, optimizer)
    if meta["data"] != data_key:
        raise ValueError(f"the data changed since {out_dir} was checkpointed (the contents of its files differ): "
                         "resume with the same --data, or start a new run")


def open_run_folder(out_dir, args, start):
    """On rank 0, once everything has loaded: --overwrite replaces the folder, leftovers of a killed checkpoint
    write go, run.json records the settings and log.jsonl keeps the lines up to the step resumed from."""
    for old in out_dir.iterdir() if args.overwrite and out_dir.exists() else []:
        if old.name != LOCK:  # the lock this run holds stays
            remove(old)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    write_json(out_dir / "run.json", run_settings(args))
    start_log(out_dir, start)
