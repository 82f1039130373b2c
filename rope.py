"""Every RoPE variant of the YaRN paper (Peng et al., arXiv 2309.00071), one function each.

Each variant turns an HF-style `rope_scaling` dict into `(inv_freq, attention_factor)`:
rotate pair i of q and k by `position * inv_freq[i]`, and multiply cos and sin by `attention_factor`
(so every q.k logit is multiplied by its square). Notation of ../shared/SPEC.md: D = rotary dims per head,
b = rope_theta, L = original_max_position_embeddings, s = factor, l = current sequence length.

    rope_scaling = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}
    inv_freq, attention_factor = rope_parameters(rope_scaling, head_dim=128, rope_theta=10000.0)
    cos, sin = cos_sin_tables(inv_freq, attention_factor, seq_len=65536)
    q = apply_rotary(q, cos, sin)
"""
import math

import torch

TYPES = ("default", "linear", "ntk", "dynamic", "ntk-by-parts", "yarn", "dynamic-yarn", "llama3")
DYNAMIC = ("dynamic", "dynamic-yarn")  # these depend on the current length l


def theta(head_dim, rope_theta):
    """θ_i = b^(-2i/D), computed in fp32 exactly as HF transformers does."""
    return 1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def default(cfg, head_dim, rope_theta, seq_len):
    return theta(head_dim, rope_theta), 1.0


def linear(cfg, head_dim, rope_theta, seq_len):
    # Position Interpolation (§2.2): positions m -> m/s, i.e. every frequency divided by s
    return theta(head_dim, rope_theta) / cfg["factor"], 1.0


def ntk(cfg, head_dim, rope_theta, seq_len):
    # "NTK-aware" (§3.1): change the base, b' = b·s^(D/(D-2)), so the slowest pair is interpolated by s
    s = cfg["factor"]
    return theta(head_dim, rope_theta * s ** (head_dim / (head_dim - 2))), 1.0


def dynamic(cfg, head_dim, rope_theta, seq_len):
    # Dynamic NTK (§3.3): NTK-aware with the scale grown to fit the current length l; plain RoPE while l <= L
    s, L = cfg["factor"], cfg["original_max_position_embeddings"]
    l = max(seq_len, L)
    return theta(head_dim, rope_theta * ((s * l / L) - (s - 1)) ** (head_dim / (head_dim - 2))), 1.0


