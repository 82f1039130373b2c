"""What the scripts share: files written atomically, reading documents, the command line (one-line errors, checked
numbers, Ctrl-C held while a checkpoint is written), glibc told to keep freed memory, the compute dtype and why it was
chosen, measurements of the machine (model FLOPs, the matmul peak, peak memory), FSDP2 sharding, and
the evaluations' command line (--checkpoint, --rope, --scale, the layer progress bar)."""
import argparse
import contextlib
import ctypes
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

DEFAULT_CHECKPOINT = "checkpoints/smollm2-135m"  # SmolLM2-135M, converted from its GGUF on first use
UMASK = os.umask(0o022)
os.umask(UMASK)


# ----------------------------------------------------------------------------- files: complete or absent

def temp_path(path, tag="tmp"):
    """A sibling of `path` that only this process writes: .NAME.HOST.PID.tmp"""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{tag}")


def remove_stale_temps(path):
    """Remove the temporary siblings of `path` that a killed process of this host left behind."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(socket.gethostname())}\.(\d+)\.(tmp|old)")
    for p in path.parent.glob(f".{path.name}.*") if path.parent.is_dir() else []:
        match = pattern.fullmatch(p.name)
        if match and not process_alive(int(match.group(1))):
            remove(p)


def remove(path):
    """Remove a file, a folder or a symbolic link (the link, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def write_atomic(path, write):
    """write(tmp) fills a temporary sibling of `path`, which is then renamed to `path`: a file that exists is
    complete, whatever stopped the writer. The one way every script here writes a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # some writers (safetensors) create private files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj):
    """obj as JSON, atomically. NaN and infinity are refused (ValueError): they are not JSON, and most readers fail
    on them; a report replaces them first (null_nonfinite)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n"))


def read_json_object(path):
    """A JSON file that must hold an object ({...}): bad JSON, or a list or number, is a one-line error naming it."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object {{...}}, not a {type(obj).__name__}")
    return obj


def exp_or_inf(x):
    """math.exp(x), or infinity where it would overflow a float (a perplexity past 1e308), not an OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def null_nonfinite(report, why):
    """The dict `report` with every NaN or infinite number (which JSON cannot hold) replaced by null, and, if there
    were any, report["missing"] = {"numbers": where each was and what it was, "why": why}: a reader of the file sees
    which numbers are missing and why."""
    missing = []

    def clean(x, where):
        if isinstance(x, float) and not math.isfinite(x):
            missing.append(f"{where}: {x}")
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x

    report = clean(report, "")
    return {**report, "missing": {"numbers": missing, "why": why}} if missing else report


def write_dir_atomic(path, fill, force=False):
    """fill(tmp) fills a temporary sibling folder that is then renamed to `path`: the folder is complete, or as it
    was. A non-empty `path` is replaced only with force (moved aside first, deleted once the new one is in place)."""
    path = Path(path)
    if is_nonempty(path) and not force:
        raise ValueError(f"{path} already exists and is not empty: pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp, old = temp_path(path), temp_path(path, "old")
    tmp.mkdir()
    try:
        fill(tmp)
        for p in (tmp, *tmp.rglob("*")):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~UMASK)
        if is_nonempty(path):
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        remove(tmp)
        remove(old)  # a symbolic link that `path` was: the link goes, what it pointed to stays
    return path


def is_nonempty(path):
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def is_within(path, other):
    """Whether `path` is `other` or lies inside it (symbolic links resolved)."""
    path, other = Path(path).resolve(), Path(other).resolve()
    return path == other or other in path.parents


def check_not_an_input(output, flag, inputs):
    """An output never replaces what the command reads: refuse `output` (a file or folder) when it is one of `inputs`
    ((flag, path) pairs, files or folders; None is skipped), lies inside one, or holds one. Symbolic links resolved."""
    for input_flag, path in inputs:
        if path is None:
            continue
        if is_within(output, path) or is_within(path, output):
            how = ("is" if Path(output).resolve() == Path(path).resolve() else
                   "lies inside" if is_within(output, path) else "holds")
            raise ValueError(f"{flag} {output} {how} {input_flag} {path}, which this command reads: write "
                             f"{flag} elsewhere")


def check_output_file(path, flag, suffixes=None):
    """Fail before a long job, not after it, when its output file cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {path}: the extension must be one of {', '.join(sorted(suffixes))}")
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write into {folder}")


def plot_suffixes():
    from matplotlib.backend_bases import FigureCanvasBase

    return {f".{ext}" for ext in FigureCanvasBase.get_supported_filetypes()}


# ----------------------------------------------------------------------------- documents

def document_files(paths, flag="--data"):
    """The files behind `paths`: a file as given, a folder's .txt and .jsonl files, in any case (.TXT too),
    recursively, sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".jsonl") and p.is_file())
            if not found:
                raise ValueError(f"{flag} {path} holds no .txt or .jsonl file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    return files


def read_documents(files):
    """(name, text) of every document, in order: a .jsonl file holds one {"text": ...} per line, any other file is
    one document. Empty files, text that is not UTF-8 and bad JSON lines are errors that name the file."""
    for path in files:
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not raw.strip():
            raise ValueError(f"{path} is empty: remove it from the data")
        if path.suffix.lower() != ".jsonl":
            yield str(path), raw
            continue
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                    assert isinstance(text, str)
                except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                    raise ValueError(f"{path}:{n} is not a JSON object with a \"text\" string") from None
                yield f"{path}:{n}", text


# ----------------------------------------------------------------------------- the command line

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line: `script.py: error: ...`."""

    def __init__(self, script, doc):
        super().__init__(prog=Path(script).name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(cast=float, min=None, max=None, above=None):
    """An argparse type: a finite int or float within [min, max] (and > above)."""
    def parse(text):
        try:
            x = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'an integer' if cast is int else 'a number'} is needed, "
                                             f"not {text!r}") from None
        if not math.isfinite(x) or (min is not None and x < min) or (max is not None and x > max) \
                or (above is not None and x <= above):
            bounds = [f">= {min:g}" if min is not None else "", f"> {above:g}" if above is not None else "",
                      f"<= {max:g}" if max is not None else ""]
            raise argparse.ArgumentTypeError(f"must be a finite number {' and '.join(b for b in bounds if b)} "
                                             f"(got {text})")
        return x
    return parse


def cli(main):
    """Run a script's main(): bad input and failed I/O end in one line on stderr (exit 1), Ctrl-C in one line
    (exit 130); what the script was writing is removed by the writers above."""
    prog = Path(sys.argv[0]).name
    try:
        main()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        sys.exit(f"{prog}: error: {e}")


# bytes: a 16k window's [T, dim] activations in fp32 (38 MB) and [T, hidden_dim] in bf16 (50 MB), not its fp32
# [T, hidden_dim] (100 MB) or logits chunks (100-200 MB): 128 MB scored 16k in fp32 ~5% faster, but held up to 2.0 GiB
# where 64 MB held 1.7 (docs/performance.md)
EVALUATION_REUSES_UP_TO = 64 << 20


def keep_freed_memory(up_to=None):
    """Tell glibc's malloc to keep the memory torch frees, for the next tensor: by default a tensor of more than
    32 MB (a chunk of logits, any activation of a 16k sequence) is mapped afresh and given back when freed, so each
    one pays a page fault per 4 KiB it touches, and every training step or window allocates the same big tensors
    again (on the 2-core VM ~10% of the study's training step, 6-15% of a 16k scoring pass: docs/performance.md).
    M_TRIM_THRESHOLD = -1: never shrink the heap. up_to=None (train.py): every tensor from the heap (M_MMAP_MAX = 0);
    up_to=N bytes (the evaluations, EVALUATION_REUSES_UP_TO): up to N from the heap, bigger ones mapped afresh
    (M_MMAP_THRESHOLD), since the 200 MB logits chunks of a scoring pass, in one heap with the small tensors between
    them, fragmented it (a 16k pass held 4 GB instead of 1.2 in 7 of 10 runs). Nothing to do where the C library is
    not glibc."""
    libc = ctypes.CDLL(None) if sys.platform == "linux" else None  # CDLL(None): the C library this process runs on
    if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
        if up_to is None:
            libc.mallopt(M_MMAP_MAX, 0)
        else:
            libc.mallopt(M_MMAP_THRESHOLD, up_to)
        libc.mallopt(M_TRIM_THRESHOLD, -1)


@contextlib.contextmanager
def ctrl_c_held():
    """Hold a Ctrl-C until the block ends, then raise it: a checkpoint interrupted halfway is a checkpoint lost (and
    torch.save turns the interrupt into an "unexpected pos" RuntimeError). A second Ctrl-C stops at once. Yields the
    list of presses, for an except clause inside the block to tell an interrupt from a failure."""
    pressed = []

    def press(signum, frame):
        pressed.append(signum)
        if len(pressed) > 1:
            raise KeyboardInterrupt

    holding = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not where Ctrl-C is ignored (nohup, &)
    old = signal.signal(signal.SIGINT, press) if holding else None
    try:
        yield pressed
    finally:
        if holding:
            signal.signal(signal.SIGINT, old)
    if pressed:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- dtype and the machine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), as torch reports it, and torch runs its AVX-512
    kernels (not when told to run as an AVX2 machine: ATEN_CPU_CAPABILITY=avx2, see docs/performance.md)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    kernels = torch.backends.cpu.get_cpu_capability()
    return kernels == "AVX512" and any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def compute_dtype(name, device):
    """--dtype: float32, bfloat16, or auto (bfloat16 on CUDA and on CPUs with native bf16, else float32)."""
    return dtype_choice(name, device)[0]


def dtype_reason(name, device):
    """compute_dtype's choice and why, the line a script prints when it starts: "float32 (--dtype auto: ...)"."""
    dtype, why = dtype_choice(name, device)
    return f"{str(dtype).removeprefix('torch.')} ({why})"


def dtype_choice(name, device):
    """(dtype, why): the one place --dtype is decided, so that what is printed is what is computed."""
    if name != "auto":
        return DTYPES[name], f"--dtype {name}"
    if torch.device(device).type == "cuda":
        return torch.bfloat16, "--dtype auto: CUDA"
    if native_bf16():
        return torch.bfloat16, "--dtype auto: this CPU computes bf16 natively, AVX512-BF16/AMX"
    # without those instructions bf16 matmuls are converted to fp32 and back: slower than fp32 itself
    return torch.float32, ("--dtype auto: no native bf16 (AVX512-BF16/AMX) in this CPU or in the kernels torch runs, "
                           "where bf16 is emulated and slow")


def add_dtype_arg(parser):
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="compute dtype: auto picks bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16, "
                             "AMX), float32 elsewhere (default: auto)")


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory(device):
    """Peak memory of this process in bytes: allocated on a CUDA device, resident set size (weights included) on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def memory_capacity(device):
    """Bytes of memory on `device`: the GPU's on CUDA, the machine's RAM on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def clock(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def model_flops(config, tokens, past=0, head_tokens=None):
    """Model FLOPs of one forward pass over `tokens` positions after `past` cached ones: 2 per multiply-add of every
    linear layer (the output head only on head_tokens positions, default all), plus attention's q·k and p·v,
    4·n_heads·head_dim per (query, key) pair and layer, causal pairs only. A training step counts as 3 forward passes
    (backward = 2x forward); recomputation under activation checkpointing is not counted."""
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_token = c.n_layers * (2 * c.dim * q + 2 * c.dim * kv + 3 * c.dim * c.hidden_dim)
    pairs = past * tokens + tokens * (tokens + 1) // 2
    head_tokens = tokens if head_tokens is None else head_tokens
    return 2 * per_token * tokens + 2 * c.vocab_size * c.dim * head_tokens + 4 * q * c.n_layers * pairs


def matmul_peak(dtype, device, repeats=6):
    """Best FLOP/s of an n x n by n x n product (2048 on CPU, 8192 on CUDA): the practical peak MFU is measured
    against, for this dtype on this machine."""
    n = 8192 if torch.device(device).type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        start = clock(device)
        a @ b
        best = min(best, clock(device) - start)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------- training on many processes

def compile_blocks(model):
    """torch.compile each transformer block: inductor fuses the elementwise work around the matmuls and attention
    (RMSNorm, the rotation, SwiGLU) into a few loops. Each block is wrapped, so hooks on model.layers (FSDP2's, the
    progress bar's) stay outside the compiled graphs."""
    if "ATEN_CPU_CAPABILITY" in os.environ:
        # torch 2.13 caches compiled graphs across runs without noting the kernels (AVX-512, AVX2) they were made for:
        # a graph cached by a plain run, reused with ATEN_CPU_CAPABILITY=avx2 (docs/performance.md), computed NaN
        from torch._functorch import config as autograd_config
        from torch._inductor import config as inductor_config
        inductor_config.fx_graph_cache = autograd_config.enable_autograd_cache = False
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block)


def shard(model, mp_policy, compile):
    """FSDP2 in torchtitan's order: activation checkpointing (model.activation_checkpointing, applied per block in
    Llama.hidden), compile each block, shard each block, then the root (embeddings, final norm and head; with tied
    embeddings the one weight is both, and it lives in the root)."""
    if compile:
        compile_blocks(model)
    for block in model.layers:
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    register_fsdp_forward_method(model, "nll")  # model.nll, not model(), is what training calls
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")  # nll's output is only summed


# -------------------------------------------------------- the evaluations' command line (eval_ppl.py, eval_passkey.py)
# What both evaluations share around their method: the model and RoPE arguments, loading what is evaluated, the output
# files, and a progress bar driven from outside the method. rope, checkpoint, tokenizer and convert_llama are imported
# inside the functions: checkpoint.py imports this module at its top, and the other scripts need none of them.

def add_model_args(parser, rope_default):
    """--checkpoint, --rope, --scale, --original-max-position-embeddings, --dtype."""
    import rope

    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help=f"checkpoint directory (default {DEFAULT_CHECKPOINT}: SmolLM2-135M, converted on first "
                             "use)")
    parser.add_argument("--rope", nargs="+", default=rope_default, metavar="ROPE",
                        help="configurations to compare: checkpoint (the checkpoint's own scaling), a rope_type "
                             f"({', '.join(rope.TYPES)}; default = plain RoPE) or a JSON dict "
                             f"(default: {' '.join(rope_default)})")
    parser.add_argument("--scale", "--factor", type=number(float, min=1), default=2.0, dest="scale",
                        help="s, the factor of the named rope types, as train.py's --scale (default 2)")
    parser.add_argument("--original-max-position-embeddings", type=number(int, min=1), metavar="L",
                        help="pre-training context L for named rope types (default: the checkpoint's)")
    add_dtype_arg(parser)


