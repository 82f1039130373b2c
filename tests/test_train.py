"""train.py end to end on CPU: torchrun, gloo and FSDP2 on a tiny random Llama, a real book and SmolLM2's tokenizer;
resuming, and every way a run could lose data or write a wrong number."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tools import assets
from tools import memory_plan
from common import ctrl_c_held
from conftest import ROOT, one_error_line, run_script, sigint_as_ctrl_c, snapshot, tiny_llama
from model import Llama
from tokenizer import Tokenizer
import train as train_module
from train import Sequences, check_args, get_args, lr_at, tokenize
from checkpoint import load_model, save_model

L = 64  # the tiny model's trained context; --scale 2 trains it on sequences of 128 tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint with SmolLM2's tokenizer, one book, and the flags every run here shares."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = Tokenizer.from_pretrained(assets.smollm2_gguf())
    save_model(tiny_llama(vocab_size=49152, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id), 
        root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    book = assets.ensure_books(ROOT / "data" / "books")[0]
    flags = ["--model", str(root / "tiny"), "--data", str(book), "--scale", "2", "--batch-size", "4", "--lr", "3e-3",
             "--warmup-steps", "1", "--cache-dir", str(root / "cache"), "--peak-tflops", "0.05", "--dtype", "float32"]
    return root, flags


def train(flags, out_dir, nproc=1, **popen):
    """Run train.py as users do: `python train.py` for one process, torchrun for more."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, str(ROOT / "train.py"), *flags, "--out-dir", str(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


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
    assert all(r["peak_memory_bytes"] > 2 ** 20 for r in log(straight))  # rank 0's, logged with every step
    model = load_model(straight / "final")
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
    assert oct((straight / "final" / "model.safetensors").stat().st_mode & 0o777) == "0o644"  # as convert writes
    assert not [p for p in straight.rglob(".*") if p.name != ".metadata"], "temporary files left behind"


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


def test_a_compiled_step_is_the_eager_step(setup, one_step):
    """--compile (each block through torch.compile, inside FSDP2's wrapping): the same loss and the same weights after
    the step as the eager run, in fp32."""
    root, flags = setup
    ok(train(flags + ["--steps", "1", "--lr", "2e-4", "--micro-batch-size", "2", "--compile"], root / "compiled"))
    (a,), (b,) = log(one_step[0]), log(root / "compiled")
    assert abs(a["loss"] - b["loss"]) <= 1e-5
    eager, compiled = (load_file(d / "final" / "model.safetensors") for d in (one_step[0], root / "compiled"))
    for k in eager:
        assert (eager[k] - compiled[k]).abs().max() <= 1e-5, k


def test_grad_clip_clips(setup, one_step):
    root, flags = setup
    ok(train(flags + ["--steps", "1", "--lr", "2e-4", "--grad-clip", "1e-12"], root / "clipped"))
    w0 = load_file(root / "tiny" / "model.safetensors")
    free = load_file(one_step[0] / "final" / "model.safetensors")
    clipped = load_file(root / "clipped" / "final" / "model.safetensors")
    for k in w0:  # AdamW is invariant to the gradient's scale until it is far below eps = 1e-8
        assert (clipped[k] - w0[k]).abs().max() < 1e-2 * (free[k] - w0[k]).abs().max(), k


def test_bf16_training_follows_the_fp32_loss_curve(setup, straight):
    """bf16 compute with fp32 master weights, optimizer state and gradient reduction (FSDP2's MixedPrecisionPolicy)
    takes the same steps as fp32 up to bf16 rounding: the losses of 6 steps agree to 1%."""
    root, flags = setup
    ok(train(flags + ["--steps", "6", "--save-every", "3", "--dtype", "bfloat16"], root / "bf16", nproc=2))
    fp32, bf16 = [r["loss"] for r in log(straight)], [r["loss"] for r in log(root / "bf16")]
    assert all(abs(a - b) <= 0.01 * a for a, b in zip(fp32, bf16)), (fp32, bf16)
    assert fp32 != bf16  # it did compute in bf16
    assert json.loads((root / "bf16" / "run.json").read_text())["dtype"] == "bfloat16"


