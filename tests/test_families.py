"""The checkpoints people extend, against transformers on tiny random models of each kind: Phi-3 (fused projections,
LongRoPE, partial rotary, as Phi-4-mini), Qwen2 (q/k/v biases, YaRN), a Llama with Llama 4's llama3 values, and a
transformers 5 rope_parameters block, rope_theta inside, given to --rope. Each converts, matches transformers below
and past L, exports back to the class transformers computes it with, and evaluates from the command line."""
import json

import pytest
import torch

from checkpoint import load_model, save_model
from conftest import byte_tokenizer, load_ours, one_error_line, run_script, tiny_llama, write_hf_llama
from convert_llama import convert

L, VOCAB = 32, 320  # the tiny models: head_dim 16, pre-trained at L
GEN = torch.Generator().manual_seed(3)
SHORT, LONG = (1 + 0.8 * torch.rand(6, generator=GEN)).tolist(), (1 + 5 * torch.rand(6, generator=GEN)).tolist()
# Phi-4-mini's shape: LongRoPE on the first 3/4 of each head (head_dim 16: 12 dims, 6 pairs), s = 4 from the lengths
PHI4 = {"rope_theta": 10000.0, "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
        "partial_rotary_factor": 0.75}
QWEN = {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}  # Qwen2.5's
LLAMA4 = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
          "high_freq_factor": 1.0, "original_max_position_embeddings": L}  # Llama 4's values, over a tiny L


def randomized(model):
    """HF initializes norms to 1 and biases to 0: randomize both, so that a dropped or swapped one cannot pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


def write_hf(path, family, shape="rope_parameters", tie=False):
    """A random tiny transformers model of the family, saved to path as transformers 5 writes it, or (shape="4.x")
    with config.json rewritten as the published 4.x-era files are: rope_theta and partial_rotary_factor beside
    rope_scaling, Phi-3's longrope named "su" and its L at the top level only."""
    from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if family == "llama4":
        return write_hf_llama(path, LLAMA4, tie=tie, max_position_embeddings=16 * L, vocab_size=VOCAB)
    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    if family == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**sizes, max_position_embeddings=4 * L, original_max_position_embeddings=L,
                                           rope_parameters=dict(PHI4), pad_token_id=None, sliding_window=None))
    else:  # Qwen2.5's long-context recipe: max_position_embeddings stays L, the yarn dict says the factor
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, max_position_embeddings=L, rope_parameters=dict(QWEN)))
    randomized(model).save_pretrained(path)
    if shape == "4.x":
        raw = json.loads((path / "config.json").read_text())
        scaling = raw.pop("rope_parameters")
        raw["rope_theta"] = scaling.pop("rope_theta")
        if "partial_rotary_factor" in scaling:
            raw["partial_rotary_factor"] = scaling.pop("partial_rotary_factor")
        if family == "phi3":
            scaling.pop("original_max_position_embeddings")
        raw["rope_scaling"] = {**scaling, "type": {"longrope": "su"}.get(scaling.pop("rope_type"), "yarn")}
        (path / "config.json").write_text(json.dumps(raw))
    return model


FAMILIES = ["phi3", "qwen2", "llama4"]


def assert_same_logits(ours, hf, plain):
    """Logits within 1e-4 below L, at it and past it; and not those of plain RoPE (the scaling was compared)."""
    tokens = torch.randint(0, VOCAB, (2, 3 * L + 5), generator=torch.Generator().manual_seed(1))
    for T in (L - 7, L, L + 1, 3 * L + 5):
        with torch.no_grad():
            got = ours(tokens[:, :T])
            assert (got - hf(tokens[:, :T]).logits).abs().max() <= 1e-4, T
            assert (got - plain(tokens[:, :T])).abs().max() > 1e-3, T


@pytest.mark.parametrize("family, shape", [("phi3", "rope_parameters"), ("phi3", "4.x"), ("qwen2", "rope_parameters"),
                                           ("qwen2", "4.x"), ("llama4", "rope_parameters")])
