"""model.py against Hugging Face transformers on the same weights, KV-cache decoding against recomputation, and the
checkpoint directory's checks."""
import json

import pytest
import torch

import rope
from conftest import tiny_llama, write_hf_llama
from convert_llama import convert
from model import KVCache, Llama, LlamaConfig
from checkpoint import load_model, save_model
from common import model_flops

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
def test_logits_match_transformers(tmp_path, variant, n_kv_heads, tie, legacy_config):
    params = HF_VARIANTS[variant]
    hf = write_hf_llama(tmp_path / "hf", params, n_kv_heads=n_kv_heads, tie=tie, legacy_config=legacy_config,
                        max_position_embeddings=max_position_embeddings(params))
    convert(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    if variant == "dynamic":  # our config names the original length explicitly (see max_position_embeddings)
        assert ours.config.rope_scaling["original_max_position_embeddings"] == L
    tokens = torch.randint(0, 320, (2, 3 * L + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max abs logit difference {diff}"


@pytest.mark.parametrize("variant", ["default", "yarn"])
def test_bf16_logits_are_as_close_to_fp32_as_transformers_bf16(tmp_path, variant):
    """In bf16 the norms, the rotation and the softmax statistics stay in fp32: our bf16 logits are no further from
    the fp32 logits than HF's bf16 logits are (measured: 0.0056 vs 0.0056 on logits of magnitude ~0.76)."""
    params = HF_VARIANTS[variant]
    hf = write_hf_llama(tmp_path / "hf", params, max_position_embeddings=max_position_embeddings(params))
    convert(tmp_path / "hf", tmp_path / "ours")
    tokens = torch.randint(0, 320, (2, 3 * L + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = load_model(tmp_path / "ours")(tokens)
        ours = load_model(tmp_path / "ours", dtype=torch.bfloat16)(tokens).float()
        theirs = hf.to(torch.bfloat16)(tokens).logits.float()
    assert (ours - fp32).abs().max() <= min(1e-2, 1.1 * (theirs - fp32).abs().max())
    assert (ours - theirs).abs().max() <= 1e-2


def test_nll_equals_cross_entropy_of_full_logits():
    model = tiny_llama(vocab_size=320)
    tokens = torch.randint(0, 320, (2, 301))
    targets = tokens[:, 1:].clone()
    targets[0, :17] = -100
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        got = model.nll(tokens[:, :-1], targets, chunk_size=64)
    assert torch.allclose(got, expected.view_as(targets), atol=1e-5)
    assert (got[0, :17] == 0).all()


@pytest.mark.parametrize("tied", [True, False])
def test_nll_gradients_equal_full_logits_gradients(tied):
    """The chunked loss (each chunk's logits recomputed in backward) against autograd through the full logits: tied
    and untied head, ignored targets, large logits, a weight per token as a loss over a masked batch gives."""
    model = tiny_llama(vocab_size=100, n_layers=1, tie_word_embeddings=tied).train()
    with torch.no_grad():
        model.norm.weight.mul_(30)  # logits in the hundreds: a softmax that overflows unless computed with care
    tokens = torch.randint(0, 100, (2, 65), generator=torch.Generator().manual_seed(0))
    targets = tokens[:, 1:].clone()
    targets[0, 5:20] = -100
    weights = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1))
    (model.nll(tokens[:, :-1], targets, chunk_size=16) * weights).sum().backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in chunked)
    model.zero_grad()
    full = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), targets.flatten(), reduction="none")
    (full * weights.flatten()).sum().backward()
    for a, p in zip(chunked, model.parameters()):
        assert (a - p.grad).abs().max() <= 1e-5 * p.grad.abs().max()


def test_flops_count_every_matmul_weight_and_the_causal_attention_pairs():
    cfg = LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000)
    with torch.device("meta"):
        weights = sum(p.numel() for p in Llama(cfg).parameters() if p.dim() == 2) - 32000 * 4096  # not the lookup
    T = 65536
    assert model_flops(cfg, T) == 2 * weights * T + 4 * 4096 * 32 * T * (T + 1) // 2
    assert model_flops(cfg, 1, past=T - 1, head_tokens=1) == 2 * weights + 4 * 4096 * 32 * T
    assert model_flops(cfg, T, head_tokens=0) == model_flops(cfg, T) - 2 * 32000 * 4096 * T


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


