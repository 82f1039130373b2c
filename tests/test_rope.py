"""rope.py against the paper's worked numbers (Llama 2: D = 128, b = 1e4, L = 4096; docs/method.md) and its input
checks."""
import math

import pytest
import torch

import rope

D, BASE, L = 128, 10000.0, 4096


def params(rope_scaling, seq_len=0):
    return rope.rope_parameters(rope.parse_rope_scaling(rope_scaling), D, BASE, seq_len)


def implied_base(inv_freq):
    # θ_1 = b^(-2/D)  =>  b = θ_1^(-D/2)
    return inv_freq[1].double().item() ** (-D / 2)


def test_ntk_by_parts_reproduces_the_worked_ramp():
    inv_freq, m = params({"rope_type": "ntk-by-parts", "factor": 16, "original_max_position_embeddings": L})
    ratio = inv_freq / rope.inv_freq(D, BASE)
    assert torch.allclose(ratio[:21], torch.ones(21))
    assert ratio[21].item() == pytest.approx(0.963942, abs=1e-6)
    assert ratio[33].item() == pytest.approx(0.53125, abs=1e-6)
    assert ratio[45].item() == pytest.approx(0.098558, abs=1e-6)
    assert torch.allclose(ratio[46:], torch.full((18,), 0.0625))
    assert m == 1.0


