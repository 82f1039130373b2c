"""Issue 21, "trust nothing you load": nothing loaded runs code, no output replaces an input, one run per folder, no
non-finite number passes, and every bad file is one line. Each test fails on the code before the fix."""
import json
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import common
from checkpoint import save_model
from conftest import ROOT, byte_tokenizer, one_error_line, run_script, snapshot, tiny_llama, write_hf_llama
from convert_llama import convert
from test_train import log, ok, setup, train  # noqa: F401 (setup is a fixture)
from tokenizer import Tokenizer
from train import tokenize


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run2(setup):
    """A finished run of 2 steps with a checkpoint after each; tests copy it before changing it."""
    root, flags = setup
    ok(train(flags + ["--steps", "2", "--save-every", "1"], root / "run2"))
    return root / "run2"


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """A tiny checkpoint of ours with the byte tokenizer, and a document, for the evaluations."""
    root = tmp_path_factory.mktemp("eval")
    save_model(tiny_llama(), root / "ours")
    byte_tokenizer().save_pretrained(root / "ours")
    (root / "doc.txt").write_text("The grass is green. " * 20)
    return root


def copy_run(run, dest):
    shutil.copytree(run, dest)
    return dest


def error_after_the_bar(result, script, *words):
    """As one_error_line, for an error after training started: the progress bar's lines, then the one error line."""
    errors = [line for line in result.stderr.splitlines() if f"{script}: error:" in line]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"{script}: error: "), result.stderr[-3000:]
    assert all(w in errors[0] for w in words), errors[0]
    return errors[0]


