"""model.py against Hugging Face transformers on the same weights, and KV-cache decoding against recomputation."""
import json

import pytest
import torch

import rope
from convert_llama import convert
from model import Llama, LlamaConfig

L = 64  # original_max_position_embeddings of the tiny models; every test sequence is longer
HF_VARIANTS = {
    "default": {},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L},
    "yarn-attention_factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L,
                              "attention_factor": 1.3},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L,
                    "mscale": 0.707, "mscale_all_dim": 1.0},
    "yarn-no-truncate": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L,
                         "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": L,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def max_position_embeddings(params):
    # HF's `dynamic` grows from max_position_embeddings where we (and the paper) grow from the original length,
    # so the two agree when they are equal; the others run at their extended length s·L.
    return L if params.get("rope_type", "default") in ("default", "dynamic") else int(4 * L)


@pytest.mark.parametrize("variant", HF_VARIANTS)
@pytest.mark.parametrize("n_kv_heads, tie", [(4, False), (2, True)], ids=["mha-untied", "gqa-tied"])
@pytest.mark.parametrize("legacy_config", [False, True], ids=["rope_parameters", "rope_scaling"])
def test_logits_match_transformers(tmp_path, hf_llama, variant, n_kv_heads, tie, legacy_config):
    params = HF_VARIANTS[variant]
    hf = hf_llama(tmp_path / "hf", params, n_kv_heads=n_kv_heads, tie=tie, legacy_config=legacy_config,
                  max_position_embeddings=max_position_embeddings(params))
    convert(tmp_path / "hf", tmp_path / "ours")
    ours = Llama.from_pretrained(tmp_path / "ours")
    if variant == "dynamic":  # our config names the original length explicitly (see max_position_embeddings)
        assert ours.config.rope_scaling["original_max_position_embeddings"] == L
    tokens = torch.randint(0, 320, (2, 3 * L + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max abs logit difference {diff}"


def test_nll_equals_cross_entropy_of_full_logits():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=320)).eval()
    tokens = torch.randint(0, 320, (2, 301))
    targets = tokens[:, 1:].clone()
    targets[0, :17] = -100
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        got = model.nll(tokens[:, :-1], targets, chunk_size=64)
    assert torch.allclose(got, expected.view_as(targets), atol=1e-5)
    assert (got[0, :17] == 0).all()


def test_nll_gradients_equal_full_logits_gradients():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=100))
    tokens = torch.randint(0, 100, (1, 65))
    model.nll(tokens[:, :-1], tokens[:, 1:], chunk_size=16).mean().backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(tokens[:, :-1])[0], tokens[0, 1:]).backward()
    for a, p in zip(chunked, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


ALL_VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "ntk": {"rope_type": "ntk", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 32},
    "ntk-by-parts": {"rope_type": "ntk-by-parts", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "dynamic-yarn": {"rope_type": "dynamic-yarn", "factor": 1.0, "original_max_position_embeddings": 32},
    "dynamic-yarn-finetuned": {"rope_type": "dynamic-yarn", "factor": 1.5, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_kv_cache_decoding_matches_recompute(variant):
    """20-token prompt, 40 new tokens: the length passes original_max_position_embeddings (32), and for
    dynamic-yarn-finetuned also factor·L (48), where the dynamic scale starts to move."""
    torch.manual_seed(0)
    cfg = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=320,
                      max_position_embeddings=32, rope_scaling=ALL_VARIANTS[variant])
    model = Llama(cfg).eval()
    prompt = torch.randint(0, 320, (2, 20))
    out, logits = model.generate(prompt, 40, return_logits=True)
    with torch.no_grad():
        recomputed = torch.stack([model(out[:, :t])[:, -1] for t in range(20, 60)], dim=1)
    diff = (logits - recomputed).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max abs difference {diff}"
    assert torch.equal(out[:, 20:], logits.argmax(-1))


def test_generate_stops_at_eos_and_samples_reproducibly():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=50)).eval()
    prompt = torch.randint(0, 50, (1, 5))
    greedy = model.generate(prompt, 10)
    first = greedy[0, 5].item()
    assert model.generate(prompt, 10, eos_id=first).shape == (1, 6)
    torch.manual_seed(1)
    a = model.generate(prompt, 10, temperature=1.0, top_k=5)
    torch.manual_seed(1)
    assert torch.equal(a, model.generate(prompt, 10, temperature=1.0, top_k=5))


def test_save_and_load_roundtrip_with_rope_override(tmp_path):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=50,
                              tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    tokens = torch.randint(0, 50, (1, 40))
    loaded = Llama.from_pretrained(tmp_path)
    assert torch.equal(model(tokens), loaded(tokens))
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}
    scaled = Llama.from_pretrained(tmp_path, rope_scaling=yarn)
    assert scaled.config.rope_scaling == rope.parse_rope_scaling(yarn)
    assert not torch.allclose(scaled(tokens), loaded(tokens))
    plain = Llama.from_pretrained(tmp_path, rope_scaling={"rope_type": "default"})
    assert plain.config.rope_scaling is None


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        Llama.from_pretrained(tmp_path / "missing")
    model = Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, vocab_size=50))
    model.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "hidden_dim": 80}))
    with pytest.raises(ValueError, match="do not match its config.json: layers.0.feed_forward.w1.weight"):
        Llama.from_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "ok" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Llama.from_pretrained(tmp_path / "ok")
    with pytest.raises(ValueError, match="factor must be >= 1"):
        Llama.from_pretrained(tmp_path / "ok", rope_scaling={"rope_type": "linear", "factor": 0.5})