def ntk_by_parts(cfg, head_dim, rope_theta, seq_len):
    # NTK-by-parts (§3.2, Definition 2): pairs that turn more than beta_fast times over L keep θ_i, pairs that turn
    # fewer than beta_slow times are interpolated (θ_i/s), with a ramp in between. As in the reference code and HF,
    # the ramp is linear in the pair index i; d(n) is the pair index that turns n times over L.
    s, L = cfg["factor"], cfg["original_max_position_embeddings"]
    beta_fast, beta_slow = cfg.get("beta_fast") or 32, cfg.get("beta_slow") or 1

    def d(n):
        return head_dim * math.log(L / (2 * math.pi * n)) / (2 * math.log(rope_theta))

    low, high = d(beta_fast), d(beta_slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    t = theta(head_dim, rope_theta)
    return t / s * ramp + t * (1 - ramp), 1.0


def yarn(cfg, head_dim, rope_theta, seq_len):
    # YaRN (§3.4) = NTK-by-parts + attention temperature: sqrt(1/t) = 0.1·ln(s) + 1, applied to both cos and sin
    inv_freq, _ = ntk_by_parts(cfg, head_dim, rope_theta, seq_len)
    s = cfg["factor"]

    def g(k):  # DeepSeek's generalisation: mscale = g(mscale) / g(mscale_all_dim), k = 1 is the paper's formula
        return 1.0 if s <= 1 else 0.1 * k * math.log(s) + 1.0

    if cfg.get("attention_factor") is not None:
        attention_factor = cfg["attention_factor"]
    elif cfg.get("mscale") and cfg.get("mscale_all_dim"):
        attention_factor = g(cfg["mscale"]) / g(cfg["mscale_all_dim"])
    else:
        attention_factor = g(1)
    return inv_freq, attention_factor


def dynamic_yarn(cfg, head_dim, rope_theta, seq_len):
    # Dynamic-YaRN (§3.3 + §3.4): YaRN recomputed at every forward pass with s_l = max(s_ft, l/L), where s_ft =
    # `factor` is the scale the model was fine-tuned with (1 for a model that never was). The reference repo has
    # three different versions of this; we follow this rule, which reduces to static YaRN while l <= s_ft·L.
    s_l = max(cfg["factor"], seq_len / cfg["original_max_position_embeddings"])
    return yarn({**cfg, "factor": s_l}, head_dim, rope_theta, seq_len)


def llama3(cfg, head_dim, rope_theta, seq_len):
    # Llama 3.1: NTK-by-parts with the ramp linear in L/λ instead of in i, and no temperature (HF's definition)
    s, L = cfg["factor"], cfg["original_max_position_embeddings"]
    low_freq_factor, high_freq_factor = cfg.get("low_freq_factor", 1.0), cfg.get("high_freq_factor", 4.0)
    t = theta(head_dim, rope_theta)
    wavelen = 2 * math.pi / t
    smooth = ((L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * t / s + smooth * t, 1.0


VARIANTS = {"default": default, "linear": linear, "ntk": ntk, "dynamic": dynamic, "ntk-by-parts": ntk_by_parts,
            "yarn": yarn, "dynamic-yarn": dynamic_yarn, "llama3": llama3}


def parse_rope_scaling(rope_scaling):
    """Validate an HF-style dict (older files say "type"; "finetuned" and such are kept) -> normalized copy or None."""
    if not rope_scaling:
        return None
    cfg = dict(rope_scaling)
    rope_type = cfg.pop("type", None) or cfg.get("rope_type") or "default"
    rope_type = {"dynamic_yarn": "dynamic-yarn", "ntk_by_parts": "ntk-by-parts", "ntk-aware": "ntk"}.get(rope_type, rope_type)
    if rope_type not in VARIANTS:
        raise ValueError(f"unknown rope_type {rope_type!r}; expected one of {', '.join(TYPES)}")
    cfg["rope_type"] = rope_type
    if rope_type == "default":
        return None
    if "factor" not in cfg:
        raise ValueError(f"rope_scaling of type {rope_type} needs a 'factor'")
    cfg["factor"] = float(cfg["factor"])
    if not cfg["factor"] >= 1:
        raise ValueError(f"factor must be >= 1 for {rope_type} (got {cfg['factor']})")
    if rope_type in ("dynamic", "ntk-by-parts", "yarn", "dynamic-yarn", "llama3"):
        if not cfg.get("original_max_position_embeddings"):
            raise ValueError(f"rope_scaling of type {rope_type} needs 'original_max_position_embeddings' "
                             "(the context length the model was pre-trained at)")
        cfg["original_max_position_embeddings"] = int(cfg["original_max_position_embeddings"])
    if rope_type == "llama3" and cfg.get("high_freq_factor", 4.0) <= cfg.get("low_freq_factor", 1.0):
        raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")
    return cfg


def rope_parameters(rope_scaling, head_dim, rope_theta, seq_len=0):
    """(inv_freq [head_dim/2] fp32, attention_factor) for a normalized rope_scaling dict (None = plain RoPE)."""
    cfg = rope_scaling or {"rope_type": "default"}
    return VARIANTS[cfg["rope_type"]](cfg, head_dim, rope_theta, seq_len)


def cos_sin_tables(inv_freq, attention_factor, seq_len, dtype=torch.float32):
    """Real cos/sin tables [seq_len, D] in the "halves" layout: pair i is (x[i], x[i + D/2])."""
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=inv_freq.device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate x [..., T, D] by the tables [T, D]: (x1, x2) -> (x1·cos - x2·sin, x2·cos + x1·sin) per pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