class Planted:
    """A pickle that runs code when it is loaded: writes `marker` (what any code could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------- code execution


def test_a_planted_metadata_pickle_cannot_run_code_on_resume(setup, run2, tmp_path):
    out = copy_run(run2, tmp_path / "run")
    marker = tmp_path / "ran"
    (out / "step_2" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    result = train(setup[1] + ["--steps", "3", "--save-every", "1", "--resume"], out)
    assert not marker.exists(), "the .metadata pickle ran code"
    one_error_line(result, "train.py", "step_2 is corrupt", "posix.system")


def test_a_planted_optimizer_item_cannot_run_code_on_resume(setup, run2, tmp_path):
    """dcp reads the optimizer's non-tensor items (param_groups' lr, betas, ...) with torch.load(weights_only=False):
    a shard holding a pickle that runs code, and .metadata pointing the lr at it (metadata dcp itself wrote)."""
    out = copy_run(run2, tmp_path / "run")
    marker = tmp_path / "ran"
    torch.save(Planted(marker), out / "step_2" / "planted.distcp")
    with open(out / "step_2" / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test trusts the file it just wrote
    [index] = [i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr"]
    info = metadata.storage_data[index]
    metadata.storage_data[index] = type(info)("planted.distcp", 0, (out / "step_2" / "planted.distcp").stat().st_size)
    (out / "step_2" / ".metadata").write_bytes(pickle.dumps(metadata))
    result = train(setup[1] + ["--steps", "3", "--save-every", "1", "--resume"], out)
    assert not marker.exists(), "the optimizer item ran code"
    one_error_line(result, "train.py", "step_2 is corrupt", "Weights only load failed")
    # a shard named outside step_N is refused too
    metadata.storage_data[index] = type(info)("../../elsewhere.distcp", 0, 10)
    (out / "step_2" / ".metadata").write_bytes(pickle.dumps(metadata))
    one_error_line(train(setup[1] + ["--steps", "3", "--save-every", "1", "--resume"], out), "train.py",
                   "step_2 is corrupt", "names a shard '../../elsewhere.distcp' outside")


# ----------------------------------------------------------------------------- data loss


def test_an_output_that_is_an_input_is_refused_before_any_work(setup, tiny_eval, tmp_path):
    ours, doc = tiny_eval / "ours", tiny_eval / "doc.txt"
    before = snapshot(tiny_eval)
    common_args = ["--lengths", 32, "--rope", "default", "--dtype", "float32"]
    cases = [
        ("eval_ppl.py", ["--checkpoint", ours, "--data", doc, "--out", doc, *common_args], "--out", "is --data"),
        ("eval_ppl.py", ["--checkpoint", ours, "--data", doc, "--out", ours / "model.safetensors", *common_args],
         "--out", "lies inside --checkpoint"),
        ("eval_ppl.py", ["--checkpoint", ours, "--data", tiny_eval, "--plot", doc.with_suffix(".png"),
                         *common_args], "--plot", "lies inside --data"),
        ("eval_passkey.py", ["--checkpoint", ours, "--lengths", 300, "--out", ours / "config.json"], "--out",
         "lies inside --checkpoint"),
        ("eval_passkey.py", ["--checkpoint", ours, "--lengths", 300, "--plot", ours / "p.png"], "--plot",
         "lies inside --checkpoint"),
        ("tools/bench.py", ["--checkpoint", ours, "--no-hf", "--out", ours / "config.json"], "--out",
         "lies inside --checkpoint"),
    ]
    for script, args, flag, how in cases:
        one_error_line(run_script(script, *args), Path(script).name, flag, how, "which this command reads")
    assert snapshot(tiny_eval) == before
    root, flags = setup
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(flags[flags.index("--data") + 1], data / "book.txt")
    for flags_, out_dir, how in ((flags + ["--data", str(data)], data / "run", "lies inside --data"),
                                 (flags, root / "tiny" / "run", "lies inside --model"),
                                 (flags + ["--data", str(data / "book.txt")], data, "holds --data")):
        one_error_line(train(flags_ + ["--steps", "1"], out_dir), "train.py", "--out-dir", how)
    assert sorted(p.name for p in data.iterdir()) == ["book.txt"] and not (root / "tiny" / "run").exists()


def test_a_conversion_never_replaces_the_meta_tokenizer_it_reads(tmp_path):
    """Meta's tokenizer.model may lie next to the checkpoint folder (Llama 2's download): it is an input too."""
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / "llama-2-7b" / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4}))
    (tmp_path / "tokenizer.model").write_bytes(b"the tokenizer")
    with pytest.raises(ValueError, match="OUT .*tokenizer.model is SRC's tokenizer"):
        convert(tmp_path / "llama-2-7b", tmp_path / "tokenizer.model", force=True)
    assert (tmp_path / "tokenizer.model").read_bytes() == b"the tokenizer"
    with pytest.raises(ValueError, match="found no consolidated.NN.pth; consolidated.00.pth is missing"):
        convert(tmp_path / "llama-2-7b", tmp_path / "out")  # (an IndexError before)


def test_overwrite_replaces_a_run_and_nothing_else(setup, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = train(setup[1] + ["--steps", "1", "--overwrite"], mine)
    one_error_line(result, "train.py", "--overwrite replaces a run", "holds none (no run.json)")
    assert (mine / "thesis.tex").read_text() == "years of work"


def started(proc):
    """Wait until train.py has loaded everything and trains (its plan is printed)."""
    while "data:" not in (line := proc.stdout.readline()):
        assert line or proc.poll() is None, proc.stderr.read()


def test_one_run_per_folder_with_two_real_processes(setup, tmp_path):
    root, flags = setup
    out = tmp_path / "run"
    first = train(flags + ["--steps", "400", "--save-every", "1000"], out, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    try:
        started(first)
        for extra in ([], ["--resume"], ["--overwrite"]):
            result = train(flags + ["--steps", "400", "--save-every", "1000", *extra], out)
            one_error_line(result, "train.py", f"{out} is in use by another train.py",
                           f"pid {first.pid} on host {socket.gethostname()}")
        assert first.poll() is None  # the running one was left alone
    finally:
        first.kill()  # kill -9: the kernel drops its lock
        first.communicate()
    ok(train(flags + ["--steps", "1", "--save-every", "1000", "--resume"], out))  # not stuck
    assert not (out / ".lock").exists()


# ----------------------------------------------------------------------------- silently wrong


def test_a_non_finite_weight_is_refused_where_it_is_read(tiny_eval, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_eval / "ours", bad)
    state = load_file(bad / "model.safetensors")
    state["layers.1.feed_forward.w2.weight"][3, 5] = math.nan
    save_file(state, bad / "model.safetensors", metadata={"n_heads": "4", "n_kv_heads": "2", "head_dim": "16"})
    result = run_script("eval_ppl.py", "--checkpoint", bad, "--data", tiny_eval / "doc.txt", "--lengths", 32,
                        "--rope", "default", "--out", tmp_path / "r.json")
    one_error_line(result, "eval_ppl.py", "tensor layers.1.feed_forward.w2.weight holds 1 value(s) that are not "
                   "finite")
    assert not (tmp_path / "r.json").exists()
    hf = tmp_path / "hf"
    write_hf_llama(hf, vocab_size=320)
    state = load_file(hf / "model.safetensors")
    state["model.norm.weight"][0] = math.inf
    save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tensor norm.weight holds 1 value"):
        convert(hf, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def strict_json(path):
    """json.loads that fails on NaN and Infinity, which Python writes by default and JSON does not have."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


