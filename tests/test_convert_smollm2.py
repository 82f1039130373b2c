"""convert_llama.py on a real model: the SmolLM2-135M-Instruct GGUF (Q4_1, Q8_0 and F32 tensors, tied embeddings,
GQA), against transformers' own GGUF loader, which dequantizes with the same gguf package and un-permutes q/k."""
import time

import pytest
import torch

from tools import assets
from convert_llama import convert
from conftest import hf_state_in_our_names, load_ours
from tokenizer import Tokenizer
from checkpoint import load_model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = assets.smollm2_gguf()
    out = tmp_path_factory.mktemp("smollm2") / "ours"
    start = time.perf_counter()
    convert(path, out)
    print(f"converted {path.name} in {time.perf_counter() - start:.1f} s")
    hf = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return out, hf


def test_smollm2_tensors_equal_transformers_dequantized_tensors(smollm2):
    out, hf = smollm2
    state, _ = load_ours(out)
    expected = hf_state_in_our_names(hf)
    assert sorted(state) == sorted(expected)
    diff = max((state[name] - expected[name]).abs().max().item() for name in expected)
    assert diff == 0, f"max abs tensor difference {diff}"


def test_smollm2_config_matches_transformers(smollm2):
    out, hf = smollm2
    _, config = load_ours(out)
    c = hf.config
    assert (config["dim"], config["n_layers"], config["n_heads"], config["n_kv_heads"], config["head_dim"],
            config["hidden_dim"], config["vocab_size"]) == (576, 30, 9, 3, 64, 1536, 49152)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert config["rope_theta"] == c.rope_parameters["rope_theta"] == 100000.0
    assert config["max_position_embeddings"] == c.max_position_embeddings == 8192
    assert config["norm_eps"] == 1e-5 and config["rope_scaling"] is None and config["tie_word_embeddings"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_smollm2_logits_and_greedy_continuation_match_transformers(smollm2):
    out, hf = smollm2
    text = assets.fetch_file(*assets.BOOKS["alice29"]).read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
    tokens = torch.tensor([Tokenizer.from_pretrained(out).encode(text[20000:])[:300]])
    ours = load_model(out)
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-3, f"max abs logit difference {diff}"

    prompt = tokens[:, :100]
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=2)
    assert torch.equal(ours.generate(prompt, 32), expected)
