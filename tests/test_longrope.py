"""LongRoPE (rope_type "longrope", Ding et al. 2024; Phi-3/3.5/4-mini): rope.longrope against transformers'
_compute_longrope_parameters and logits below and past L, the checks of its factor lists, the converter round trip,
decoding across L, and an evaluation from the command line."""
import json
import math

import pytest
import torch

import rope
from checkpoint import load_model
from conftest import byte_tokenizer, one_error_line, run_script, tiny_llama, write_hf_llama
from convert_llama import convert
from model import KVCache, LlamaConfig

L, MPE, VOCAB = 32, 128, 320  # the tiny models: head_dim 16 (8 rotary pairs), L = 32, max_position_embeddings 4·L
GEN = torch.Generator().manual_seed(3)
SHORT = (1 + 0.8 * torch.rand(8, generator=GEN)).tolist()  # made-up searched factors: short ones near 1,
LONG = (1 + 5 * torch.rand(8, generator=GEN)).tolist()     # long ones up to 6
LONGROPE = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": L}
CASES = {  # transformers' rope parameters -> the attention factor both sides must use
    "factor-derived": (LONGROPE, math.sqrt(1 + math.log(MPE / L) / math.log(L))),  # Phi-3: s = MPE / L
    "factor-given": ({**LONGROPE, "factor": 2.0}, math.sqrt(1 + math.log(2.0) / math.log(L))),
    "attention_factor-given": ({**LONGROPE, "attention_factor": 1.3}, 1.3),
}


def phi3_config(path):
    """Rewrite a 4.x-shaped config.json as Phi-3's: original_max_position_embeddings at the top level only."""
    raw = json.loads((path / "config.json").read_text())
    raw["original_max_position_embeddings"] = raw["rope_scaling"].pop("original_max_position_embeddings")
    (path / "config.json").write_text(json.dumps(raw))


def write_hf(path, params, shape="rope_parameters", **kw):
    hf = write_hf_llama(path, params, max_position_embeddings=MPE, vocab_size=VOCAB, legacy_config=shape != "rope_parameters",
                        **kw)
    if shape == "phi3":
        phi3_config(path)
    return hf


def hf_parameters(params, seq_len, head_dim=16, base=10000.0, max_position_embeddings=MPE, n_heads=4):
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import _compute_longrope_parameters

    config = HFConfig(hidden_size=head_dim * n_heads, num_attention_heads=n_heads,
                      max_position_embeddings=max_position_embeddings, rope_parameters={"rope_theta": base, **params})
    return _compute_longrope_parameters(config, seq_len=seq_len)


def ours_parameters(params, seq_len, head_dim=16, base=10000.0, max_position_embeddings=MPE):
    return rope.rope_parameters(rope.parse_rope_scaling(params, head_dim, max_position_embeddings), head_dim, base,
                                seq_len)


# -------------------------------------------------------------------------------------------------- the method


@pytest.mark.parametrize("case", CASES)
def test_rope_parameters_equal_transformers_to_the_bit(case):
    params, attention_factor = CASES[case]
    for seq_len in (0, 1, L, L + 1, 3 * L):  # 0: no length yet (transformers' None), the short factors
        inv_freq, m = ours_parameters(params, seq_len)
        theirs, their_m = hf_parameters(params, seq_len or None)
        assert torch.equal(inv_freq, theirs), seq_len
        assert m == their_m == pytest.approx(attention_factor, abs=1e-12)
        used = LONG if seq_len > L else SHORT
        assert torch.allclose(inv_freq, rope.inv_freq(16, 10000.0) / torch.tensor(used), rtol=1e-6)