def test_converts_to_the_same_logits_and_exports_back(tmp_path, family, shape):
    from transformers import AutoModelForCausalLM

    hf = write_hf(tmp_path / "hf", family, shape, tie=family == "qwen2")
    convert(tmp_path / "hf", tmp_path / "ours")
    state, config = load_ours(tmp_path / "ours")
    assert config["partial_rotary_factor"] == (0.75 if family == "phi3" else 1.0)
    assert config["qkv_bias"] == (family == "qwen2") and ("layers.1.attention.wk.bias" in state) == config["qkv_bias"]
    assert config["rope_scaling"]["original_max_position_embeddings"] == L
    assert config["rope_theta"] == {"phi3": 1e4, "qwen2": 1e6, "llama4": 5e5}[family]
    plain = load_model(tmp_path / "ours", rope_scaling={"rope_type": "default"})
    assert_same_logits(load_model(tmp_path / "ours"), hf, plain)

    convert(tmp_path / "ours", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == {"phi3": "Phi3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                   "llama4": "LlamaForCausalLM"}[family]
    tokens = torch.randint(0, VOCAB, (1, 3 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for T in (L, 3 * L):
            assert (back(tokens[:, :T]).logits - hf(tokens[:, :T]).logits).abs().max() <= 1e-5, T


def test_a_rope_parameters_block_with_rope_theta_is_the_base_it_says(tmp_path):
    """transformers 5's block, rope_theta inside, given to a model of base 1e4 (load_model's rope_scaling, as
    --rope gives it): the logits of a transformers model whose config says that block, below and past L; and so is
    its export."""
    from transformers import AutoModelForCausalLM

    block = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": L}
    write_hf_llama(tmp_path / "plain", max_position_embeddings=4 * L, vocab_size=VOCAB)  # base 1e4, same weights
    hf = write_hf_llama(tmp_path / "hf", block, max_position_embeddings=4 * L, vocab_size=VOCAB)
    convert(tmp_path / "plain", tmp_path / "ours")
    ours = load_model(tmp_path / "ours", rope_scaling=block)  # the model's base becomes the block's (a field)
    assert ours.config.rope_theta == 5e5 and "rope_theta" not in ours.config.rope_scaling
    yarn_at_1e4 = load_model(tmp_path / "ours", rope_scaling={**block, "rope_theta": None})  # null: the model's base
    assert_same_logits(ours, hf, yarn_at_1e4)
    save_model(ours, tmp_path / "saved")  # its config.json says the base as a field, the export as transformers does
    convert(tmp_path / "saved", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["rope_theta"] == 5e5
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert_same_logits(load_model(tmp_path / "saved"), back, yarn_at_1e4)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each family converted, with the byte tokenizer, and a document to evaluate."""
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        write_hf(root / f"hf-{family}", family)
        convert(root / f"hf-{family}", root / family)
        byte_tokenizer().save_pretrained(root / family)
    (root / "doc.txt").write_text("The grass is green. The sky is blue. " * 6)
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_ppl_evaluates_each_family_with_its_own_scaling(converted, family):
    result = run_script("eval_ppl.py", "--checkpoint", converted / family, "--data", converted / "doc.txt",
                        "--lengths", L, 3 * L, "--rope", "checkpoint", "default", "--dtype", "float32",
                        "--out", converted / f"{family}.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((converted / f"{family}.json").read_text())["perplexity"]
    assert report["checkpoint"][str(3 * L)] != report["default"][str(3 * L)]


def test_eval_ppl_takes_a_rope_parameters_block_and_an_abf_base(converted, tmp_path):
    """A block pasted from a transformers 5 config.json, rope_theta inside, into --rope; and a raised base alone
    (ABF): each equals the checkpoint whose config says it (the same weights, converted with that base)."""
    block = {"rope_theta": 5e5, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}
    for name, params in (("base", {}), ("yarn", block), ("abf", {"rope_theta": 5e5})):
        write_hf_llama(tmp_path / f"hf-{name}", params, max_position_embeddings=4 * L, vocab_size=VOCAB)
        convert(tmp_path / f"hf-{name}", tmp_path / name)
        byte_tokenizer().save_pretrained(tmp_path / name)

    def perplexity(name, *rope):
        result = run_script("eval_ppl.py", "--checkpoint", tmp_path / name, "--data", converted / "doc.txt",
                            "--lengths", L, 3 * L, "--rope", *rope, "--dtype", "float32", "--out", tmp_path / "r.json")
        assert result.returncode == 0, result.stderr
        return json.loads((tmp_path / "r.json").read_text())["perplexity"]

    pasted = perplexity("base", json.dumps(block), json.dumps({"rope_theta": 5e5}))
    assert list(pasted) == ["yarn(rope_theta=500000.0,factor=4.0,original_max_position_embeddings=32)",
                            "default(rope_theta=500000.0)"]
    for label, name in zip(pasted, ("yarn", "abf")):
        assert pasted[label] == pytest.approx(perplexity(name, "checkpoint")["checkpoint"], rel=1e-6), label
    result = run_script("eval_ppl.py", "--checkpoint", tmp_path / "base", "--data", converted / "doc.txt",
                        "--lengths", L, "--rope", json.dumps({**block, "partial_rotary_factor": 0.5625}))
    one_error_line(result, "eval_ppl.py", "partial_rotary_factor 0.5625 of head_dim 16 rotates 9 dims")


# ------------------------------------------------------------------------------------------------- bad inputs


def test_an_export_transformers_cannot_compute_is_a_clear_error(tmp_path):
    """transformers rotates part of a head only in Phi3ForCausalLM, which takes plain RoPE and longrope only, and
    has no q/k/v biases."""
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}
    for name, kw in (("yarn", dict(rope_scaling=yarn)), ("bias", dict(qkv_bias=True))):
        save_model(tiny_llama(vocab_size=VOCAB, partial_rotary_factor=0.5, **kw), tmp_path / name)
        with pytest.raises(ValueError, match="only in Phi3ForCausalLM, which has no q/k/v biases and takes plain"):
            convert(tmp_path / name, tmp_path / f"{name}-hf")
        assert not (tmp_path / f"{name}-hf").exists()


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "qwen3"}, "model_type 'qwen3' is not supported (only llama, mistral, phi3 and qwen2"),
    ({"partial_rotary_factor": 0.5625}, "partial_rotary_factor 0.5625 of head_dim 16 rotates 9 dims"),
    ({"partial_rotary_factor": 1.0}, "longrope short_factor and long_factor have 6 entries, but head_dim 16 has 8"),
    ({"num_key_value_heads": 4}, "self_attn.qkv_proj.weight has shape (128, 64), but the config implies 192 rows"),
])
def test_a_phi3_folder_that_does_not_fit_is_a_clear_error(tmp_path, edit, message):
    write_hf(tmp_path / "hf", "phi3", "4.x")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**raw, **edit}))
    with pytest.raises(ValueError) as e:
        convert(tmp_path / "hf", tmp_path / "ours")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ours").exists()
