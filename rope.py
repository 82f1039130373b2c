"""Every RoPE variant of the YaRN paper (Peng et al., arXiv 2309.00071), one function each.

A variant turns an HF-style `rope_scaling` dict into `(inv_freq, attention_factor)`: pair i of every q and k head is
rotated by the angle `position * inv_freq[i]`, and cos and sin are multiplied by `attention_factor`, so every q·k
logit is multiplied by its square. Notation (docs/method.md): D = rotary dims per head (head_dim), b = rope_theta,
θ_i = b^(-2i/D), L = original_max_position_embeddings, s = factor, l = the current sequence length.

    rope_scaling = parse_rope_scaling({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096})
    inv_freq, attention_factor = rope_parameters(rope_scaling, head_dim=128, rope_theta=10000.0)
    cos, sin = cos_sin_tables(inv_freq, attention_factor, seq_len=65536)
    q = apply_rotary(q, cos, sin)
"""
import math
import numbers

import torch


def theta(head_dim, rope_theta):
    """θ_i = b^(-2i/D), the inverse frequency of pair i, computed in fp32 exactly as HF transformers does."""
    return 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def ntk_base(rope_theta, factor, head_dim):
    """Eq. 16: b' = b·s^(D/(D-2)), the base whose slowest pair turns s times slower (App. A.1)."""
    return rope_theta * factor ** (head_dim / (head_dim - 2))


def default(cfg, head_dim, rope_theta, seq_len):
    return theta(head_dim, rope_theta), 1.0


def linear(cfg, head_dim, rope_theta, seq_len):
    # Position Interpolation (eq. 10): positions m -> m/s, i.e. every frequency divided by s
    return theta(head_dim, rope_theta) / cfg["factor"], 1.0


def ntk(cfg, head_dim, rope_theta, seq_len):
    # "NTK-aware" (§3.1, eqs. 14-16): change the base so that pair 0 is kept and the slowest pair is interpolated
    return theta(head_dim, ntk_base(rope_theta, cfg["factor"], head_dim)), 1.0


def dynamic(cfg, head_dim, rope_theta, seq_len):
    # Dynamic NTK (§3.3): NTK-aware with the scale grown to fit the current length l (HF's rule: s·l/L - (s - 1),
    # which is 1 at l = L and s at l = s·L); plain RoPE while l <= L
    factor, L = cfg["factor"], cfg["original_max_position_embeddings"]
    grown = factor * max(seq_len, L) / L - (factor - 1)
    return theta(head_dim, ntk_base(rope_theta, grown, head_dim)), 1.0


def correction_dim(n_turns, head_dim, rope_theta, L):
    """The pair index that turns n_turns times over L positions. Pair i turns r(i) = L·θ_i/(2π) times (eq. 17,
    r = L/λ); solving L·b^(-2i/D) = 2π·n for i gives d(n) = D·ln(L/(2π·n)) / (2·ln b). Pairs below d(beta_fast)
    turn more than beta_fast times (fast: kept), pairs above d(beta_slow) fewer than beta_slow times (slow:
    interpolated)."""
    return head_dim * math.log(L / (2 * math.pi * n_turns)) / (2 * math.log(rope_theta))


def ntk_by_parts(cfg, head_dim, rope_theta, seq_len):
    # NTK-by-parts (§3.2, Definition 2, eqs. 17-20): h(θ_i) = (1 - γ)·θ_i/s + γ·θ_i, where γ = 1 keeps fast pairs
    # and γ = 0 interpolates slow ones. The paper's ramp γ is linear in r; its reference code, and HF, ramp linearly
    # in the pair index i between d(beta_fast) and d(beta_slow), which is what every published YaRN model used.
    factor, L = cfg["factor"], cfg["original_max_position_embeddings"]
    low = correction_dim(cfg.get("beta_fast", 32.0), head_dim, rope_theta, L)
    high = correction_dim(cfg.get("beta_slow", 1.0), head_dim, rope_theta, L)
    if cfg.get("truncate", True):
        # the reference code rounds the ramp's ends out to whole pair indices, so that each pair is kept, ramped or
        # interpolated as a whole; gpt-oss's truncate=false keeps the exact d(n)
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    interpolated = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 1 - γ
    base = theta(head_dim, rope_theta)
    return base / factor * interpolated + base * (1 - interpolated), 1.0