@pytest.mark.parametrize("norm, missing", [(3e38, "nan"), (1e6, "inf")])
def test_a_report_never_holds_nan_and_says_why_a_number_is_missing(tiny_eval, tmp_path, norm, missing):
    """Finite weights whose activations overflow float32: a NaN loss (norm 3e38), or a finite loss whose perplexity
    overflows a float (norm 1e6)."""
    huge = tmp_path / "huge"
    model = tiny_llama()
    with torch.no_grad():
        model.norm.weight.fill_(norm)
    save_model(model, huge)
    byte_tokenizer().save_pretrained(huge)
    result = run_script("eval_ppl.py", "--checkpoint", huge, "--data", tiny_eval / "doc.txt", "--lengths", 32,
                        "--rope", "default", "--dtype", "float32", "--out", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    report = strict_json(tmp_path / "r.json")
    assert report["perplexity"] == {"default": {"32": None}}
    assert f"perplexity.default.32: {missing}" in report["missing"]["numbers"]
    assert "overflowed float32" in report["missing"]["why"]
    with pytest.raises(ValueError):  # and no JSON file is ever written with one
        common.write_json(tmp_path / "x.json", {"x": math.nan})
    assert not (tmp_path / "x.json").exists()


def test_training_stops_at_the_first_non_finite_step_and_exports_nothing(setup, tmp_path):
    """lr 1e30: step 1 is finite, step 2's gradient is NaN. The run stops there, naming the step; the checkpoint of
    step 1 stays `latest`, the log has step 1 only, and no final/ or hf/ is written."""
    result = train(setup[1] + ["--steps", "3", "--save-every", "1", "--lr", "1e30"], tmp_path / "run")
    line = error_after_the_bar(result, "train.py", "step 2:", "training diverged and stops")
    assert "nan" in line
    assert (tmp_path / "run" / "latest").read_text() == "step_1"
    assert [r["step"] for r in log(tmp_path / "run")] == [1]
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "hf").exists()


def test_the_token_cache_is_keyed_by_content_and_a_damaged_cache_is_rebuilt(setup, tmp_path):
    tokenizer = Tokenizer.from_pretrained(setup[0] / "tiny")
    doc, cache = tmp_path / "doc.txt", tmp_path / "cache"
    doc.write_text("Alice was beginning to get very tired.")
    stat = doc.stat()
    tokens, key = tokenize([doc], tokenizer, "tok", cache)
    expected = tokens.tolist()
    doc.write_text("Bobby was beginning to get very tired.")  # same size, and the same mtime
    os.utime(doc, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert tokenize([doc], tokenizer, "tok", cache)[1] != key
    doc.write_text("Alice was beginning to get very tired.")
    [cached] = [p for p in cache.glob(f"tokens-{key}.u32")]
    with open(cached, "r+b") as f:  # a cache file cut short
        f.truncate(8)
    tokens, again = tokenize([doc], tokenizer, "tok", cache)
    assert again == key and tokens.tolist() == expected
    cached.write_bytes(np.array(expected[::-1], dtype=np.uint32).tobytes())  # the same length, other tokens
    assert tokenize([doc], tokenizer, "tok", cache)[0].tolist() == expected


# ----------------------------------------------------------------------------- tracebacks instead of one line


def test_a_passkey_length_the_machine_cannot_hold_is_one_line(tiny_eval, tmp_path):
    result = run_script("eval_passkey.py", "--checkpoint", tiny_eval / "ours", "--lengths", 1000000000,
                        "--rope", "default", "--out", tmp_path / "r.json", timeout=120)
    one_error_line(result, "eval_passkey.py", "--lengths 1,000,000,000: the KV cache alone would take")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("case, words", [
    ("tiktoken.json with an extra key", ["tiktoken.json must be a JSON object with the keys", "'extra'"]),
    ("tiktoken.json as a list", ["tiktoken.json must be a JSON object", "a JSON list"]),
    ("tiktoken.json with a string id", ["tiktoken.json: special_tokens must map names to ids"]),
    ("bos_id outside the embedding table", ["the tokenizer's bos_id is 5000", "258 rows"]),
])
def test_bad_tokenizer_files_are_one_line(tiny_eval, tmp_path, case, words):
    ours = tmp_path / "ours"
    shutil.copytree(tiny_eval / "ours", ours)
    meta = json.loads((ours / "tiktoken.json").read_text())
    edited = {"tiktoken.json with an extra key": {**meta, "extra": 1},
              "tiktoken.json as a list": list(meta.values()),
              "tiktoken.json with a string id": {**meta, "special_tokens": {"<s>": "256"}},
              "bos_id outside the embedding table": {**meta, "bos_id": 5000}}[case]
    (ours / "tiktoken.json").write_text(json.dumps(edited))
    result = run_script("eval_ppl.py", "--checkpoint", ours, "--data", tiny_eval / "doc.txt", "--lengths", 32,
                        "--rope", "default")
    one_error_line(result, "eval_ppl.py", *words)


def legacy_bin(src):
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)


