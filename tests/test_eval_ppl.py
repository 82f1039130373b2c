"""eval_ppl.py: sliding-window perplexity against an independent Hugging Face computation, the one-pass truncated
mode against separate passes, the progress bar that moves within a pass, and bad input on the command line (with the
evaluations' shared command line in common.py)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
import eval_ppl
import rope
from conftest import ROOT, byte_tokenizer, one_error_line, run_script, sigint_as_ctrl_c, snapshot, write_hf_llama
from convert_llama import convert
from model import LlamaConfig
from tokenizer import Tokenizer
from checkpoint import load_model

L = 64  # max_position_embeddings of the tiny model
VOCAB = 258


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, our checkpoint directory) with the same random weights, and a byte-level tokenizer."""
    tmp = tmp_path_factory.mktemp("tiny")
    hf = write_hf_llama(tmp / "hf", max_position_embeddings=L, vocab_size=VOCAB)
    convert(tmp / "hf", tmp / "ours")
    byte_tokenizer().save_pretrained(tmp / "ours")
    return hf, tmp / "ours"


def hf_sliding_perplexity(hf, tokens, length, stride):
    """Hugging Face's documented recipe ("Perplexity of fixed-length models"), with the loss summed per window so
    that every scored token weighs the same."""
    n, prev_end, total, count = tokens.numel(), 0, 0.0, 0
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        input_ids = tokens[None, begin:end]
        labels = input_ids.clone()
        labels[:, :-(end - prev_end)] = -100  # tokens the previous window scored
        with torch.no_grad():
            logits = hf(input_ids).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
        total, count = total + nll.item(), count + (labels[0, 1:] != -100).sum().item()
        prev_end = end
        if end == n:
            break
    assert count == n - 1 - (0 if stride < length else (n - 2) // stride)  # every token once (but window starts)
    return math.exp(total / count)


@pytest.mark.parametrize("length, stride", [(64, 16), (50, 13), (40, 40), (180, 64)])
def test_sliding_window_perplexity_matches_transformers(tiny, length, stride):
    hf, ckpt = tiny
    model = load_model(ckpt)
    gen = torch.Generator().manual_seed(0)
    docs = [("a", torch.randint(0, VOCAB, (203,), generator=gen)), ("b", torch.randint(0, VOCAB, (157,), generator=gen))]
    results = eval_ppl.evaluate(model, docs, [("default", None)], [length], mode="sliding", stride=stride)
    pairs = [p for p in results["default"][length] if p is not None]
    for (_, doc), (total, count) in zip([d for d in docs if len(d[1]) >= length], pairs):
        expected = hf_sliding_perplexity(hf, doc, length, stride)
        assert math.exp(total / count) == pytest.approx(expected, rel=1e-5)
    # token-weighted over documents: the pooled losses, not the mean of the per-document perplexities
    assert eval_ppl.perplexity(pairs) == pytest.approx(math.exp(sum(t for t, _ in pairs) / sum(c for _, c in pairs)))


def separate_pass_nll(model, doc, length):
    """Total loss of a window of `length` tokens: one pass over exactly those tokens (the pass length is what a
    dynamic variant scales to), scoring all but the first."""
    targets = torch.cat([doc[1:length], torch.tensor([-100])])
    with torch.inference_mode():
        return model.nll(doc[None, :length], targets[None]).double().sum().item()


def yarn(rope_type, factor=2.0):
    return {"rope_type": rope_type, "factor": factor, "original_max_position_embeddings": L}


@pytest.mark.parametrize("rope_type", ["default", "linear", "ntk", "yarn", "llama3"])
def test_truncated_one_pass_equals_separate_passes_for_static_rope(tiny, rope_type):
    model = load_model(tiny[1])
    doc = torch.randint(0, VOCAB, (260,), generator=torch.Generator().manual_seed(1))
    lengths = [16, 64, 100, 128, 257]
    scaling = rope.parse_rope_scaling(yarn(rope_type))
    results = eval_ppl.evaluate(model, [("doc", doc)], [(rope_type, scaling)], lengths)
    for W in lengths:
        (total, count), = results[rope_type][W]
        assert count == W - 1
        assert total == pytest.approx(separate_pass_nll(model, doc, W), rel=1e-5)


def test_compiled_blocks_score_as_the_eager_model(tiny):
    """--compile: inductor's fused kernels give the eager perplexities (fp32), at two lengths and after a switch of
    the RoPE scaling (the tables are inputs of the compiled blocks, not constants baked into them)."""
    doc = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(2))
    methods = [(t, rope.parse_rope_scaling(yarn(t))) for t in ("yarn", "linear")]
    eager, compiled = load_model(tiny[1]), load_model(tiny[1])
    common.compile_blocks(compiled)
    assert all(type(block).__name__ == "OptimizedModule" for block in compiled.layers)
    want = eval_ppl.evaluate(eager, [("doc", doc)], methods, [64, 199])
    got = eval_ppl.evaluate(compiled, [("doc", doc)], methods, [64, 199])
    for t, _ in methods:
        for W in (64, 199):
            (a, n), = want[t][W]
            (b, m), = got[t][W]
            assert n == m and b == pytest.approx(a, rel=1e-5)
    assert want["yarn"][199] != want["linear"][199]


