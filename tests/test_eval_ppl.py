"""eval_ppl.py: sliding-window perplexity against an independent Hugging Face computation, the one-pass truncated
mode against separate passes, and bad input on the command line."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_ppl
from conftest import write_hf_llama
from convert_llama import convert
from model import Llama, LlamaConfig
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
L = 64  # max_position_embeddings of the tiny model
VOCAB = 258


def byte_tokenizer():
    """One token per byte (ids 0..255) plus BOS/EOS (256, 257): the vocabulary of the tiny models."""
    return Tokenizer(ranks={bytes([i]): i for i in range(256)}, pattern=r"\S+|\s+",
                     special_tokens={"<s>": 256, "</s>": 257}, bos_id=256, eos_id=257)


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
    model = Llama.from_pretrained(ckpt)
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
    model = Llama.from_pretrained(tiny[1])
    doc = torch.randint(0, VOCAB, (260,), generator=torch.Generator().manual_seed(1))
    lengths = [16, 64, 100, 128, 257]
    scaling = eval_ppl.rope.parse_rope_scaling(yarn(rope_type))
    results = eval_ppl.evaluate(model, [("doc", doc)], [(rope_type, scaling)], lengths)
    for W in lengths:
        (total, count), = results[rope_type][W]
        assert count == W - 1
        assert total == pytest.approx(separate_pass_nll(model, doc, W), rel=1e-5)


@pytest.mark.parametrize("rope_type", ["dynamic", "dynamic-yarn"])
def test_truncated_mode_runs_one_pass_per_length_for_dynamic_rope(tiny, rope_type):
    model = Llama.from_pretrained(tiny[1])
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
    parsed = eval_ppl.parse_rope_args(["default", "plain", "yarn", '{"type": "yarn", "factor": 4, "beta_fast": 64}'])
    methods = dict(eval_ppl.rope_methods(parsed, 2.0, None, config))
    assert methods["default"] == config.rope_scaling and methods["plain"] is None
    assert methods["yarn"] == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
    assert methods["yarn(factor=4,beta_fast=64)"] == {"rope_type": "yarn", "factor": 4.0, "beta_fast": 64,
                                                      "original_max_position_embeddings": 8192}
    for bad in (["yarn", "yarn"], ["yran"], ['{"rope_type": "yarn",}'], ["[1, 2]"]):
        with pytest.raises(ValueError):
            eval_ppl.parse_rope_args(bad)
    for bad in (['{"rope_type": "nope"}'], ["linear"]):
        with pytest.raises(ValueError):
            eval_ppl.rope_methods(eval_ppl.parse_rope_args(bad), 0.5, None, config)


def test_windows_score_every_token_once():
    for n, length, stride in [(1000, 256, 64), (999, 100, 100), (10, 64, 16), (257, 64, 63)]:
        scored = [t for _, end, first in eval_ppl.windows(n, length, stride) for t in range(first, end)]
        starts = {start for start, _, _ in eval_ppl.windows(n, length, stride)} if stride == length else set()
        assert sorted(scored) == [t for t in range(1, n) if t not in starts]


def run(*args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "eval_ppl.py"), *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_writes_table_json_and_plot(tiny, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("The grass is green. " * 20)
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x y " * 90}) + "\n")
    proc = run("--checkpoint", tiny[1], "--data", "docs", "more.jsonl", "--lengths", 32, 128, "--max-docs", 5,
               "--rope", "default", "yarn", '{"rope_type": "ntk", "factor": 4}', "--out", "r.json", "--plot", "p.png",
               cwd=tmp_path)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "token-weighted" in out and "ntk(factor=4)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [d["tokens"] for d in report["documents"]] == [400, 360]  # "short" has fewer than 128 tokens
    assert report["settings"]["rope_scaling"]["ntk(factor=4)"]["factor"] == 4.0
    assert report["settings"]["mean"] == "token-weighted"
    assert set(report["perplexity"]) == {"default", "yarn", "ntk(factor=4)"}
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_line_on_stderr(tiny, tmp_path):
    (tmp_path / "doc.txt").write_text("The grass is green. " * 20)
    (tmp_path / "empty.txt").write_text("")
    cases = {"no document long enough": ["--lengths", 5000],
             "empty file": ["--data", "empty.txt"],
             "length below stride": ["--mode", "sliding", "--lengths", 64, "--stride", 128],
             "malformed rope dict": ["--rope", '{"rope_type": "yarn", "factor": }']}
    procs = {case: run("--checkpoint", tiny[1], "--data", "doc.txt", "--lengths", 64, *args, cwd=tmp_path)
             for case, args in cases.items()}  # run together: most of each is starting Python and torch
    for case, proc in procs.items():
        _, err = proc.communicate()
        lines = err.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("eval_ppl.py: error: "), (case, err)