def test_resume_reproduces_the_uninterrupted_run_exactly(setup, straight):
    root, flags = setup
    flags = flags + ["--save-every", "3"]
    ok(train(flags + ["--steps", "3"], root / "resumed", nproc=2))
    with open(root / "resumed" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1')  # a line cut short by a kill mid-write must not block --resume
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
    ours = load_model(straight / "final")
    tokens = torch.randint(0, 49152, (2, 2 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() <= 1e-4


def test_the_paper_128k_command_trains_at_one_length_and_records_another(setup):
    """Like the 128k runs (s = 32 on 64k-token sequences): --seq-len is honoured, and the model says factor 32 and
    max_position_embeddings 32·L."""
    root, flags = setup
    ok(train(flags + ["--scale", "32", "--seq-len", "96", "--steps", "1"], root / "s32"))
    assert json.loads((root / "s32" / "run.json").read_text())["seq_len"] == 96
    final = json.loads((root / "s32" / "final" / "config.json").read_text())
    assert final["rope_scaling"]["factor"] == 32.0 and final["max_position_embeddings"] == 32 * L
    assert log(root / "s32")[0]["tokens"] == 4 * 96


def test_sequences_are_read_in_an_order_that_does_not_depend_on_the_world_size():
    data = Sequences(np.arange(10 * 4, dtype=np.uint32), "key", seq_len=4, seed=0)  # 10 sequences, 0..9

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
    for name, content, message in (("c.jsonl", b'{"title": "no text"}\n', "c.jsonl:1 is not a JSON object"),
                                   ("d.txt", "caf\xe9".encode("latin-1"), "d.txt is not UTF-8 text"),
                                   ("e.txt", b"  \n", "e.txt is empty")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            tokenize([tmp_path / name], tokenizer, "tok", tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_lr_warms_up_linearly_then_stays_constant_or_decays():
    constant = get_args(["--lr", "1", "--warmup-steps", "4", "--steps", "8"])
    assert [lr_at(k, constant) for k in range(8)] == [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]
    linear = get_args(["--lr", "1", "--warmup-steps", "4", "--steps", "8", "--lr-schedule", "linear"])
    assert [lr_at(k, linear) for k in range(8)] == [0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25]


def test_memory_plan_has_a_row_per_paper_run_and_follows_the_model_shape():
    cfg = memory_plan.config("Llama 2 7B")
    with torch.device("meta"):
        n = sum(p.numel() for p in Llama(cfg).parameters())
    ac, no_ac = memory_plan.estimate_memory(cfg, 65536, 8, True), memory_plan.estimate_memory(cfg, 65536, 8, False)
    assert ac["total"] < 80 * 1024 ** 3 < no_ac["total"]
    assert memory_plan.estimate_memory(cfg, 65536, 16)["sharded state"] == ac["sharded state"] / 2
    assert ac["sharded state"] == 16 * n / 8  # every parameter: fp32 weight, gradient and two AdamW moments
    rows = memory_plan.paper_table(80).splitlines()[1:]
    assert len(rows) == len(memory_plan.PAPER_RUNS) == 7
    assert rows[4].split()[-1] == "24"  # 70B: ~140 GB of sharded fp32 state per GPU on 8 GPUs; 24 make it fit


# ----------------------------------------------------------------------------- bad input: one line, nothing lost


def test_data_shorter_than_one_sequence(setup, tmp_path):
    root, flags = setup
    (tmp_path / "short.txt").write_text("Too short to train on.")
    result = train(flags + ["--data", str(tmp_path / "short.txt")], tmp_path / "out")
    one_error_line(result, "train.py", "fewer than one training sequence of 128")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--grad-clip", "-1", "--grad-clip: must be a finite number >= 0 (got -1)"),
    ("--scale", "inf", "--scale: must be a finite number >= 1 (got inf)"),
    ("--scale", "0.5", "--scale: must be a finite number >= 1 (got 0.5)"),
    ("--lr", "0", "--lr: must be a finite number > 0 (got 0)"),
    ("--lr", "nan", "--lr: must be a finite number > 0 (got nan)"),
    ("--steps", "0", "--steps: must be a finite number >= 1 (got 0)"),
    ("--adam-betas", "0.9", "--adam-betas: expected 2 arguments"),
])
def test_a_number_out_of_range_is_one_line_before_anything_runs(capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        get_args([flag, *value.split()])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith("train.py: error: ")


def test_a_warm_up_longer_than_the_run_is_refused(setup, tmp_path):
    one_error_line(train(setup[1] + ["--steps", "3", "--warmup-steps", "4"], tmp_path / "out"), "train.py",
                   "--warmup-steps 4 is more than --steps 3", "--warmup-steps 3 or fewer")
    assert not (tmp_path / "out").exists()


def test_the_default_training_books_are_held_out_of_the_default_evaluation(setup, tmp_path):
    result = run_script("eval_ppl.py", "--checkpoint", setup[0] / "tiny", "--lengths", "32", "--max-docs", "5",
                        "--rope", "default", "--dtype", "float32", "--out", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    evaluated = {Path(d["name"]).name for d in json.loads((tmp_path / "r.json").read_text())["documents"]}
    trained = {Path(p).name for p in train_module.DEFAULT_DATA}
    assert evaluated == {"alice29.txt", "asyoulik.txt"} and trained and not evaluated & trained
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "are held out" in " ".join(help_text.split())


def test_a_failed_start_leaves_nothing_behind(setup, tmp_path):
    root, flags = setup
    result = train(flags + ["--beta-fast", "0.5"], tmp_path / "out")
    one_error_line(result, "train.py", "beta_fast (0.5) must be greater than beta_slow (1)")
    assert not (tmp_path / "out").exists()
    ok(train(flags + ["--beta-fast", "16", "--steps", "1"], tmp_path / "out"))  # the corrected retry just runs


def test_batch_the_world_size_cannot_divide(setup, tmp_path):
    result = train(setup[1] + ["--batch-size", "3"], tmp_path / "out", nproc=2)
    lines = [line for line in result.stderr.splitlines() if "train.py: error:" in line]
    assert result.returncode != 0 and len(lines) == 1 and "[rank" not in result.stderr, result.stderr
    assert "--batch-size 3 is not divisible by 2 processes" in lines[0]


def test_another_runs_output_directory_is_left_alone(setup, straight):
    before = snapshot(straight)
    one_error_line(train(setup[1] + ["--steps", "6", "--lr", "1e-3"], straight), "train.py", "already holds a run",
                   "--overwrite")
    one_error_line(train(setup[1] + ["--steps", "6", "--lr", "1e-3", "--resume"], straight), "train.py",
                   "--lr 0.003 -> 0.001")
    one_error_line(train(setup[1] + ["--steps", "5", "--resume", "--save-every", "3"], straight), "train.py",
                   "--steps 5 is below the step of", "latest checkpoint (6)")
    assert snapshot(straight) == before


def test_overwrite_never_deletes_the_model_or_data_it_reads(setup, tmp_path):
    root, flags = setup
    run = tmp_path / "run"
    shutil.copytree(root / "tiny", run / "model")
    shutil.copy(flags[flags.index("--data") + 1], run / "book.txt")
    before = snapshot(tmp_path)
    for inside in (["--model", str(run / "model")], ["--data", str(run / "book.txt")]):
        result = train(flags + inside + ["--overwrite"], run)
        one_error_line(result, "train.py", "lies inside --out-dir", "which --overwrite would delete")
    assert snapshot(tmp_path) == before
    check_args(get_args(["--overwrite", "--out-dir", str(run)]), 1)  # the defaults lie elsewhere
    with pytest.raises(ValueError, match="--model checkpoints/smollm2-135m lies inside --out-dir checkpoints"):
        check_args(get_args(["--overwrite", "--out-dir", "checkpoints"]), 1)


def test_resume_without_a_checkpoint_says_so_and_starts_at_step_0(setup, tmp_path):
    result = ok(train(setup[1] + ["--steps", "1", "--resume"], tmp_path / "new"))
    assert "holds no run yet, starting at step 0" in result.stdout
    assert [r["step"] for r in log(tmp_path / "new")] == [1]


def test_corrupt_checkpoint_on_resume(setup, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    with open(out / "step_6" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    before = snapshot(out)
    one_error_line(train(setup[1] + ["--steps", "8", "--resume", "--save-every", "3"], out), "train.py",
                   "checkpoint", "step_6 is corrupt")
    assert snapshot(out) == before


def test_leftovers_of_killed_writes_are_removed(setup, tmp_path):
    """What a kill -9 leaves (a half-written step_N.tmp, a .latest.HOST.PID.tmp) is removed by the next run."""
    root, flags = setup
    out = tmp_path / "run"
    ok(train(flags + ["--steps", "2", "--save-every", "1"], out))
    (out / "step_3.tmp").mkdir()
    (out / f".latest.{socket.gethostname()}.{2 ** 22 + 1}.tmp").write_text("step_")
    ok(train(flags + ["--steps", "3", "--save-every", "1", "--resume"], out))
    assert sorted(p.name for p in out.iterdir()) == ["final", "hf", "latest", "log.jsonl", "run.json", "step_2",
                                                     "step_3"]


def test_ctrl_c_is_one_line_and_exit_130(setup, tmp_path):
    proc = train(setup[1] + ["--steps", "400", "--save-every", "1"], tmp_path / "run", stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, preexec_fn=sigint_as_ctrl_c)
    while "step" not in (line := proc.stdout.readline()) or "data:" not in line:  # it has started
        assert proc.poll() is None, proc.stderr.read()
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "train.py: interrupted", err
    assert "Traceback" not in err and not list((tmp_path / "run").glob("*.tmp"))


def test_ctrl_c_while_checkpointing_waits_for_the_checkpoint():
    """A Ctrl-C during save_checkpoint is held until the block ends (the test above presses it at a random point,
    this one inside the block); a second press stops at once; Ctrl-C is the same as before afterwards, and stays
    ignored where it was (a job started with `&`, as this test may be)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever started pytest
    try:
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_held() as pressed:
                os.kill(os.getpid(), signal.SIGINT)
                reached.append(list(pressed))
        assert reached == [[signal.SIGINT]] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after the second press")
        assert len(reached) == 1
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with ctrl_c_held() as pressed:
            os.kill(os.getpid(), signal.SIGINT)
        assert pressed == [] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_full_disk_while_checkpointing_is_one_line(setup, tmp_path):
    """A real full disk: --out-dir on a 4 MiB tmpfs (the checkpoint needs ~40 MB), mounted in a user and mount
    namespace of its own (no root needed)."""
    root, flags = setup
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join([sys.executable, str(ROOT / "train.py"), *flags, "--steps", "1", "--out-dir", str(disk / "run")])
    script = f"mount -t tmpfs -o size=4m tmpfs {disk} && {command}; code=$?; ls -A {disk / 'run'}; exit $code"
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = result.stderr.strip().splitlines()  # the progress bar, then one line
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("train.py: error: cannot write checkpoint") and "0 MiB free on its disk" in lines[-1]
    listing = result.stdout.split()
    assert "run.json" in listing and "step_1.tmp" not in listing and "step_1" not in listing