COMPILED_MINUS_EAGER = """
import sys, torch, common
from checkpoint import load_model
eager, compiled = load_model(sys.argv[1]), load_model(sys.argv[1])
common.compile_blocks(compiled)
x = torch.randint(0, int(sys.argv[2]), (1, 65), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    print(float((compiled.nll(x[:, :-1], x[:, 1:]) - eager.nll(x[:, :-1], x[:, 1:])).abs().max()))
"""


def test_compiled_blocks_keep_to_the_kernels_torch_runs(tiny, tmp_path):
    """A compile with torch's own kernels, then one told to run as an AVX2 machine (ATEN_CPU_CAPABILITY=avx2), with
    the same default cache: each scores as the eager model (torch 2.13 served the first's graphs to the second: NaN)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "ATEN_CPU_CAPABILITY"))}
    for kernels in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        result = subprocess.run([sys.executable, "-c", COMPILED_MINUS_EAGER, str(tiny[1]), str(VOCAB)], cwd=ROOT,
                                capture_output=True, text=True, env={**env, "TMPDIR": str(tmp_path), **kernels})
        assert result.returncode == 0 and float(result.stdout) < 1e-4, (kernels, result.stdout, result.stderr[-2000:])


@pytest.mark.parametrize("rope_type", ["dynamic", "dynamic-yarn"])
def test_truncated_mode_runs_one_pass_per_length_for_dynamic_rope(tiny, rope_type):
    model = load_model(tiny[1])
    doc = torch.randint(0, VOCAB, (260,), generator=torch.Generator().manual_seed(2))
    lengths = [100, 160, 257]  # all past L (and past factor·L for dynamic-yarn): each length has its own scale
    with torch.no_grad():  # random weights attend almost uniformly: sharpen attention so the rotation matters
        for block in model.layers:
            block.attention.wq.weight *= 30
    model.set_rope_scaling(yarn(rope_type, factor=1.5))
    one_pass = eval_ppl.token_nll(model, doc[:257]).double().cumsum(0)  # what a static variant would reuse
    results = eval_ppl.evaluate(model, [("doc", doc)], [(rope_type, model.config.rope_scaling)], lengths)
    for W in lengths[:-1]:
        (total, _), = results[rope_type][W]
        assert total == pytest.approx(separate_pass_nll(model, doc, W), rel=1e-5)
        assert abs(total - one_pass[W - 2].item()) > 1e-5 * total
    (total, _), = results[rope_type][257]
    assert total == pytest.approx(one_pass[-1].item(), rel=1e-5)


def test_rope_arguments():
    config = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=96, vocab_size=VOCAB,
                         max_position_embeddings=8192, rope_scaling={"rope_type": "linear", "factor": 4})
    parsed = common.parse_rope_args(["checkpoint", "default", "yarn", '{"type": "yarn", "factor": 4, "beta_fast": 64}',
                                     '{"type": "dynamic_yarn"}'])
    methods = dict(common.rope_methods(parsed, 2.0, None, config))
    assert methods["checkpoint"] == config.rope_scaling and methods["default"] is None
    assert methods["yarn"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
    assert methods["yarn(factor=4,beta_fast=64)"] == {"rope_type": "yarn", "factor": 4.0, "beta_fast": 64,
                                                      "original_max_position_embeddings": 8192}
    assert methods["dynamic-yarn"] == {"rope_type": "dynamic-yarn", "factor": 2.0,  # "type" and aliases: rope.py's
                                       "original_max_position_embeddings": 8192}
    for bad in (["yarn", "yarn"], ["yran"], ['{"rope_type": "yarn",}'], ["[1, 2]"], ["plain"]):
        with pytest.raises(ValueError):
            common.parse_rope_args(bad)
    for bad, message in (('{"rope_type": "nope"}', "unknown rope_type 'nope'"),
                         ('{"type": "yarn", "rope_type": "linear"}', "says both \"type\": 'yarn' and \"rope_type\""),
                         ('{"rope_type": 2}', "rope_type must be a string"),
                         ('{"rope_type": "yarn", "facter": 4}', "key 'facter' is not read")):
        with pytest.raises(ValueError, match=message) as e:
            common.rope_methods(common.parse_rope_args([bad]), 2.0, None, config)
        assert str(e.value).startswith("--rope ") and "\n" not in str(e.value)


def test_windows_score_every_token_once():
    for n, length, stride in [(1000, 256, 64), (999, 100, 100), (10, 64, 16), (257, 64, 63)]:
        scored = [t for _, end, first in eval_ppl.windows(n, length, stride) for t in range(first, end)]
        starts = {start for start, _, _ in eval_ppl.windows(n, length, stride)} if stride == length else set()
        assert sorted(scored) == [t for t in range(1, n) if t not in starts]



@pytest.mark.parametrize("mode, scaling, lengths, passes", [
    ("sliding", None, [64, 100], 10 + 7 + 8 + 5),  # windows start every 16 tokens until one reaches the end:
                                                    # 0..144 and 0..96 at 64 tokens, 0..112 and 0..64 at 100
    ("truncated", None, [64, 100, 157], 2),  # one pass per document for a static variant
    ("truncated", yarn("dynamic"), [64, 100, 157], 3 + 3),  # one per length that fits for a dynamic one
])
def test_the_layer_bar_counts_every_block_of_every_pass(tiny, mode, scaling, lengths, passes):
    model = load_model(tiny[1])
    gen = torch.Generator().manual_seed(0)
    docs = [(name, torch.randint(0, VOCAB, (n,), generator=gen)) for name, n in (("a", 203), ("b", 157))]
    methods = [("m", rope.parse_rope_scaling(scaling))]
    assert eval_ppl.forward_passes(docs, methods, lengths, mode, 16) == passes
    with common.LayerProgress(model, passes) as bar:
        results = eval_ppl.evaluate(model, docs, methods, lengths, mode, 16)
    assert bar.n == bar.total == passes * len(model.layers)  # it moved block by block, and ended at its total
    assert results == eval_ppl.evaluate(model, docs, methods, lengths, mode, 16)  # the hooks change no number
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.layers)  # the hooks are gone


@pytest.mark.parametrize("name, device, native, expected", [
    ("float32", "cpu", True, "float32 (--dtype float32)"),
    ("bfloat16", "cpu", False, "bfloat16 (--dtype bfloat16)"),
    ("auto", "cuda", False, "bfloat16 (--dtype auto: CUDA)"),
    ("auto", "cpu", True, "bfloat16 (--dtype auto: this CPU computes bf16 natively"),
    ("auto", "cpu", False, "float32 (--dtype auto: no native bf16"),
])
def test_the_dtype_line_says_what_is_computed_and_why(monkeypatch, name, device, native, expected):
    monkeypatch.setattr(common, "native_bf16", lambda: native)
    assert common.dtype_reason(name, device).startswith(expected)
    assert common.dtype_reason(name, device).split()[0] == str(common.compute_dtype(name, device))[len("torch."):]


def test_auto_computes_in_fp32_where_torch_runs_avx2_kernels():
    """ATEN_CPU_CAPABILITY=avx2 makes torch run as on an AVX2 machine (bf16 emulated), even on a CPU with AMX."""
    line = "import common; print(common.dtype_reason('auto', 'cpu'))"
    result = subprocess.run([sys.executable, "-c", line], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
    assert result.stdout.startswith("float32 (--dtype auto: "), result.stderr


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("The grass is green. " * 20)
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x y " * 90}) + "\n")
    return tmp_path


def test_cli_writes_table_json_and_plot(tiny, docs):
    result = run_script("eval_ppl.py", "--checkpoint", tiny[1], "--data", "docs", "more.jsonl", "--lengths", 32, 128,
                        "--max-docs", 5, "--rope", "default", "yarn", '{"rope_type": "ntk", "factor": 4}',
                        "--factor", 3, "--dtype", "float32", "--out", "r.json", "--plot", "p.png", cwd=docs)
    assert result.returncode == 0, result.stderr
    assert "token-weighted" in result.stdout and "ntk(factor=4)" in result.stdout
    assert result.stdout.splitlines()[0] == "dtype: float32 (--dtype float32)"
    # the layer bar: 3 methods x 2 documents x one pass (truncated, static) x 2 blocks, named by what runs
    assert "12/12 [" in result.stderr and "yarn s=3: 128 tokens" in result.stderr and "ntk s=4" in result.stderr
    report = json.loads((docs / "r.json").read_text())
    assert [d["tokens"] for d in report["documents"]] == [400, 360]  # "short" has fewer than 128 tokens
    assert report["settings"]["rope_scaling"]["ntk(factor=4)"]["factor"] == 4.0
    assert report["settings"]["rope_scaling"]["yarn"]["factor"] == 3.0  # --factor is --scale's other name
    assert report["settings"]["mean"] == "token-weighted" and report["settings"]["dtype"] == "float32"
    assert set(report["perplexity"]) == {"default", "yarn", "ntk(factor=4)"}
    assert (docs / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--lengths", 5000], "no document has at least 5000 tokens"),
    (["--data", "empty.txt"], "empty.txt is empty"),
    (["--data", "latin1.txt"], "latin1.txt is not UTF-8 text"),
    (["--data", "nowhere/"], "--data nowhere: no such file or folder"),
    (["--mode", "sliding", "--lengths", 64, "--stride", 128], "--stride (128) must not exceed"),
    (["--rope", '{"rope_type": "yarn", "factor": }'], "is not valid JSON"),
    (["--rope", '{"rope_type": "yarn", "beta_fats": 8}'], "key 'beta_fats' is not read by rope_type yarn"),
    (["--checkpoint", "hf"], "a Hugging Face checkpoint? convert it"),
    (["--checkpoint", "nowhere"], "nowhere is not a checkpoint directory"),
    (["--checkpoint", "other_tokenizer"], "the tokenizer has 320 tokens but the model's embedding table has 258 rows"),
])
def test_bad_input_is_a_clear_error(tiny, docs, monkeypatch, args, message):
    monkeypatch.chdir(docs)
    (docs / "empty.txt").write_text("")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "hf").mkdir()
    (docs / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (docs / "hf" / "model.safetensors").write_bytes(b"")
    shutil.copytree(tiny[1], docs / "other_tokenizer")
    Tokenizer(ranks={bytes([i]): i for i in range(256)}, pattern=r"\S+|\s+", special_tokens={f"<{i}>": 256 + i for i in
              range(64)}, bos_id=256, eos_id=257).save_pretrained(docs / "other_tokenizer")
    with pytest.raises((ValueError, OSError)) as e:
        eval_ppl.main(["--checkpoint", str(tiny[1]), "--data", "docs/a.txt", "--lengths", "64", *map(str, args)])
    assert message in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--scale", "inf"], "--scale/--factor: must be a finite number >= 1 (got inf)"),
    (["--factor", "inf"], "--scale/--factor: must be a finite number >= 1 (got inf)"),
    (["--lengths", "1"], "--lengths: must be a finite number >= 2 (got 1)"),
    (["--max-docs", "0"], "--max-docs: must be a finite number >= 1 (got 0)"),
    (["--dtype", "fp16"], "--dtype: invalid choice: 'fp16'"),
])
def test_bad_numbers_are_one_line_before_anything_runs(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        eval_ppl.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0] and lines[0].startswith("eval_ppl.py: error")


def test_output_paths_are_checked_before_the_evaluation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    for args, message in ((["--plot", "ppl.bmpx"], "--plot ppl.bmpx: the extension must be one of"),
                          (["--out", str(tmp_path)], "is a folder"),
                          (["--out", "file/r.json"], "cannot write into")):
        with pytest.raises(ValueError, match=message):  # a missing checkpoint would have been the error after
            eval_ppl.main(["--checkpoint", "missing", "--data", "missing.txt", *args])


def test_bad_input_on_the_command_line_is_one_line_and_exit_1(tiny, docs):
    one_error_line(run_script("eval_ppl.py", "--checkpoint", tiny[1], "--data", "docs", "--lengths", 5000, cwd=docs),
                   "eval_ppl.py", "no document has at least 5000 tokens")


def test_ctrl_c_is_one_line_exit_130_and_writes_nothing(tiny, docs):
    (docs / "long.txt").write_text("The grass is green. " * 3000)
    before = snapshot(docs)
    proc = subprocess.Popen([sys.executable, str(ROOT / "eval_ppl.py"), "--checkpoint", str(tiny[1]), "--data",
                             "long.txt", "--mode", "sliding", "--stride", "1", "--lengths", "256", "--out", "r.json"],
                            cwd=docs, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_ctrl_c)
    while "default: 256 tokens" not in proc.stderr.read(1) + proc.stderr.readline():  # wait until it computes
        assert proc.poll() is None
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "eval_ppl.py: interrupted", err
    assert "Traceback" not in err and snapshot(docs) == before