def parse_rope_args(specs):
    """[(label, dict or name)] from --rope, checking syntax only (before anything heavy is loaded). A dict's label is
    its rope_type (normalized: "type" or "rope_type", aliases resolved) and its other keys."""
    import rope

    parsed = []
    for spec in specs:
        if spec == "checkpoint" or spec in rope.TYPES:
            parsed.append((spec, spec))
            continue
        rope_type, d = rope_json(spec)
        extras = ",".join(f"{k}={v}" for k, v in d.items() if k not in ("rope_type", "type"))
        parsed.append((f"{rope_type}({extras})" if extras else rope_type, d))
    labels = [label for label, _ in parsed]
    if len(set(labels)) < len(labels):
        raise ValueError(f"--rope lists the same configuration twice ({' '.join(labels)})")
    return parsed


def rope_json(spec):
    """(rope_type, dict) of a --rope that is not a name: a JSON object whose rope_type rope.py knows."""
    import rope

    if not spec.lstrip().startswith("{"):
        raise ValueError(f"--rope {spec!r} is neither checkpoint, a rope_type ({', '.join(rope.TYPES)}) nor a "
                         "JSON dict")
    try:
        d = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"--rope {spec!r} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"--rope {spec!r} must be a JSON object like '{{\"rope_type\": \"yarn\", \"factor\": 4}}'")
    try:
        return rope.rope_type_of(d), d
    except ValueError as e:
        raise ValueError(f"--rope {spec!r}: {e}") from None