def test_phi3_mini_shape_and_its_attention_factor():
    """Phi-3-mini-128k's shape: head_dim 96, L = 4096, max_position_embeddings 131072, no factor, so s = 32 and
    m = √(1 + ln 32 / ln 4096) = √(1 + 5/12); the lists here are made up (48 entries each)."""
    short, long = [1.0 + i / 100 for i in range(48)], [1.0 + i for i in range(48)]
    params = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
              "original_max_position_embeddings": 4096}
    for seq_len in (4096, 4097, 131072):
        inv_freq, m = ours_parameters(params, seq_len, head_dim=96, max_position_embeddings=131072)
        theirs, their_m = hf_parameters(params, seq_len, head_dim=96, max_position_embeddings=131072, n_heads=32)
        assert torch.equal(inv_freq, theirs) and m == their_m
        assert m == pytest.approx(math.sqrt(17 / 12), abs=1e-12)  # 1.1902380714...
    assert rope.parse_rope_scaling(params, 96, 131072)["factor"] == 32.0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", ["rope_parameters", "rope_scaling", "phi3"])
def test_logits_match_transformers_below_and_past_L(tmp_path, case, shape):
    params, _ = CASES[case]
    hf = write_hf(tmp_path / "hf", params, shape, n_kv_heads=2, tie=case == "factor-given")
    convert(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    assert ours.config.rope_scaling["original_max_position_embeddings"] == L
    plain = load_model(tmp_path / "ours", rope_scaling={"rope_type": "default"})
    tokens = torch.randint(0, VOCAB, (2, 3 * L + 5), generator=torch.Generator().manual_seed(1))
    for T in (L - 7, L, L + 1, 3 * L + 5):  # short factors up to L, long ones past it
        with torch.no_grad():
            got = ours(tokens[:, :T])
            assert (got - hf(tokens[:, :T]).logits).abs().max() <= 1e-4, T
            assert (got - plain(tokens[:, :T])).abs().max() > 1e-3  # so that the scaling is part of what is compared


# ------------------------------------------------------------------------------------------------------ checks

GOOD = {**LONGROPE, "factor": 4.0}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "short_factor": 1.5}, "rope scaling short_factor must be a list of numbers, one per rotary pair (got 1.5)"),
    ({**GOOD, "long_factor": []}, "long_factor must be a list of numbers"),
    ({**GOOD, "short_factor": [1.0, -2.0] + SHORT[2:]}, "short_factor[1] must be a finite positive number (got -2.0)"),
    ({**GOOD, "long_factor": LONG[:7] + [0]}, "long_factor[7] must be a finite positive number (got 0)"),
    ({**GOOD, "long_factor": [float("inf")] + LONG[1:]}, "long_factor[0] must be a finite positive number (got inf)"),
    ({**GOOD, "short_factor": [float("nan")] + SHORT[1:]}, "short_factor[0] must be a finite positive number"),
    ({**GOOD, "short_factor": ["1.0"] + SHORT[1:]}, "short_factor[0] must be a finite positive number (got '1.0')"),
    ({**GOOD, "short_factor": [True] + SHORT[1:]}, "short_factor[0] must be a finite positive number (got True)"),
    ({**GOOD, "long_factor": LONG[:6]}, "longrope short_factor has 8 entries but long_factor 6"),
    ({k: v for k, v in GOOD.items() if k != "long_factor"}, "rope_type longrope needs 'short_factor' and 'long_factor'"),
    ({k: v for k, v in GOOD.items() if k != "original_max_position_embeddings"},
     "rope_type longrope needs 'original_max_position_embeddings'"),
    ({k: v for k, v in GOOD.items() if k != "factor"}, "rope_type longrope needs a 'factor' (or the model's"),
    ({**GOOD, "attention_factor": 0}, "attention_factor must be positive"),
    ({**GOOD, "beta_fast": 32}, "key 'beta_fast' is not read by rope_type longrope"),
])
def test_bad_longrope_scaling_is_a_one_line_error(bad, message):
    with pytest.raises(ValueError) as e:
        rope.parse_rope_scaling(bad)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_lists_must_have_one_factor_per_rotary_pair_of_the_model(tmp_path):
    """parse_rope_scaling gets head_dim from every model path: LlamaConfig (conversions, loading, overrides),
    Llama.set_rope_scaling and the evaluations' --rope."""
    message = "longrope short_factor and long_factor have 8 entries, but head_dim 32 has 16 rotary pairs"
    with pytest.raises(ValueError, match=message):
        LlamaConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=64, vocab_size=10, rope_scaling=GOOD)
    model = tiny_llama(vocab_size=VOCAB)  # head_dim 16: the lists fit
    model.set_rope_scaling(GOOD)
    with pytest.raises(ValueError, match="have 4 entries, but head_dim 16 has 8 rotary pairs"):
        model.set_rope_scaling({**GOOD, "short_factor": SHORT[:4], "long_factor": LONG[:4]})
    write_hf(tmp_path / "hf", LONGROPE)
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())  # lists that transformers cannot even build
    raw["rope_parameters"].update(short_factor=SHORT[:4], long_factor=LONG[:4])
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as e:
        convert(tmp_path / "hf", tmp_path / "ours")
    assert "config.json: longrope short_factor and long_factor have 4 entries, but head_dim 16" in str(e.value)
    assert not (tmp_path / "ours").exists()