def index(src, weight_map):
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, **weight_map}))


def edit_config(src, **edits):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **edits}))


OUTSIDE = "../elsewhere/x.safetensors"  # a shard next to SRC, not in it
BAD_SOURCES = {  # an edit of a tiny HF checkpoint -> words of the one-line error
    "index without weight_map": (lambda src: index(src, {}), ["model.safetensors.index.json has no \"weight_map\""]),
    "index with a list": (lambda src: index(src, {"weight_map": ["model-00001-of-00001.safetensors"]}),
                          ["has no \"weight_map\" object"]),
    "index pointing outside SRC": (lambda src: index(src, {"weight_map": {"lm_head.weight": OUTSIDE}}),
                                   [f"lists the shard {OUTSIDE}, outside"]),
    "config.json holding a list": (lambda src: (src / "config.json").write_text("[1, 2]"),
                                   ["config.json must hold a JSON object", "not a list"]),
    "rope_parameters as a string": (lambda src: edit_config(src, rope_parameters="yarn"),
                                    ["rope_parameters must be a JSON object", "not str 'yarn'"]),
    "legacy pytorch_model.bin": (legacy_bin, ["pytorch_model.bin is in PyTorch's legacy format", "torch.save("]),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_checkpoint_files_are_one_line_and_write_nothing(tmp_path, case):
    src = tmp_path / "hf"
    write_hf_llama(src, vocab_size=320)
    damage, words = BAD_SOURCES[case]
    damage(src)
    (tmp_path / "elsewhere").mkdir()
    save_file({"lm_head.weight": torch.zeros(320, 64)}, tmp_path / "elsewhere" / "x.safetensors")
    one_error_line(run_script("convert_llama.py", src, tmp_path / "out"), "convert_llama.py", *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("params, words", [
    ({"n_layers": 2, "n_heads": 4}, ["params.json has no 'dim'"]),
    ({"dim": "64", "n_layers": 2, "n_heads": 4}, ["dim must be a positive integer (got '64')"]),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": "32"}, ["multiple_of must be a positive number"]),
    ([64, 2, 4], ["params.json must hold a JSON object"]),
])
def test_a_bad_meta_params_json_is_one_line(tmp_path, params, words):
    src = tmp_path / "meta"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(params))
    torch.save({"tok_embeddings.weight": torch.zeros(8, 64)}, src / "consolidated.00.pth")
    one_error_line(run_script("convert_llama.py", src, tmp_path / "out"), "convert_llama.py", *words)


@pytest.mark.parametrize("latest", [b"garbage", b"step_", b"step_99", b"../step_2", b"\xff\xfe"])
def test_latest_holding_garbage_is_one_line(setup, run2, tmp_path, latest):
    out = copy_run(run2, tmp_path / "run")
    (out / "latest").write_bytes(latest)
    before = snapshot(out)
    result = train(setup[1] + ["--steps", "3", "--save-every", "1", "--resume"], out)
    one_error_line(result, "train.py", "latest should name a checkpoint folder step_N")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- leftovers and small things


def test_a_symlinked_out_replaced_with_force_leaves_no_link_behind(tmp_path):
    src = tmp_path / "hf"
    write_hf_llama(src, vocab_size=320)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not mine to delete")
    (tmp_path / "out").symlink_to(target)
    convert(src, tmp_path / "out", force=True)
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "model.safetensors").exists()
    assert (target / "keep.txt").read_text() == "not mine to delete"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .out.HOST.PID.old link
    stale = tmp_path / f".out.{socket.gethostname()}.{2 ** 22 + 1}.old"  # a killed writer's, a link
    stale.symlink_to(target)
    convert(src, tmp_path / "out", force=True)
    assert not stale.is_symlink() and (target / "keep.txt").exists()