def rope_methods(parsed, scale, original_max_position_embeddings, config):
    """[(label, checked rope_scaling, None for plain RoPE)] for the model's config: a named rope_type, or a dict that
    does not say them, gets --scale as its factor and L (--original-max-position-embeddings, else the model's)."""
    import rope

    L = original_max_position_embeddings or config.original_max_position_embeddings
    methods = []
    for label, spec in parsed:
        if spec == "checkpoint":
            methods.append((label, config.rope_scaling))
            continue
        d = {"rope_type": spec} if isinstance(spec, str) else spec
        try:
            if rope.rope_type_of(d) != "default":
                d = {"factor": scale, "original_max_position_embeddings": L, **d}
            # checked against the model too (longrope's lists need head_dim/2 entries) before any method runs
            methods.append((label, rope.parse_rope_scaling(d, config.head_dim, config.max_position_embeddings)))
        except ValueError as e:
            raise ValueError(f"--rope {label}: {e}") from None
    return methods


def load_evaluated(args, parsed_rope):
    """The checkpoint (SmolLM2 converted when the default is missing) in --dtype, its tokenizer, the methods."""
    from checkpoint import load_model
    from tokenizer import Tokenizer

    if args.checkpoint == DEFAULT_CHECKPOINT:
        from convert_llama import default_checkpoint
        default_checkpoint()
    device = default_device()
    model = load_model(args.checkpoint, dtype=compute_dtype(args.dtype, device), device=device)
    tok = Tokenizer.from_pretrained(args.checkpoint)
    tok.check_fits(model.config.vocab_size, args.checkpoint)
    return model, tok, rope_methods(parsed_rope, args.scale, args.original_max_position_embeddings, model.config)