def test_yarn_attention_factor_matches_the_paper():
    inv_freq, m = params({"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": L})
    assert m == pytest.approx(1.2772589, abs=1e-7)
    assert m * m == pytest.approx(1.6313902, abs=1e-7)
    by_parts, _ = params({"rope_type": "ntk-by-parts", "factor": 16, "original_max_position_embeddings": L})
    assert torch.equal(inv_freq, by_parts)
    for s, expected in [(2, 1.0693), (4, 1.1386), (8, 1.2079), (32, 1.3466)]:
        assert params({"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L})[1] == \
            pytest.approx(expected, abs=1e-4)


def test_static_ntk_base_for_factor_2():
    inv_freq, m = params({"rope_type": "ntk", "factor": 2})
    assert implied_base(inv_freq) == pytest.approx(20221.3, abs=0.1)
    assert m == 1.0


def test_dynamic_ntk_base_at_twice_the_original_length():
    cfg = {"rope_type": "dynamic", "factor": 2, "original_max_position_embeddings": L}
    assert implied_base(params(cfg, seq_len=8192)[0]) == pytest.approx(30527.7, rel=1e-5)
    assert torch.equal(params(cfg, seq_len=L)[0], rope.inv_freq(D, BASE))  # plain RoPE while l <= L


def test_dynamic_yarn_scale_is_max_of_finetuned_factor_and_length_ratio():
    cfg = {"rope_type": "dynamic-yarn", "factor": 2, "original_max_position_embeddings": L}
    yarn = lambda s: params({"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L})
    for seq_len, s in [(100, 2), (8192, 2), (16384, 4), (65536, 16)]:
        inv_freq, m = params(cfg, seq_len)
        assert torch.equal(inv_freq, yarn(s)[0]) and m == yarn(s)[1]
    # a model never fine-tuned (factor 1) is plain RoPE up to L
    inv_freq, m = params({**cfg, "factor": 1}, seq_len=L)  # eq. 20 with s = 1: θ_i up to the last bit of rounding
    assert torch.allclose(inv_freq, rope.inv_freq(D, BASE), rtol=1e-7, atol=0) and m == 1.0


def test_linear_divides_every_frequency():
    inv_freq, _ = params({"rope_type": "linear", "factor": 4})
    assert torch.allclose(inv_freq, rope.inv_freq(D, BASE) / 4)


def test_llama3_keeps_fast_and_interpolates_slow_wavelengths():
    cfg = {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
           "original_max_position_embeddings": 8192}
    inv_freq, m = rope.rope_parameters(rope.parse_rope_scaling(cfg), 128, 500000.0)
    t = rope.inv_freq(128, 500000.0)
    wavelen = 2 * math.pi / t
    assert torch.equal(inv_freq[wavelen < 8192 / 4], t[wavelen < 8192 / 4])
    assert torch.allclose(inv_freq[wavelen > 8192], t[wavelen > 8192] / 8)
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    assert mid.any() and ((inv_freq[mid] < t[mid]) & (inv_freq[mid] > t[mid] / 8)).all()
    assert m == 1.0


def test_yarn_attention_factor_overrides():
    base = {"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": L}
    assert params({**base, "attention_factor": 1.5})[1] == 1.5
    g = lambda k: 0.1 * k * math.log(16) + 1
    assert params({**base, "mscale": 0.707, "mscale_all_dim": 1.0})[1] == pytest.approx(g(0.707) / g(1.0))
    untruncated, _ = params({**base, "truncate": False})
    truncated, _ = params(base)
    assert not torch.equal(untruncated, truncated)


def test_rotation_preserves_norms_and_relative_positions():
    inv_freq, _ = params({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64})
    cos, sin = rope.cos_sin_tables(inv_freq, 1.0, 200)
    q, k = torch.randn(D, dtype=torch.float32), torch.randn(D)
    rq = rope.apply_rotary(q.expand(200, D), cos, sin)
    rk = rope.apply_rotary(k.expand(200, D), cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(200), rtol=1e-5)
    # q at m and k at n depend on m - n only
    assert torch.allclose(rq[10] @ rk[3], rq[107] @ rk[100], rtol=1e-4, atol=1e-4)


def test_rotation_rotates_pair_i_and_i_plus_half_by_the_angle():
    inv_freq = rope.inv_freq(8, 10000.0)
    cos, sin = rope.cos_sin_tables(inv_freq, 1.5, 10)
    x = torch.randn(10, 8)
    y = rope.apply_rotary(x, cos, sin)
    angle = 7 * inv_freq[2].item()  # pair 2 at position 7: (x[2], x[6]) turned by 7·θ_2, scaled by 1.5
    expected = 1.5 * torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) \
        @ x[7, [2, 6]]
    assert torch.allclose(y[7, [2, 6]], expected, atol=1e-6)
    assert rope.apply_rotary(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_older_type_key_and_published_extras_are_accepted():
    assert rope.parse_rope_scaling({"type": "yarn", "factor": 16, "original_max_position_embeddings": 4096,
                                    "finetuned": True}) == \
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "finetuned": True}
    assert rope.parse_rope_scaling({"type": "linear", "rope_type": "linear", "factor": 2}) == \
        {"rope_type": "linear", "factor": 2.0}
    assert rope.parse_rope_scaling({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
                                    "attention_factor": None}) == \
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}  # HF writes unset keys as null
    assert rope.parse_rope_scaling({"type": "default"}) is None
    assert rope.parse_rope_scaling(None) is None


YARN = {"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 4096}


@pytest.mark.parametrize("bad, message", [
    ({"rope_type": "proportional", "factor": 2}, "unknown rope_type 'proportional'"),  # Gemma's, not computed here
    ({**YARN, "factor": 0.5}, "factor must be >= 1 for yarn (got 0.5)"),
    ({"rope_type": "yarn", "factor": 2}, "needs 'original_max_position_embeddings'"),
    ({"rope_type": "linear"}, "needs a 'factor'"),
    ({"rope_type": "linear", "factor": None}, "needs a 'factor'"),
    # a key that would be ignored is an error: a misspelling, or a key of another rope_type
    ({**YARN, "facter": 4}, "key 'facter' is not read by rope_type yarn (it reads: rope_type, factor"),
    ({**YARN, "beta_fats": 64}, "key 'beta_fats' is not read"),
    ({"rope_type": "linear", "factor": 2, "beta_fast": 64}, "key 'beta_fast' is not read by rope_type linear"),
    # values of the wrong type or range
    ({**YARN, "beta_fast": 0}, "beta_fast must be positive (got 0)"),
    ({**YARN, "beta_fast": 1, "beta_slow": 2}, "beta_fast (1) must be greater than beta_slow (2)"),
    ({**YARN, "factor": "2"}, "factor must be a finite number (got '2')"),
    ({**YARN, "factor": float("inf")}, "factor must be a finite number (got inf)"),
    ({**YARN, "original_max_position_embeddings": 4096.5}, "must be a positive integer"),
    ({**YARN, "truncate": "no"}, "truncate must be true or false"),
    ({**YARN, "attention_factor": -1}, "attention_factor must be positive"),
    ({**YARN, "rope_theta": 0}, "rope_theta must be positive (got 0)"),
    ({"rope_theta": "1e6"}, "rope_theta must be a finite number (got '1e6')"),
    ({**YARN, "partial_rotary_factor": 1.5}, "partial_rotary_factor must be in (0, 1]"),
    ({"rope_type": "default", "partial_rotary_factor": 0}, "partial_rotary_factor must be in (0, 1]"),
    ({"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": 8192, "low_freq_factor": 4,
      "high_freq_factor": 1}, "needs high_freq_factor >= low_freq_factor"),
    # conflicting names, and what is not a dict at all
    ({"type": "linear", "rope_type": "yarn", "factor": 2}, "both \"type\": 'linear' and \"rope_type\": 'yarn'"),
    ([1, 2], "must be a JSON object"),
    ("yarn", "must be a JSON object"),
])
def test_bad_rope_scaling_is_a_clear_error(bad, message):
    with pytest.raises(ValueError) as e:
        rope.parse_rope_scaling(bad)
    assert message in str(e.value)


# ------------------------------------------------------------------------ what transformers 5 and published configs say


def hf_rope_parameters(params, head_dim=16, seq_len=None, max_position_embeddings=64):
    """transformers' own inv_freq and attention factor for its rope_parameters (with rope_theta inside)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding  # its default applies partial rotary

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=max_position_embeddings,
                         rope_parameters=dict(params))
    compute = ROPE_INIT_FUNCTIONS.get(params["rope_type"], Phi3RotaryEmbedding.compute_default_rope_parameters)
    return compute(config, seq_len=seq_len)


LLAMA4 = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
          "original_max_position_embeddings": 8192}  # Llama 4 Scout's published values


def test_llama4_equal_freq_factors_are_a_step_at_L_as_transformers_computes_it():
    inv_freq, m = rope.rope_parameters(rope.parse_rope_scaling(LLAMA4), 128, 500000.0)
    theirs, their_m = hf_rope_parameters({"rope_theta": 500000.0, **LLAMA4}, head_dim=128)
    assert torch.equal(inv_freq, theirs) and m == their_m == 1.0
    t = rope.inv_freq(128, 500000.0)
    long = 2 * math.pi / t > 8192  # pairs whose wavelength is longer than L turn fewer than once over it
    assert long.any() and not long.all()
    assert torch.equal(inv_freq[~long], t[~long]) and torch.allclose(inv_freq[long], t[long] / 16)


PARTIAL = {  # head_dim 16, partial_rotary_factor 0.75: the first 12 dims (6 pairs) are rotated
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 16,
                 "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5], "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]},
}


@pytest.mark.parametrize("variant", PARTIAL)
def test_partial_rotary_rotates_the_first_dims_as_transformers_does(variant):
    """transformers rotates the first int(head_dim·partial_rotary_factor) dims, every formula computed with that D,
    and passes the rest through; the model's factor, or the dict's (as transformers 5 writes it), gives the same."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    params = {"rope_theta": 1000.0, "partial_rotary_factor": 0.75, **PARTIAL[variant]}
    for seq_len in (8, 64):  # below and past L = 16 (dynamic grows from max_position_embeddings = 16 here)
        theirs, their_m = hf_rope_parameters(params, seq_len=seq_len, max_position_embeddings=16)
        model_side = rope.parse_rope_scaling(PARTIAL[variant], 16, 16, partial_rotary_factor=0.75)
        in_dict = rope.parse_rope_scaling(params, 16, 16)
        for ours, m in (rope.rope_parameters(model_side, 16, 1000.0, seq_len, partial_rotary_factor=0.75),
                        rope.rope_parameters(in_dict, 16, 10000.0, seq_len)):
            assert ours.shape == (6,) and torch.allclose(ours, theirs, rtol=1e-6, atol=0) and m == their_m, seq_len
    cos, sin = rope.cos_sin_tables(ours, m, seq_len)
    q, k = torch.randn(2, 4, seq_len, 16), torch.randn(2, 2, seq_len, 16)  # [B, heads, T, head_dim]
    their_sin = sin * torch.cat((-torch.ones(6), torch.ones(6)))  # HF's table is (sin, sin), ours (-sin, sin)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos[None], their_sin[None])
    assert torch.allclose(rope.apply_rotary(q, cos, sin), q_hf, atol=1e-6)
    assert torch.allclose(rope.apply_rotary(k, cos, sin), k_hf, atol=1e-6)
    assert torch.equal(rope.apply_rotary(q, cos, sin)[..., 12:], q[..., 12:])


def test_rope_parameters_with_rope_theta_given_to_parse_and_rope_parameters():
    """transformers 5's rope_parameters block, rope_theta inside: the dict's base replaces the model's; a dict that
    says only a base is plain RoPE at that base (ABF, "adjusted base frequency", as Code Llama was fine-tuned)."""
    block = {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    scaling = rope.parse_rope_scaling(block)
    assert scaling == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 4096}
    inv_freq, m = rope.rope_parameters(scaling, D, BASE)  # the model's base 1e4, replaced
    theirs, their_m = hf_rope_parameters(block, head_dim=D)
    assert torch.equal(inv_freq, theirs) and m == their_m
    abf = rope.parse_rope_scaling({"rope_type": "default", "rope_theta": 5e5})
    assert abf == {"rope_type": "default", "rope_theta": 5e5}
    assert torch.equal(rope.rope_parameters(abf, D, BASE)[0], rope.inv_freq(D, 5e5))
    assert rope.parse_rope_scaling({"rope_theta": 5e5}) == abf  # no rope_type: default, as transformers reads it
    assert rope.parse_rope_scaling({"rope_type": "default"}) is None


def test_su_is_longrope():
    su = {"type": "su", "short_factor": [1.0] * 64, "long_factor": [2.0] * 64, "original_max_position_embeddings": L,
          "factor": 2.0}
    assert rope.parse_rope_scaling(su) == rope.parse_rope_scaling({**su, "type": "longrope"})
    assert rope.parse_rope_scaling(su)["rope_type"] == "longrope"


@pytest.mark.parametrize("head_dim, factor, message", [
    (16, 0.5625, "partial_rotary_factor 0.5625 of head_dim 16 rotates 9 dims"),  # an odd number of dims
    (16, 0.1, "rotates 1 dims"),
    (16, 1.25, "it must be in (0, 1]"),
])
def test_a_partial_rotary_factor_that_rotates_no_even_number_of_dims_is_an_error(head_dim, factor, message):
    from model import LlamaConfig

    with pytest.raises(ValueError) as e:
        LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=64, vocab_size=10,
                    partial_rotary_factor=factor)
    assert message in str(e.value) and "\n" not in str(e.value)
    if factor <= 1:  # the dict's factor is checked against the model's head_dim too
        with pytest.raises(ValueError, match="rotates"):
            rope.parse_rope_scaling({"rope_type": "default", "partial_rotary_factor": factor}, head_dim)