def process_state(pid):
    """'R', 'S', 'Z' (a zombie: dead, not yet reaped) ..., or None for no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_a_killed_download_leaves_no_pip_running_and_no_temporary_folder(tmp_path):
    """A download killed with -9 while pip waits on a package index (a local server that accepts and never answers):
    pip dies with it, and the next download removes the temporary folder it left."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    connected = threading.Event()
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return
            connected.set()

    threading.Thread(target=accept, daemon=True).start()
    script = ("from tools import assets; assets.ARCHIVES[('nosuchpkg', '1.0')] = "
              "('nosuchpkg-1.0-py3-none-any.whl', '0' * 64); assets.archive('nosuchpkg', '1.0')")
    cache = tmp_path / "cache"

    def download(index_url, **popen):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "YARN_ASSETS_CACHE": str(cache), "PIP_INDEX_URL": index_url,
               "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
               "PIP_CONFIG_FILE": os.devnull}
        return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)

    try:
        proc = download(f"http://127.0.0.1:{server.getsockname()[1]}/simple")
        assert connected.wait(120), proc.communicate()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1
        pip = int(children[0])
        proc.kill()
        proc.wait()
        deadline = time.time() + 30
        while process_state(pip) not in (None, "Z") and time.time() < deadline:
            time.sleep(0.1)
        assert process_state(pip) in (None, "Z"), "pip outlived the download that started it"
        left = [p.name for p in cache.iterdir() if p.name.startswith(".")]
        assert len(left) == 1 and left[0].startswith(".nosuchpkg-1.0-py3-none-any.whl.")
    finally:
        server.close()
        for connection in held:
            connection.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port nothing listens on: pip fails at once
    port = closed.getsockname()[1]
    closed.close()
    _, err = download(f"http://127.0.0.1:{port}/simple").communicate(timeout=120)
    assert "pip download nosuchpkg==1.0 failed" in err, err
    assert list(cache.iterdir()) == []


def test_data_files_are_found_in_any_case(tmp_path):
    (tmp_path / "A.TXT").write_text("upper case")
    (tmp_path / "b.Jsonl").write_text(json.dumps({"text": "mixed case"}) + "\n")
    files = common.document_files([tmp_path])
    assert [f.name for f in files] == ["A.TXT", "b.Jsonl"]
    assert [text for _, text in common.read_documents(files)] == ["upper case", "mixed case"]


def test_a_seq_len_past_s_times_l_is_refused(setup, tmp_path):
    result = train(setup[1] + ["--seq-len", "200", "--steps", "1"], tmp_path / "run")
    one_error_line(result, "train.py", "--seq-len 200 is longer than s x L = 128 tokens")
    assert not (tmp_path / "run").exists()


def test_resume_compares_resolved_paths(setup, tmp_path):
    root, flags = setup
    shutil.copy(flags[flags.index("--data") + 1], tmp_path / "doc.txt")
    flags = flags[:flags.index("--data")] + flags[flags.index("--data") + 2:]
    command = [sys.executable, str(ROOT / "train.py"), *flags, "--save-every", "1", "--out-dir", "run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok(subprocess.run(command + ["--data", "doc.txt", "--steps", "1"], cwd=tmp_path, env=env, capture_output=True,
                      text=True, timeout=300))
    result = ok(subprocess.run(command + ["--data", "./doc.txt", "--steps", "2", "--resume"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300))
    assert "resuming after step 1" in result.stdout


def test_mfu_never_exceeds_100_percent(setup, tmp_path):
    """A peak far below what a step achieves (as when the matmul peak is measured on a busy machine)."""
    result = ok(train(setup[1] + ["--steps", "2", "--peak-tflops", "1e-9"], tmp_path / "run"))
    assert all(r["mfu"] <= 1 for r in log(tmp_path / "run")), log(tmp_path / "run")
    assert "MFU figures are unreliable" in result.stdout
    assert not [m for m in re.findall(r"mfu=([\d.]+)%", result.stderr) if float(m) > 100]
