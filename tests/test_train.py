"""train.py end to end on CPU: torchrun, gloo and FSDP2 on a tiny random Llama, a real book and SmolLM2's tokenizer."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import assets
from model import Llama, LlamaConfig
from tokenizer import Tokenizer
from train import Sequences, estimate_memory, export_hf, flops_per_token, get_args, lr_at, tokenize

REPO = Path(__file__).resolve().parents[1]
L = 64  # the tiny model's trained context; --scale 2 trains it on sequences of 128 tokens


def tiny_llama(rope_scaling=None, vocab_size=49152, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=vocab_size,
                      max_position_embeddings=L, rope_scaling=rope_scaling, tie_word_embeddings=True, **kw)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint with SmolLM2's tokenizer, one book, and the flags every run here shares."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = Tokenizer.from_pretrained(assets.smollm2_gguf())
    tiny_llama(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    book = assets.ensure_books(REPO / "data" / "books")[0]
    flags = ["--model", str(root / "tiny"), "--data", str(book), "--scale", "2", "--batch-size", "4", "--lr", "3e-3",
             "--warmup-steps", "2", "--cache-dir", str(root / "cache"), "--peak-tflops", "0.05"]
    return root, flags


def train(flags, out_dir, nproc=1):
    """Run train.py as users do: `python train.py` for one process, torchrun for more."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, str(REPO / "train.py"), *flags, "--out-dir", str(out_dir)]
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(setup):
    """Six steps on two processes, a checkpoint every three."""
    root, flags = setup
    ok(train(flags + ["--steps", "6", "--save-every", "3"], root / "straight", nproc=2))
    return root / "straight"


def test_torchrun_fsdp2_loss_falls_and_the_output_loads_with_its_yarn_config(setup, straight):
    root, _ = setup
    losses = [r["loss"] for r in log(straight)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    model = Llama.from_pretrained(straight / "final")
    assert model.config.rope_scaling == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": L,
                                         "finetuned": True}
    assert model.config.max_position_embeddings == 2 * L
    before, after = load_file(root / "tiny" / "model.safetensors"), load_file(straight / "final" / "model.safetensors")
    assert before.keys() == after.keys() and "output.weight" not in after  # tied: one matrix, trained once
    assert all((before[k] - after[k]).abs().max() > 1e-3 for k in before)
    assert Tokenizer.from_pretrained(straight / "final").encode("Alice") == \
        Tokenizer.from_pretrained(root / "tiny").encode("Alice")
    assert sorted(p.name for p in straight.glob("step_*")) == ["step_3", "step_6"]
    assert (straight / "latest").read_text() == "step_6"


@pytest.fixture(scope="module")
def one_step(setup):
    """The same first step of a 4-sequence batch on one process (2 x 2 micro-batches) and on two (2 x 1 x 2). AdamW's
    first step moves every weight by about lr·g/(|g| + eps): where |g| ~ eps, float rounding of g moves the weight by
    up to ~1% of lr, so the lr is small enough for that to stay far below the 1e-5 tolerance (4e-5 at lr 3e-3)."""
    root, flags = setup
    flags = flags + ["--steps", "1", "--lr", "2e-4"]
    ok(train(flags + ["--micro-batch-size", "2"], root / "one_process"))
    ok(train(flags, root / "two_processes", nproc=2))
    return root / "one_process", root / "two_processes"


def test_one_and_two_processes_take_the_same_step(setup, one_step):
    root, (one, two) = setup[0], one_step
    (a,), (b,) = log(one), log(two)
    assert abs(a["loss"] - b["loss"]) <= 1e-5
    # the norm is global, not one shard's (that would be ~30% off); fp32 norms of 3M numbers agree to ~1e-4 only
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"]
    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    w0 = load_file(root / "tiny" / "model.safetensors")
    for k in w0:
        assert (wa[k] - wb[k]).abs().max() <= 1e-5, k
        assert (wa[k] - w0[k]).abs().max() > 5e-5, k  # the step moved it well past the tolerance: it can fail


