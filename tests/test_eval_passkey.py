"""eval_passkey.py: the reference's prompt byte for byte, prompts that just fit their length, scoring with test
doubles of generate, the progress bar, and the command line."""
import ast
import json
import re

import pytest
import torch

import common
import eval_passkey
from conftest import ROOT, byte_tokenizer, one_error_line, run_script, write_hf_llama
from convert_llama import convert
from checkpoint import load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("passkey")
    write_hf_llama(tmp / "hf", max_position_embeddings=256, vocab_size=258)
    convert(tmp / "hf", tmp / "ours")
    byte_tokenizer().save_pretrained(tmp / "ours")
    return tmp / "ours"


def test_prompt_is_the_spec_text():
    expected = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.\n"
                "The grass is green. The sky is blue. The sun is yellow.\n"
                "The pass key is 31337. Remember it. 31337 is the pass key.\n"
                "Here we go. There and back again. The grass is green. The sky is blue.\n"
                "What is the pass key? The pass key is")
    assert eval_passkey.prompt(31337, 7, 0.4) == expected
    assert eval_passkey.prompt(5, 2, 0.0) == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.\n\n"
        "The pass key is 5. Remember it. 5 is the pass key.\n"
        "The grass is green. The sky is blue.\n"
        "What is the pass key? The pass key is")


@pytest.mark.parametrize("length", [260, 400, 1234])
@pytest.mark.parametrize("depth", [0, 0.3, 1])
def test_prompt_just_fits_the_length(length, depth):
    tok = byte_tokenizer()
    ids = eval_passkey.fit_prompt(tok, 4242, depth, length)
    text = tok.decode(ids)
    n = sum(text.count(sentence) for sentence in eval_passkey.FILLER)
    assert text == eval_passkey.prompt(4242, n, depth)
    assert len(ids) <= length < len(tok.encode(eval_passkey.prompt(4242, n + 1, depth)))  # one more sentence won't fit
    assert length - len(ids) <= max(len(s) for s in eval_passkey.FILLER) + 1  # bytes = tokens here


def answering(tok, offset):
    """A test double of Llama.generate that reads the key in the prompt and answers key + offset."""
    def generate(tokens, max_new_tokens, **kwargs):
        key = int(re.search(r"The pass key is (\d+)", tok.decode(tokens[0].tolist())).group(1))
        answer = tok.encode(f" {key + offset}. What else?")[:max_new_tokens]
        return torch.cat([tokens, torch.tensor([answer])], dim=1)
    return generate


def test_right_answers_score_100_and_wrong_answers_0(checkpoint):
    model, tok = load_model(checkpoint), byte_tokenizer()
    methods = [("default", None), ("yarn", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256})]
    cells = eval_passkey.build_prompts(tok, [300, 400], [0, 0.5, 1], trials=3, seed=7)
    assert cells == eval_passkey.build_prompts(tok, [300, 400], [0, 0.5, 1], trials=3, seed=7)  # seeded
    model.generate = answering(tok, 0)
    right = eval_passkey.evaluate(model, tok, methods, cells)
    model.generate = answering(tok, 1)
    wrong = eval_passkey.evaluate(model, tok, methods, cells)
    for label, _ in methods:
        for L in (300, 400):
            for d in (0, 0.5, 1):
                assert eval_passkey.accuracy(right[label][L][d]) == 1.0
                assert eval_passkey.accuracy(wrong[label][L][d]) == 0.0
                assert all(t["tokens"] <= L for t in right[label][L][d])
    keys = [[t["key"] for t in right[label][L][d]] for label, _ in methods for L in (300, 400) for d in (0, 0.5, 1)]
    assert keys[:6] == keys[6:]  # every method sees the same prompts
    assert all(1 <= k <= 50000 for cell in keys for k in cell) and len({k for cell in keys for k in cell}) > 1


@pytest.mark.parametrize("dynamic_cache", ["pre-rope", "recompute"])
def test_the_layer_bar_counts_every_block_of_every_step(checkpoint, dynamic_cache):
    model, tok = load_model(checkpoint), byte_tokenizer()
    methods = [("default", None), ("dynamic", {"rope_type": "dynamic", "factor": 2.0,
                                               "original_max_position_embeddings": 256})]
    cells = eval_passkey.build_prompts(tok, [300], [0.5], trials=2)  # past L: the dynamic rotation changes each step
    passes = eval_passkey.forward_passes(methods, cells)
    assert passes == 2 * 2 * eval_passkey.MAX_NEW_TOKENS
    with common.LayerProgress(model, passes) as bar:
        results = eval_passkey.evaluate(model, tok, methods, cells, dynamic_cache)
    assert bar.n == bar.total == passes * len(model.layers)
    assert [t["answer"] for r in results.values() for t in r[300][0.5]] == \
           [t["answer"] for r in eval_passkey.evaluate(model, tok, methods, cells, dynamic_cache).values()
            for t in r[300][0.5]]  # the hooks change no answer
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.layers)  # and are gone


def test_the_evaluations_import_no_other_script():
    scripts = {"eval_ppl", "eval_passkey", "train", "convert_llama"}
    for script in ("eval_ppl.py", "eval_passkey.py"):
        tree = ast.parse((ROOT / script).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & scripts, (script, imported & scripts)


def test_cli_writes_table_json_and_heatmap(checkpoint, tmp_path):
    result = run_script("eval_passkey.py", "--checkpoint", checkpoint, "--lengths", 300, "--depths", 0, 1, "--trials",
                        1, "--rope", "default", "dynamic", "--out", "r.json", "--plot", "p.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "dynamic" in result.stdout
    assert result.stdout.startswith("dtype: ") and "(--dtype auto: " in result.stdout.splitlines()[0]
    # the layer bar: 2 methods x 2 prompts x 10 new tokens (the first one the prefill) x 2 blocks
    assert "80/80 [" in result.stderr and "dynamic s=2: " in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["trials"]) == {"default", "dynamic"}
    assert report["accuracy"]["dynamic"]["300"].keys() == {"0.0", "1.0"}
    assert len(report["trials"]["dynamic"]["300"]["1.0"]) == 1 and report["settings"]["dynamic_cache"] == "pre-rope"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--lengths", "50"], "--lengths 50 is shorter than the prompt without filler"),
    (["--plot", "p.txt"], "--plot p.txt: the extension must be one of"),
])
def test_bad_input_is_a_clear_error(checkpoint, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        eval_passkey.main(["--checkpoint", str(checkpoint), "--lengths", "300", *args])


def test_bad_input_on_the_command_line_is_one_line(checkpoint, tmp_path):
    result = run_script("eval_passkey.py", "--checkpoint", checkpoint, "--depths", 0.5, 1.5, cwd=tmp_path)
    one_error_line(result, "eval_passkey.py", "--depths: must be a finite number >= 0 and <= 1 (got 1.5)", code=2)
    result = run_script("eval_passkey.py", "--checkpoint", checkpoint, "--lengths", 50, cwd=tmp_path)
    one_error_line(result, "eval_passkey.py", "--lengths 50 is shorter than the prompt")