def test_a_missing_factor_is_derived_from_the_models_lengths():
    """As transformers does for Phi-3: s = max_position_embeddings / L; at least 1 (it only sets m, 1 for s <= 1)."""
    cfg = lambda mpe: LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=64, vocab_size=10,
                                  max_position_embeddings=mpe, rope_scaling=LONGROPE)
    assert cfg(96).rope_scaling["factor"] == 3.0
    assert cfg(16).rope_scaling["factor"] == 1.0 and rope.rope_parameters(cfg(16).rope_scaling, 16, 1e4)[1] == 1.0
    assert rope.parse_rope_scaling(GOOD, 16, 96)["factor"] == 4.0  # a given factor stays


# ------------------------------------------------------------------------------------------ converter round trip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", ["rope_parameters", "phi3"])
def test_hf_to_ours_to_hf_keeps_the_numbers(tmp_path, case, shape):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_rope_utils import _compute_longrope_parameters

    params, attention_factor = CASES[case]
    hf = write_hf(tmp_path / "hf", params, shape)
    convert(tmp_path / "hf", tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["rope_scaling"]["short_factor"] == SHORT and exported["rope_scaling"]["long_factor"] == LONG
    assert exported["original_max_position_embeddings"] == L  # where transformers 4.x reads it
    for seq_len in (L, L + 1):
        inv_freq, m = _compute_longrope_parameters(back.config, seq_len=seq_len)
        theirs, their_m = _compute_longrope_parameters(hf.config, seq_len=seq_len)
        assert torch.equal(inv_freq, theirs) and m == their_m == pytest.approx(attention_factor, abs=1e-12)
    tokens = torch.randint(0, VOCAB, (1, 3 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for T in (L, 3 * L):
            assert torch.equal(back(tokens[:, :T]).logits, hf(tokens[:, :T]).logits), T


# ---------------------------------------------------------------------------------------- decoding across L


def sharpened(model, *projections):
    """Small random weights attend almost uniformly: sharpen attention so that positions matter."""
    with torch.no_grad():
        for w in projections or [block.attention.wq.weight for block in model.layers]:
            w *= 30
    return model


@pytest.mark.parametrize("dynamic_cache", ["pre-rope", "recompute"])
def test_decoding_across_L_recomputes_once_and_equals_a_full_pass(dynamic_cache):
    """longrope's rotation changes once, when the length passes L: the decoder runs the whole sequence again then,
    whatever dynamic_cache says, and every logit equals a full forward pass over the same tokens."""
    model = sharpened(tiny_llama(GOOD, vocab_size=VOCAB, n_layers=3, max_position_embeddings=MPE))
    run, hidden = [], model.hidden
    model.hidden = lambda tokens, cache=None, pos=0: run.append(tokens.size(1)) or hidden(tokens, cache, pos)
    prompt = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    out, logits = model.generate(prompt, 30, return_logits=True, dynamic_cache=dynamic_cache)
    assert run == [20] + [1] * (L - 20) + [L + 1] + [1] * (50 - L - 2)  # the prompt, tokens, the recompute at L + 1
    run.clear()
    with torch.no_grad():
        full = torch.stack([model(out[:, :t])[:, -1] for t in range(20, 50)], dim=1)
    assert (logits - full).abs().max() <= 1e-4


def test_transformers_keeps_the_keys_it_cached_before_L_rotated_with_the_short_factors(tmp_path):
    """How transformers differs: its cache holds keys rotated when they were computed, so past L the keys of the
    first L tokens keep the short factors while new ones get the long factors. That equals our model with a cache
    of rotated keys (KVCache(rotated=True)) stepped the same way, and is not a full forward pass (which ours is)."""
    hf = write_hf(tmp_path / "hf", CASES["factor-given"][0])
    sharpened(hf, *[layer.self_attn.q_proj.weight for layer in hf.model.layers])
    convert(tmp_path / "hf", tmp_path / "ours")
    ours = sharpened(load_model(tmp_path / "ours"))
    tokens = torch.randint(0, VOCAB, (1, L + 16), generator=torch.Generator().manual_seed(0))
    cache = [KVCache(1, L + 16, 2, 16, torch.float32, "cpu", rotated=True) for _ in ours.layers]
    with torch.no_grad():
        step = hf(tokens[:, :20], use_cache=True)
        theirs, mine = [step.logits[:, -1]], [ours.head(ours.hidden(tokens[:, :20], cache, 0))[:, -1]]
        for t in range(20, L + 16):
            step = hf(tokens[:, t:t + 1], past_key_values=step.past_key_values, use_cache=True)
            theirs.append(step.logits[:, -1])
            mine.append(ours.head(ours.hidden(tokens[:, t:t + 1], cache, t))[:, -1])
        theirs, mine = torch.stack(theirs, 1), torch.stack(mine, 1)
        full = torch.stack([ours(tokens[:, :t])[:, -1] for t in range(20, L + 17)], dim=1)
    assert (theirs - mine).abs().max() <= 1e-4
    up_to_L = L - 20 + 1  # steps whose length is at most L: the short factors everywhere, so all three agree
    assert (theirs[:, :up_to_L] - full[:, :up_to_L]).abs().max() <= 1e-4
    assert (theirs[:, up_to_L:] - full[:, up_to_L:]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- command line


def test_eval_ppl_takes_a_longrope_dict(tmp_path):
    write_hf_llama(tmp_path / "hf", max_position_embeddings=L, vocab_size=258)  # plain RoPE, trained at L
    convert(tmp_path / "hf", tmp_path / "ours")
    byte_tokenizer().save_pretrained(tmp_path / "ours")
    (tmp_path / "doc.txt").write_text("The grass is green. The sky is blue. " * 4)
    spec = json.dumps({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 4})
    result = run_script("eval_ppl.py", "--checkpoint", tmp_path / "ours", "--data", tmp_path / "doc.txt",
                        "--lengths", L, 3 * L, "--rope", "default", spec, "--dtype", "float32",
                        "--out", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    label = next(label for label in report["perplexity"] if label.startswith("longrope("))
    scaling = report["settings"]["rope_scaling"][label]
    assert scaling["short_factor"] == SHORT and scaling["original_max_position_embeddings"] == L  # the model's L
    assert report["perplexity"][label][str(L)] != report["perplexity"]["default"][str(L)]
    wrong = json.dumps({"rope_type": "longrope", "short_factor": SHORT[:4], "long_factor": LONG[:4]})
    result = run_script("eval_ppl.py", "--checkpoint", tmp_path / "ours", "--data", tmp_path / "doc.txt",
                        "--lengths", L, "--rope", wrong, "--dtype", "float32")
    one_error_line(result, "eval_ppl.py", "--rope longrope(", "have 4 entries, but head_dim 16 has 8 rotary pairs")
