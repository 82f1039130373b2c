"""The CUDA path, on a GPU: every RoPE variant's CUDA logits equal CPU's in fp32 and stay within bf16 rounding in
bf16; SDPA runs a fused kernel (flash or memory-efficient), never its math fallback, for the model's shapes; the KV
cache decodes as recomputation does; train.py under torchrun with NCCL takes CPU's first step, trains in bf16,
resumes a killed run exactly, and --compile takes the eager step. Where CUDA is absent every test here is skipped
with that reason (a skip is not a pass): `python -m tools.gpu_check` runs them on a GPU and records each result."""
import copy
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from checkpoint import save_model
from conftest import ROOT, byte_tokenizer, tiny_llama
from model import KVCache, Llama, LlamaConfig
from test_model import ALL_VARIANTS, chunk_after_cache, decode_and_recompute, sharpened_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA, and this machine has none: python -m tools.gpu_check runs these "
                                       "on a GPU")
CUDA = torch.device("cuda")
FACTORS = torch.linspace(1.0, 3.0, 8).tolist()  # one per rotary pair of the tiny models (head_dim 16)
VARIANTS = {**ALL_VARIANTS, "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 32,
                                         "short_factor": [1.0] * 8, "long_factor": FACTORS}}


# ----------------------------------------------------------------------------- the model on CUDA

def logits(model, tokens):
    with torch.no_grad():
        return model(tokens.to(model.tok_embeddings.weight.device)).float().cpu()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_fp32_logits_equal_cpu(variant):
    """Three layers, 100 tokens: past L = 32 and past s·L = 128 for no variant, so every variant's long branch runs."""
    model = sharpened_model(VARIANTS[variant], 3)
    tokens = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(1))
    cpu = logits(model, tokens)
    diff = (logits(model.to(CUDA), tokens) - cpu).abs().max().item()
    assert diff <= 1e-4, f"{variant}: CUDA and CPU fp32 logits differ by {diff} (logits up to {cpu.abs().max():.2f})"


@pytest.mark.parametrize("variant", ["default", "yarn", "dynamic-yarn", "longrope"])
def test_cuda_bf16_logits_are_within_the_cpu_bf16_tolerance(variant):
    """The bound test_model.py's bf16 tests hold CPU bf16 to: within 1e-2 of the fp32 logits."""
    model = sharpened_model(VARIANTS[variant], 3)
    tokens = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(1))
    fp32 = logits(model, tokens)
    diff = (logits(copy.deepcopy(model).to(CUDA, torch.bfloat16), tokens) - fp32).abs().max().item()
    assert 0 < diff <= 1e-2, f"{variant}: CUDA bf16 logits differ from fp32 by {diff}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_kv_cache_decoding_equals_recompute(variant):
    assert decode_and_recompute(VARIANTS[variant], 3, "recompute", CUDA) <= 1e-4


@pytest.mark.parametrize("variant", ["dynamic", "dynamic-yarn-finetuned"])
def test_cuda_pre_rope_cache_is_exact_for_one_layer(variant):
    assert decode_and_recompute(variant, 1, "pre-rope", CUDA) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_chunk_after_cached_tokens_equals_a_full_pass(dtype):
    assert chunk_after_cache("yarn", CUDA, dtype) <= (1e-5 if dtype == torch.float32 else 2e-2)


# ----------------------------------------------------------------------------- which attention kernel runs

SHAPES = {  # the attention of the benchmark's shapes (tools/gpu_check.py), one layer, small vocabulary
    "smollm2-135m": dict(dim=576, n_heads=9, n_kv_heads=3, hidden_dim=1536),
    "llama-1b": dict(dim=2048, n_heads=32, n_kv_heads=8, hidden_dim=8192),
}


def attention_ops(run):
    """The names of the attention operators that run(): executes, read from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key and e.key.startswith("aten::_")})


@pytest.mark.parametrize("case", ["prefill", "chunk-after-cache", "decode", "training"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_runs_a_fused_kernel_not_the_math_fallback(shape, case):
    """In bf16 (what --dtype auto computes in on CUDA): a causal pass over 4096 tokens, a 512-token chunk after 2048
    cached ones (the bottom-right causal mask), one decoded token, and a training pass (forward and backward)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layers=1, vocab_size=1000, max_position_embeddings=8192, **SHAPES[shape])
    model = Llama(cfg).to(CUDA, torch.bfloat16)
    tokens = torch.randint(0, 1000, (1, 4096), device=CUDA)
    cache = [KVCache(1, 4096, cfg.n_kv_heads, cfg.head_dim, torch.bfloat16, CUDA)]
    runs = {"prefill": lambda: model.hidden(tokens),
            "chunk-after-cache": lambda: model.hidden(tokens[:, 2048:2560], cache, 2048),
            "decode": lambda: model.hidden(tokens[:, 2560:2561], cache, 2560),
            "training": lambda: model.nll(tokens[:, :-1], tokens[:, 1:]).mean().backward()}
    with torch.no_grad():
        model.hidden(tokens[:, :2048], cache, 0)
        model.hidden(tokens[:, 2048:2560], cache, 2048)
    context = torch.enable_grad() if case == "training" else torch.no_grad()
    with context:
        ops = attention_ops(runs[case])
    fused = [op for op in ops if any(k in op for k in ("flash", "efficient", "cudnn"))]
    assert fused and not [op for op in ops if "math" in op], f"{shape} {case}: attention ran {ops}"
    if case == "training":
        assert any("backward" in op for op in fused), f"{shape}: backward ran {ops}"