def yarn_attention_factor(factor, k=1.0):
    """Eq. 22: sqrt(1/t) = 0.1·k·ln(s) + 1 (k = 1 for Llama; DeepSeek's mscale generalises k); 1 when s <= 1."""
    return 1.0 if factor <= 1 else 0.1 * k * math.log(factor) + 1.0


def yarn(cfg, head_dim, rope_theta, seq_len):
    # YaRN (§3.4, Definition 3) = NTK-by-parts + the temperature t of eq. 21, applied as sqrt(1/t) on cos and sin
    inv_freq, _ = ntk_by_parts(cfg, head_dim, rope_theta, seq_len)
    if cfg.get("attention_factor") is not None:
        return inv_freq, cfg["attention_factor"]
    if cfg.get("mscale") and cfg.get("mscale_all_dim"):  # DeepSeek's form, as HF computes it
        return inv_freq, (yarn_attention_factor(cfg["factor"], cfg["mscale"])
                          / yarn_attention_factor(cfg["factor"], cfg["mscale_all_dim"]))
    return inv_freq, yarn_attention_factor(cfg["factor"])


def dynamic_yarn(cfg, head_dim, rope_theta, seq_len):
    # Dynamic-YaRN (§3.3 + §3.4): YaRN recomputed at every forward pass with s_l = max(s_ft, l/L), where s_ft =
    # `factor` is the scale the model was fine-tuned with (1 for a model that never was). The reference repo has
    # three different versions of this; we follow this rule, which equals static YaRN while l <= s_ft·L.
    grown = max(cfg["factor"], seq_len / cfg["original_max_position_embeddings"])
    return yarn({**cfg, "factor": grown}, head_dim, rope_theta, seq_len)


def llama3(cfg, head_dim, rope_theta, seq_len):
    # Llama 3.1: NTK-by-parts with the ramp linear in r = L/λ (as the paper's eq. 18), thresholds given as the
    # low/high frequency factors, no temperature (HF's definition)
    factor, L = cfg["factor"], cfg["original_max_position_embeddings"]
    low_freq_factor, high_freq_factor = cfg.get("low_freq_factor", 1.0), cfg.get("high_freq_factor", 4.0)
    base = theta(head_dim, rope_theta)
    turns = L / (2 * math.pi / base)  # r = L/λ
    kept = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)  # γ
    return (1 - kept) * base / factor + kept * base, 1.0


VARIANTS = {"default": default, "linear": linear, "ntk": ntk, "dynamic": dynamic, "ntk-by-parts": ntk_by_parts,
            "yarn": yarn, "dynamic-yarn": dynamic_yarn, "llama3": llama3}
TYPES = tuple(VARIANTS)
DYNAMIC = ("dynamic", "dynamic-yarn")  # these depend on the current length l
NEEDS_L = ("dynamic", "ntk-by-parts", "yarn", "dynamic-yarn", "llama3")
ALIASES = {"dynamic_yarn": "dynamic-yarn", "ntk_by_parts": "ntk-by-parts", "ntk-aware": "ntk"}
# the keys each rope_type reads besides these, which every type accepts ("finetuned", which published YaRN configs
# carry, changes no number)
COMMON_KEYS = ("rope_type", "factor", "original_max_position_embeddings", "finetuned")
BY_PARTS_KEYS = ("beta_fast", "beta_slow", "truncate")
YARN_KEYS = BY_PARTS_KEYS + ("attention_factor", "mscale", "mscale_all_dim")
KEYS = {"ntk-by-parts": BY_PARTS_KEYS, "yarn": YARN_KEYS, "dynamic-yarn": YARN_KEYS,
        "llama3": ("low_freq_factor", "high_freq_factor")}


def is_dynamic(rope_scaling):
    return rope_scaling is not None and rope_scaling["rope_type"] in DYNAMIC