def test_grad_clip_clips(setup, one_step):
    root, flags = setup
    ok(train(flags + ["--steps", "1", "--lr", "2e-4", "--grad-clip", "1e-12"], root / "clipped"))
    w0 = load_file(root / "tiny" / "model.safetensors")
    free = load_file(one_step[0] / "final" / "model.safetensors")
    clipped = load_file(root / "clipped" / "final" / "model.safetensors")
    for k in w0:  # AdamW is invariant to the gradient's scale until it is far below eps = 1e-8
        assert (clipped[k] - w0[k]).abs().max() < 1e-2 * (free[k] - w0[k]).abs().max(), k


def test_resume_reproduces_the_uninterrupted_run_exactly(setup, straight):
    root, flags = setup
    flags = flags + ["--save-every", "3"]
    ok(train(flags + ["--steps", "3"], root / "resumed", nproc=2))
    result = ok(train(flags + ["--steps", "6", "--resume"], root / "resumed", nproc=2))
    assert "resuming after step 3" in result.stdout
    assert [r["loss"] for r in log(root / "resumed")] == [r["loss"] for r in log(straight)]
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(root / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_export_gives_the_same_logits_in_transformers(straight):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(straight / "hf").eval()
    config = json.loads((straight / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": L}
    assert config["max_position_embeddings"] == 2 * L and config["tie_word_embeddings"]
    ours = Llama.from_pretrained(straight / "final")
    plain = Llama.from_pretrained(straight / "final", rope_scaling={"rope_type": "default"})
    tokens = torch.randint(0, 49152, (2, 2 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(tokens)
        assert (hf(tokens).logits - logits).abs().max() <= 1e-4
        assert (plain(tokens) - logits).abs().max() > 1e-3  # so the scaling is part of what was compared


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "ntk", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": L},
    {"rope_type": "ntk-by-parts", "factor": 4.0, "original_max_position_embeddings": L},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": L},
], ids=lambda s: s["rope_type"])
def test_export_hf_keeps_every_variant(tmp_path, rope_scaling):
    from transformers import AutoModelForCausalLM

    tiny_llama(rope_scaling, vocab_size=320).save_pretrained(tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 320, (1, 3 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - Llama.from_pretrained(tmp_path / "ours")(tokens)).abs().max() <= 1e-4


def test_sequences_are_read_in_an_order_that_does_not_depend_on_the_world_size():
    data = Sequences(np.arange(10 * 4, dtype=np.uint32), seq_len=4, seed=0)  # 10 sequences, 0..9

    def seen(step, world, micro_batch_size, batch_size=4):
        accum = batch_size // (world * micro_batch_size)
        return sorted(int(x[i, 0]) // 4 for m in range(accum) for r in range(world)
                      for x, _ in [data.batch(step, m, r, world, micro_batch_size, batch_size)] for i in range(len(x)))

    for step in range(6):  # 24 sequences: wraps into a second and a third epoch
        assert seen(step, 1, 4) == seen(step, 2, 1) == seen(step, 4, 1)
    epochs = [sorted(int(data[p][0]) // 4 for p in range(e * 10, e * 10 + 10)) for e in range(2)]
    assert epochs == [list(range(10))] * 2  # every epoch reads every sequence once
    assert [int(data[p][0]) for p in range(10)] != [int(data[p][0]) for p in range(10, 20)]  # in a new order
    x, y = data.batch(0, 0, 0, 1, 1, 1)
    assert torch.equal(y[0, :-1], x[0, 1:]) and y[0, -1] == -100


def test_documents_are_bookended_by_bos_and_eos_and_tokenized_once(setup, tmp_path):
    tokenizer = Tokenizer.from_pretrained(setup[0] / "tiny")
    (tmp_path / "a.txt").write_text("A whole book.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "One."}) + "\n\n" + json.dumps({"text": "Two."}) + "\n")
    files = [tmp_path / "a.txt", tmp_path / "b.jsonl"]
    tokens, key = tokenize(files, tokenizer, "tok", tmp_path / "cache")
    assert tokens.tolist() == [i for doc in ("A whole book.", "One.", "Two.")
                               for i in tokenizer.encode(doc, bos=True, eos=True)]
    assert tokenize(files, tokenizer, "tok", tmp_path / "cache")[1] == key  # cached
    assert tokenize(files, tokenizer, "another tokenizer", tmp_path / "cache")[1] != key
    (tmp_path / "a.txt").write_text("A changed book.")
    assert tokenize(files, tokenizer, "tok", tmp_path / "cache")[1] != key
    (tmp_path / "c.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1 is not a JSON object"):
        tokenize([tmp_path / "c.jsonl"], tokenizer, "tok", tmp_path / "cache")


def test_lr_warms_up_linearly_then_stays_constant_or_decays():
    constant = get_args(["--lr", "1", "--warmup-steps", "4", "--steps", "8"])
    assert [lr_at(k, constant) for k in range(8)] == [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]
    linear = get_args(["--lr", "1", "--warmup-steps", "4", "--steps", "8", "--lr-schedule", "linear"])
    assert [lr_at(k, linear) for k in range(8)] == [0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25]


def test_memory_plan_and_flops_follow_the_model_shape():
    cfg = LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000)
    with torch.device("meta"):
        n = sum(p.numel() for p in Llama(cfg).parameters()) - 32000 * 4096  # the embedding lookup is no matmul
    assert flops_per_token(cfg, 65536) == 6 * (n - 32 * 2 * 4096 - 4096) + 12 * 32 * 4096 * 65536  # norms neither
    ac, no_ac = estimate_memory(cfg, 65536, 8, True), estimate_memory(cfg, 65536, 8, False)
    assert ac["total"] < 80 * 1024 ** 3 < no_ac["total"]
    assert estimate_memory(cfg, 65536, 16, True)["sharded state"] == ac["sharded state"] / 2
    assert ac["sharded state"] == 16 * (n + 32000 * 4096) / 8


# ----------------------------------------------------------------------------- bad input: one line, nothing lost

def snapshot(path):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def one_error_line(result, *words, launcher=False):
    """train.py's own stderr is one `train.py: error: ...` line, said once (torchrun adds its own failure report)."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "train.py: error:" in line]
    assert len(lines) == 1, result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "[rank" not in result.stderr and (launcher or result.stderr.strip() == lines[0]), result.stderr
    return lines[0]


def test_data_shorter_than_one_sequence(setup, tmp_path):
    root, flags = setup
    (tmp_path / "short.txt").write_text("Too short to train on.")
    result = train(flags + ["--data", str(tmp_path / "short.txt")], tmp_path / "out")
    one_error_line(result, "fewer than one training sequence of 128")
    assert not (tmp_path / "out").exists()


def test_scale_below_one(setup, tmp_path):
    one_error_line(train(setup[1] + ["--scale", "0.5"], tmp_path / "out"), "--scale must be >= 1")


def test_batch_the_world_size_cannot_divide(setup, tmp_path):
    result = train(setup[1] + ["--batch-size", "3"], tmp_path / "out", nproc=2)
    one_error_line(result, "--batch-size 3 is not divisible by 2 processes", launcher=True)


def test_another_runs_output_directory_is_left_alone(setup, straight):
    before = snapshot(straight)
    one_error_line(train(setup[1] + ["--steps", "6", "--lr", "1e-3"], straight), "already holds a run", "--overwrite")
    one_error_line(train(setup[1] + ["--steps", "6", "--lr", "1e-3", "--resume"], straight), "--lr 0.003 -> 0.001")
    assert snapshot(straight) == before


def test_corrupt_checkpoint_on_resume(setup, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    with open(out / "step_6" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    before = snapshot(out)
    one_error_line(train(setup[1] + ["--steps", "8", "--resume"], out), "checkpoint", "step_6 is corrupt")
    assert snapshot(out) == before