# ----------------------------------------------------------------------------- train.py under torchrun, NCCL

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny byte-level model (no download: the GPU machine is offline), its tokenizer, ~200 KB of seeded text,
    and the flags every run here shares."""
    root = tmp_path_factory.mktemp("cuda_train")
    save_model(tiny_llama(vocab_size=258, bos_token_id=256, eos_token_id=257), root / "tiny")
    byte_tokenizer().save_pretrained(root / "tiny")
    rng = np.random.default_rng(0)
    words = ["the", "a", "rope", "scale", "of", "and", "long", "context", "yarn", "model", "to", "is", "in", "it"]
    text = "\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(4000))
    (root / "book.txt").write_text(text)
    flags = ["--model", root / "tiny", "--data", root / "book.txt", "--scale", "2", "--batch-size", "4", "--lr",
             "3e-3", "--warmup-steps", "1", "--cache-dir", root / "cache", "--peak-tflops", "1000", "--dtype",
             "float32"]
    return root, [str(f) for f in flags]


def train(flags, out_dir, cuda=True, popen=False):
    """torchrun --nproc_per_node=1 train.py ...: NCCL on the GPU, or gloo on the CPU (no GPU visible)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "train.py"), *flags, "--out-dir", str(out_dir)]
    env = {**os.environ, **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def weights(out_dir):
    return load_file(out_dir / "final" / "model.safetensors")


def assert_same_step(a, b, start):
    """The same loss and weights within fp32 rounding, and a step that moved every weight well past that."""
    (la,), (lb,) = log(a), log(b)
    assert abs(la["loss"] - lb["loss"]) <= 1e-5, (la["loss"], lb["loss"])
    wa, wb, w0 = weights(a), weights(b), load_file(start / "model.safetensors")
    for k in w0:
        assert (wa[k] - wb[k]).abs().max() <= 1e-5, f"{k}: {(wa[k] - wb[k]).abs().max()}"
        assert (wa[k] - w0[k]).abs().max() > 5e-5, k


def test_torchrun_nccl_takes_the_cpu_first_step(setup):
    """fp32, one step of 4 sequences at a small lr (see test_train.one_step): CUDA with NCCL against CPU with gloo."""
    root, flags = setup
    flags = flags + ["--steps", "1", "--lr", "2e-4"]
    on_cuda, on_cpu = train(flags, root / "cuda_step"), train(flags, root / "cpu_step", cuda=False)
    assert ", cuda\n" in on_cuda.stdout and ", cpu\n" in on_cpu.stdout
    assert_same_step(root / "cuda_step", root / "cpu_step", root / "tiny")


def test_torchrun_nccl_trains_in_bf16(setup):
    """bf16 compute over fp32 master weights (FSDP2's MixedPrecisionPolicy on the GPU): the loss falls."""
    root, flags = setup
    result = train(flags + ["--steps", "8", "--dtype", "bfloat16"], root / "bf16")
    losses = [r["loss"] for r in log(root / "bf16")]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    assert "dtype: bfloat16" in result.stdout
    assert all(r["peak_memory_bytes"] > 0 for r in log(root / "bf16"))


def wait_until_unlocked(lock, timeout=60):
    """Until no process holds the run folder's lock (the kernel drops it when the holder has exited)."""
    deadline = time.time() + timeout
    with open(lock) as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                assert time.time() < deadline, f"{lock} still held {timeout} s after the kill"
                time.sleep(0.05)


def test_a_killed_gpu_run_resumes_exactly(setup):
    """SIGKILL to the training process once a checkpoint after step 2 exists, then --resume: every step's loss and
    the final weights equal those of the uninterrupted run, bit for bit."""
    root, flags = setup
    flags = flags + ["--steps", "30", "--lr", "1e-3"]
    train(flags, root / "straight")
    killed = root / "killed"
    proc = train(flags + ["--save-every", "1"], killed, popen=True)
    deadline = time.time() + 300
    while proc.poll() is None and not ((killed / "latest").exists() and
                                       int((killed / "latest").read_text().removeprefix("step_")) >= 3):
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    worker = int((killed / ".lock").read_text().split()[1])  # "pid N on host H": rank 0, the training process
    os.kill(worker, signal.SIGKILL)  # as the kernel's OOM killer or a lost node would; torchrun then exits
    assert proc.wait(timeout=120) != 0
    wait_until_unlocked(killed / ".lock")
    assert not (killed / "final").exists(), "the run ended before it was killed: nothing was tested"
    result = train(flags + ["--save-every", "1", "--resume"], killed)
    assert "resuming after step" in result.stdout
    straight, resumed = [r["loss"] for r in log(root / "straight")], [r["loss"] for r in log(killed)]
    assert resumed == straight, (straight, resumed)
    a, b = weights(root / "straight"), weights(killed)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0, f"resumed weights differ from the uninterrupted run's by up to {diff}"


def test_a_compiled_gpu_step_is_the_eager_step(setup):
    root, flags = setup
    flags = flags + ["--steps", "1", "--lr", "2e-4"]
    train(flags, root / "eager")
    train(flags + ["--compile"], root / "compiled")
    assert_same_step(root / "eager", root / "compiled", root / "tiny")