def parse_rope_scaling(rope_scaling):
    """Check an HF-style rope_scaling dict (older files say "type") and return a normalized copy, or None for plain
    RoPE. Unknown keys, keys of another rope_type, and values of the wrong type or range are errors: a key that is
    silently ignored is a silently wrong number."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope scaling must be a JSON object such as {{\"rope_type\": \"yarn\", \"factor\": 4.0, "
                         f"...}}, not {type(rope_scaling).__name__} {rope_scaling!r}")
    cfg = {k: v for k, v in rope_scaling.items() if v is not None}  # HF writes unset keys as null
    given = [name for name in (cfg.pop("type", None), cfg.get("rope_type")) if name is not None]
    if not all(isinstance(name, str) for name in given):
        raise ValueError(f"rope_type must be a string (got {given})")
    names = {ALIASES.get(name, name) for name in given}
    if len(names) > 1:
        raise ValueError(f"rope scaling says both \"type\": {rope_scaling['type']!r} and \"rope_type\": "
                         f"{rope_scaling['rope_type']!r}: keep one")
    rope_type = names.pop() if names else "default"
    if rope_type not in VARIANTS:
        raise ValueError(f"unknown rope_type {rope_type!r}; expected one of {', '.join(TYPES)}")
    cfg = {"rope_type": rope_type, **{k: v for k, v in cfg.items() if k != "rope_type"}}
    known = COMMON_KEYS + KEYS.get(rope_type, ())
    if unknown := [k for k in cfg if k not in known]:
        raise ValueError(f"rope scaling key {unknown[0]!r} is not read by rope_type {rope_type} (it reads: "
                         f"{', '.join(known)})")
    if rope_type == "default":
        return None
    if "factor" not in cfg:
        raise ValueError(f"rope_type {rope_type} needs a 'factor'")
    if rope_type in NEEDS_L and "original_max_position_embeddings" not in cfg:
        raise ValueError(f"rope_type {rope_type} needs 'original_max_position_embeddings' (the context length the "
                         "model was pre-trained at)")
    cfg = {key: check_value(rope_type, key, value) for key, value in cfg.items()}
    if cfg.get("beta_fast", 32.0) <= cfg.get("beta_slow", 1.0):
        raise ValueError(f"beta_fast ({cfg.get('beta_fast', 32.0):g}) must be greater than beta_slow "
                         f"({cfg.get('beta_slow', 1.0):g}): pairs turning more than beta_fast times are kept, fewer "
                         "than beta_slow times interpolated")
    if cfg.get("high_freq_factor", 4.0) <= cfg.get("low_freq_factor", 1.0):
        raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return cfg


def check_value(rope_type, key, value):
    if key == "rope_type":
        return value
    if key in ("finetuned", "truncate"):
        if not isinstance(value, bool):
            raise ValueError(f"rope scaling {key} must be true or false (got {value!r})")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"rope scaling {key} must be a finite number (got {value!r})")
    if key == "factor" and value < 1:
        raise ValueError(f"factor must be >= 1 for {rope_type} (got {value:g})")
    if key == "original_max_position_embeddings":
        if value != int(value) or value < 1:
            raise ValueError(f"original_max_position_embeddings must be a positive integer (got {value!r})")
        return int(value)
    if value < 0 or value == 0 and key not in ("mscale", "mscale_all_dim"):
        raise ValueError(f"rope scaling {key} must be positive (got {value:g})")
    return float(value)


def rope_parameters(rope_scaling, head_dim, rope_theta, seq_len=0):
    """(inv_freq [head_dim/2] fp32, attention_factor) for a parsed rope_scaling dict (None = plain RoPE); seq_len
    is the current length l, which only the dynamic variants read."""
    cfg = rope_scaling or {"rope_type": "default"}
    return VARIANTS[cfg["rope_type"]](cfg, head_dim, rope_theta, seq_len)


def cos_sin_tables(inv_freq, attention_factor, seq_len):
    """Real fp32 tables [seq_len, D/2]: cos and sin of position·inv_freq[i], times the attention factor."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=inv_freq.device), inv_freq)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rotary(x, cos, sin):
    """Rotate x [..., T, D] by the tables [T, D/2] in fp32, in Hugging Face's "halves" layout: pair i is
    (x[i], x[i + D/2]) -> (x[i]·cos - x[i + D/2]·sin, x[i + D/2]·cos + x[i]·sin). Returns x's dtype."""
    x1, x2 = x.contiguous().float().chunk(2, dim=-1)  # contiguous first: 5x faster than on a transposed view
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