def sharpened_model(rope_scaling, n_layers, device="cpu", **config):
    model = tiny_llama(rope_scaling, vocab_size=320, n_layers=n_layers, max_position_embeddings=32, **config)
    with torch.no_grad():  # small random weights attend almost uniformly: sharpen attention so positions matter
        for block in model.layers:
            block.attention.wq.weight *= 30
    return model.to(device)


def decode_and_recompute(variant, n_layers, dynamic_cache, device="cpu", **config):
    """variant: a name in ALL_VARIANTS, or a rope_scaling dict. 20-token prompt, 40 new tokens: the length passes original_max_position_embeddings (32), and for
    dynamic-yarn-finetuned also factor·L (48), where the dynamic scale starts to move. Returns the max abs
    difference between the logits decoding used and those of a full forward pass over the same tokens."""
    model = sharpened_model(ALL_VARIANTS[variant] if isinstance(variant, str) else variant, n_layers, device, **config)
    prompt = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0)).to(device)
    out, logits = model.generate(prompt, 40, return_logits=True, dynamic_cache=dynamic_cache)
    with torch.no_grad():
        recomputed = torch.stack([model(out[:, :t])[:, -1] for t in range(20, 60)], dim=1)
    assert torch.equal(out[:, 20:], logits.argmax(-1))
    return (logits - recomputed).abs().max().item()


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_kv_cache_decoding_matches_recompute(variant):
    """Exact for every static variant (a cache of rotated keys), and for the dynamic ones with
    dynamic_cache="recompute", which runs the sequence again whenever the rotation changes."""
    assert decode_and_recompute(variant, 3, "recompute") <= 1e-4


@pytest.mark.parametrize("variant", ["dynamic", "dynamic-yarn", "dynamic-yarn-finetuned"])
def test_pre_rope_cache_is_exact_for_one_layer_and_close_for_three(variant):
    """The paper's cache of keys before RoPE (§3.3), rotated anew at every step: for one layer it is the full
    forward pass; from the second layer on the cached keys and values come from hidden states computed under earlier
    scales (measured with this sharpened attention: 0.07-0.17 on logits of magnitude ~2.3; 1e-3 unsharpened)."""
    assert decode_and_recompute(variant, 1, "pre-rope") <= 1e-5
    assert 1e-4 < decode_and_recompute(variant, 3, "pre-rope") <= 0.3


@pytest.mark.parametrize("n_layers, dynamic_cache", [(1, "pre-rope"), (3, "recompute")])
def test_partial_rotary_and_qkv_bias_decode_as_a_full_pass(n_layers, dynamic_cache):
    """Phi-4-mini's and Qwen2's flags through the KV cache, that of keys before RoPE too (the first dims rotated)."""
    assert decode_and_recompute("dynamic", n_layers, dynamic_cache, partial_rotary_factor=0.5, qkv_bias=True) <= 1e-5


@pytest.mark.parametrize("variant", ["default", "yarn", "llama3"])
def test_static_variants_give_the_same_logits_from_a_cache_of_rotated_or_unrotated_keys(variant):
    model = tiny_llama(ALL_VARIANTS[variant], vocab_size=320, max_position_embeddings=32)
    tokens = torch.randint(0, 320, (1, 50), generator=torch.Generator().manual_seed(0))
    logits = {}
    for rotated in (True, False):
        cache = [KVCache(1, 50, 2, 16, torch.float32, "cpu", rotated) for _ in model.layers]
        with torch.no_grad():
            steps = [model.hidden(tokens[:, :30], cache, 0)[:, -1]]
            steps += [model.hidden(tokens[:, t:t + 1], cache, t)[:, -1] for t in range(30, 50)]
        logits[rotated] = torch.stack(steps)
    assert (logits[True] - logits[False]).abs().max() <= 1e-5