def check_outputs(args, inputs):
    """--out and --plot, checked before the hours of work that end in them: writable, and none of the `inputs`
    ((flag, path) pairs: the checkpoint, the data) or inside them."""
    if args.out:
        check_output_file(args.out, "--out")
        check_not_an_input(args.out, "--out", inputs)
    if args.plot:
        check_output_file(args.plot, "--plot", plot_suffixes())
        check_not_an_input(args.plot, "--plot", inputs)


def save_plot(fig, path):
    """A matplotlib figure to path (its format from the extension), atomically."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:], dpi=120))


class LayerProgress:
    """`with LayerProgress(model, passes) as bar:` a tqdm bar on stderr counting the transformer blocks run inside the
    `with`, passes x n_layers in all, so that it moves within a forward pass (a bar of whole passes sat at 0 for
    minutes of a 16k-token pass on a slow CPU). Forward hooks on model.layers drive it, so the method's functions know
    nothing of it; they are removed on exit. Its description says what runs: "yarn s=2: 16,384 tokens"."""

    def __init__(self, model, passes):
        self.model, self.total = model, passes * len(model.layers)

    def __enter__(self):
        from tqdm import tqdm

        # miniters=1: by default tqdm learns to skip refreshes during fast steps (decoding one token) and then sits
        # still through slow ones (a long prefill); refreshes stay limited to 10 per second by its mininterval
        self.bar = tqdm(total=self.total, unit="layer", miniters=1, dynamic_ncols=True)
        layers = self.model.layers
        self.hooks = [block.register_forward_hook(self.count) for block in layers]
        self.hooks.append(layers[0].register_forward_pre_hook(self.describe))
        return self.bar

    def count(self, block, args, output):
        self.bar.update()  # and return None: what a forward hook returns replaces the block's output

    def describe(self, block, args):
        tokens = args[0].size(1)  # the block's input x [B, T, dim]
        if tokens > 1:  # a pass over a sequence, not one decoded token
            scaling = self.model.config.rope_scaling or {"rope_type": "default"}
            factor = f" s={scaling['factor']:g}" if "factor" in scaling else ""
            self.bar.set_description(f"{scaling['rope_type']}{factor}: {tokens:,} tokens")

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.bar.close()