def chunk_after_cache(variant, device="cpu", dtype=torch.float32):
    """Max abs difference between the hidden states of tokens 30..49 run as one chunk after 30 cached tokens (the
    causal mask aligned to the bottom right: a passkey prompt after its cached prefix) and those of one full pass."""
    model = sharpened_model(ALL_VARIANTS[variant], 2, device).to(dtype)
    tokens = torch.randint(0, 320, (2, 50), generator=torch.Generator().manual_seed(0)).to(device)
    cache = [KVCache(2, 50, 2, 16, dtype, device) for _ in model.layers]
    with torch.no_grad():
        model.hidden(tokens[:, :30], cache, 0)
        chunk = model.hidden(tokens[:, 30:], cache, 30)
        full = model.hidden(tokens)[:, 30:]
    return (chunk.float() - full.float()).abs().max().item()


@pytest.mark.parametrize("variant", ["default", "yarn"])
def test_a_chunk_after_cached_tokens_equals_a_full_pass(variant):
    assert chunk_after_cache(variant) <= 1e-5


def test_generate_stops_at_eos_and_samples_only_from_the_top_k():
    model = tiny_llama(vocab_size=50, n_layers=1)
    prompt = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(prompt, 10)
    assert model.generate(prompt, 10, eos_id=greedy[0, 5].item()).shape == (1, 6)
    torch.manual_seed(1)
    out, logits = model.generate(prompt, 200, temperature=5.0, top_k=3, return_logits=True)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == out[:, 5:, None]).any(-1).all()  # every token is one of its step's 3 most likely
    assert len(set(out[0, 5:].tolist())) > 3  # and the draws vary: temperature 5 flattens the top 3
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1), greedy)


def test_save_and_load_roundtrip_with_rope_override(tmp_path):
    model = tiny_llama(vocab_size=50)
    save_model(model, tmp_path)
    tokens = torch.randint(0, 50, (1, 40))
    loaded = load_model(tmp_path)
    assert torch.equal(model(tokens), loaded(tokens))
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}
    scaled = load_model(tmp_path, rope_scaling=yarn)
    assert scaled.config.rope_scaling == rope.parse_rope_scaling(yarn)
    assert not torch.allclose(scaled(tokens), loaded(tokens))
    assert load_model(tmp_path, rope_scaling={"rope_type": "default"}).config.rope_scaling is None
    assert load_model(tmp_path, dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == \
        {"config.json": "0o644", "model.safetensors": "0o644"}


@pytest.fixture
def checkpoint(tmp_path):
    save_model(tiny_llama(vocab_size=50), tmp_path / "ok")
    return tmp_path / "ok"


def edit_config(path, **edits):
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**{k: v for k, v in raw.items() if k not in edits}, **edits}))


@pytest.mark.parametrize("edits, message", [
    ({"rope_thetaa": 5e5}, "unknown key 'rope_thetaa'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unknown key 'rope_parameters'"),
    ({"hidden_size": 64}, "a Hugging Face checkpoint? convert it"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16}},
     "needs a 'factor'"),
    ({"rope_scaling": ["yarn", 2]}, "must be a JSON object"),
    ({"rope_scaling": "yarn"}, "must be a JSON object"),
    ({"n_layers": "2"}, "n_layers must be a positive integer (got '2')"),
    ({"rope_theta": "1e4"}, "rope_theta must be a positive number"),
    ({"hidden_dim": 80}, "layers.0.feed_forward.w1.weight has shape (128, 64) but the config implies (80, 64)"),
    ({"n_heads": 2, "n_kv_heads": 1, "head_dim": 32}, "says n_heads 2 but"),  # the same shapes, another layout
])
def test_a_config_json_that_does_not_fit_is_a_clear_error(checkpoint, edits, message):
    edit_config(checkpoint, **edits)
    with pytest.raises(ValueError) as e:
        load_model(checkpoint)
    assert message in str(e.value) and "config.json" in str(e.value)


def test_a_damaged_checkpoint_directory_is_a_clear_error(checkpoint):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_model(checkpoint.parent / "missing")
    raw = (checkpoint / "config.json").read_text()
    (checkpoint / "config.json").write_text(raw[:-10])
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({k: v for k, v in json.loads(raw).items() if k != "dim"}))
    with pytest.raises(ValueError, match="config.json has no 'dim'"):
        load_model(checkpoint)
    (checkpoint / "config.json").write_text(raw)
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(checkpoint)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        load_model(checkpoint, rope_scaling={"rope_type": "linear", "factor": 0.5})
