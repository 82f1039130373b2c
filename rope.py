"""Every RoPE variant of the YaRN paper (Peng et al., arXiv 2309.00071), one function each, then the rotation.

Notation (docs/method.md): D = rotary dims per head (head_dim, or its first int(head_dim·partial_rotary_factor)),
b = the base (rope_theta), θ_i = b^(-2i/D) the angle pair i turns per position (inv_freq), L =
original_max_position_embeddings, s = factor, l = the current sequence length. A variant maps an HF-style
`rope_scaling` dict to (h(θ_i) for every pair, the attention factor √(1/t)): pair i of every q and k head is rotated
by position·h(θ_i), and cos and sin are multiplied by √(1/t), so every q·k logit is multiplied by 1/t.

    scaling = parse_rope_scaling({"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096})
    inv_freq, attention_factor = rope_parameters(scaling, head_dim=128, base=10000.0)
    cos, sin = cos_sin_tables(inv_freq, attention_factor, seq_len=65536)
    q = apply_rotary(q, cos, sin)

Plain RoPE is `scaling = None`. The variants trust their dict: `parse_rope_scaling`, at the end of the file, checks
one (and spells plain RoPE None) before it gets here.
"""
import math
import numbers

import torch


def inv_freq(head_dim, base):
    """θ_i = b^(-2i/D) for i = 0 .. D/2 - 1, in fp32 exactly as HF transformers computes it."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def ntk_base(base, s, head_dim):
    """Eq. 16: b' = b·s^(D/(D-2)), the base whose slowest pair turns s times slower (App. A.1)."""
    return base * s ** (head_dim / (head_dim - 2))


def blend(theta, s, gamma):
    """Eq. 20: h(θ_i) = (1 - γ_i)·θ_i/s + γ_i·θ_i: γ = 1 keeps pair i as it is, γ = 0 interpolates it by s."""
    return (1 - gamma) * theta / s + gamma * theta


def default(scaling, head_dim, base, seq_len):
    return inv_freq(head_dim, base), 1.0


def linear(scaling, head_dim, base, seq_len):
    # Position Interpolation (eq. 10): positions m -> m/s, i.e. every θ_i divided by s
    return inv_freq(head_dim, base) / scaling["factor"], 1.0


def ntk(scaling, head_dim, base, seq_len):
    # "NTK-aware" (§3.1, eqs. 14-16): a larger base, so that pair 0 is kept and the slowest pair is interpolated
    return inv_freq(head_dim, ntk_base(base, scaling["factor"], head_dim)), 1.0


def dynamic(scaling, head_dim, base, seq_len):
    # Dynamic NTK (§3.3): NTK-aware with the scale grown to fit the current length l (HF's rule: s·l/L - (s - 1),
    # which is 1 at l = L and s at l = s·L); plain RoPE while l <= L
    s, L = scaling["factor"], scaling["original_max_position_embeddings"]
    grown = s * max(seq_len, L) / L - (s - 1)
    return inv_freq(head_dim, ntk_base(base, grown, head_dim)), 1.0


def correction_dim(n_turns, head_dim, base, L):
    """The pair index that turns n_turns times over L positions. Pair i turns r(i) = L·θ_i/(2π) times (eq. 17,
    r = L/λ); solving L·b^(-2i/D) = 2π·n for i gives d(n) = D·ln(L/(2π·n)) / (2·ln b)."""
    return head_dim * math.log(L / (2 * math.pi * n_turns)) / (2 * math.log(base))


def ntk_by_parts(scaling, head_dim, base, seq_len):
    # NTK-by-parts (§3.2, Definition 2, eqs. 17-20): pairs turning more than β times over L are kept (γ = 1), pairs
    # turning fewer than α times are interpolated (γ = 0), a linear ramp between. The paper's ramp is linear in r;
    # its reference code, and HF, ramp linearly in the pair index i between d(β) and d(α), as every published YaRN
    # model used.
    s, L = scaling["factor"], scaling["original_max_position_embeddings"]
    low = correction_dim(scaling.get("beta_fast", 32.0), head_dim, base, L)   # d(β)
    high = correction_dim(scaling.get("beta_slow", 1.0), head_dim, base, L)   # d(α)
    if scaling.get("truncate", True):
        # the reference code rounds the ramp's ends out to whole pair indices, so that each pair is kept, ramped or
        # interpolated as a whole; gpt-oss's truncate=false keeps the exact d(n)
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return blend(inv_freq(head_dim, base), s, gamma=1 - ramp), 1.0


def yarn_attention_factor(s, k=1.0):
    """Eq. 22: √(1/t) = 0.1·k·ln(s) + 1 (k = 1 for Llama; DeepSeek's mscale generalises k); 1 when s <= 1."""
    return 1.0 if s <= 1 else 0.1 * k * math.log(s) + 1.0


def yarn(scaling, head_dim, base, seq_len):
    # YaRN (§3.4, Definition 3) = NTK-by-parts + the temperature t of eq. 21, applied as √(1/t) on cos and sin
    h, _ = ntk_by_parts(scaling, head_dim, base, seq_len)
    if scaling.get("attention_factor") is not None:
        return h, scaling["attention_factor"]
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):  # DeepSeek's form, as HF computes it
        s = scaling["factor"]
        return h, yarn_attention_factor(s, scaling["mscale"]) / yarn_attention_factor(s, scaling["mscale_all_dim"])
    return h, yarn_attention_factor(scaling["factor"])


def dynamic_yarn(scaling, head_dim, base, seq_len):
    # Dynamic-YaRN (§3.3 + §3.4): YaRN recomputed at every forward pass with s_l = max(s_ft, l/L), where s_ft =
    # `factor` is the scale the model was fine-tuned with (1 for a model that never was). The reference repo has
    # three different versions of this; we follow this rule, which equals static YaRN while l <= s_ft·L.
    grown = max(scaling["factor"], seq_len / scaling["original_max_position_embeddings"])
    return yarn({**scaling, "factor": grown}, head_dim, base, seq_len)


def llama3(scaling, head_dim, base, seq_len):
    # Llama 3.1: NTK-by-parts with the ramp linear in r = L/λ (as the paper's eq. 18), its ends given as the
    # low/high frequency factors, no temperature (HF's definition)
    s, L = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    theta = inv_freq(head_dim, base)
    r = L / (2 * math.pi / theta)  # turns over L = L/λ
    # equal factors (Llama 4's 1 and 1) leave no ramp: pairs turning more than `low` times are kept, the rest
    # interpolated, as transformers' and vLLM's where() compute it
    gamma = ((r - low) / (high - low)).clamp(0, 1) if high > low else (r > low).float()
    return blend(theta, s, gamma), 1.0


def longrope_attention_factor(s, L):
    """LongRoPE's √(1 + ln(s)/ln(L)), where transformers gives no attention_factor; 1 when s <= 1."""
    return 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(L))


def longrope(scaling, head_dim, base, seq_len):
    # LongRoPE (Ding et al. 2024, arXiv 2402.13753; Phi-3, 3.5, 4-mini): NTK-by-parts divides θ_i by a ramp between 1
    # and s; LongRoPE divides it by a factor found for each pair by search (evolutionary, on perplexity). Two searched
    # lists: short_factor while l <= L, long_factor past it (transformers switches on the current length l > L).
    L = scaling["original_max_position_embeddings"]
    factors = torch.tensor(scaling["long_factor" if seq_len > L else "short_factor"], dtype=torch.float32)
    # θ_i / factor_i written as transformers computes it, 1 / (factor_i·b^(2i/D)), so that the bits agree
    h = 1.0 / (factors * base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.get("attention_factor") is not None:
        return h, scaling["attention_factor"]
    return h, longrope_attention_factor(scaling["factor"], L)


VARIANTS = {"default": default, "linear": linear, "ntk": ntk, "dynamic": dynamic, "ntk-by-parts": ntk_by_parts,
            "yarn": yarn, "dynamic-yarn": dynamic_yarn, "llama3": llama3, "longrope": longrope}
DYNAMIC = ("dynamic", "dynamic-yarn", "longrope")  # these depend on the current length l
SWITCHED = ("longrope",)  # ...through l > L only: their rotation changes once, when l passes L (model.Decoder)


def is_dynamic(scaling):
    return scaling is not None and scaling["rope_type"] in DYNAMIC


def rope_parameters(scaling, head_dim, base, seq_len=0, partial_rotary_factor=1.0):
    """(h(θ_i) [D/2] fp32, attention factor) for a checked rope_scaling dict (None = plain RoPE); seq_len is the
    current length l, which only the dynamic variants read. head_dim, base and partial_rotary_factor are the model's;
    a rope_theta or partial_rotary_factor in the dict (transformers 5 writes both into rope_parameters) replaces its."""
    scaling = scaling or {"rope_type": "default"}
    D = rotary_dim(head_dim, scaling.get("partial_rotary_factor", partial_rotary_factor))
    return VARIANTS[scaling["rope_type"]](scaling, D, scaling.get("rope_theta", base), seq_len)


def rotary_dim(head_dim, partial_rotary_factor):
    """D: the first int(head_dim·partial_rotary_factor) dims of a head are rotated (transformers' rule; Phi-4-mini
    rotates 96 of 128), the rest pass through."""
    D = int(head_dim * partial_rotary_factor)
    if not 0 < partial_rotary_factor <= 1 or D < 2 or D % 2:
        raise ValueError(f"partial_rotary_factor {partial_rotary_factor:g} of head_dim {head_dim} rotates {D} dims: "
                         "it must be in (0, 1], and RoPE rotates pairs, so an even number of dims, at least 2")
    return D


def cos_sin_tables(inv_freq, attention_factor, seq_len):
    """Real fp32 tables [seq_len, D] for apply_rotary, times the attention factor: cos of position·inv_freq[i] at both
    places of pair i (i and i + D/2), and its sin, negated at i (where the rotation subtracts it)."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=inv_freq.device), inv_freq)
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate x [..., D] by the tables cos, sin [..., D] of cos_sin_tables (broadcast against x) in fp32, in Hugging
    Face's "halves" layout: pair i is (x[i], x[i + D/2]) -> (x[i]·cos - x[i + D/2]·sin, x[i + D/2]·cos + x[i]·sin),
    that is x·(cos, cos) + (x[D/2:], x[:D/2])·(-sin, sin): a multiply and a multiply-add. Returns x's dtype.
    Tables narrower than x (partial rotary, D < head_dim) rotate x's first D dims and pass the rest through."""
    D = cos.size(-1)
    if D < x.size(-1):
        return torch.cat((apply_rotary(x[..., :D], cos, sin), x[..., D:]), dim=-1)
    xf = x.float()  # in bf16 a copy, yet faster than mixing bf16 and fp32 in each op
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.addcmul(xf * cos, torch.cat((x2, x1), dim=-1), sin).to(x.dtype)


# ----------------------------------------------------------------------------- checking a rope_scaling dict
# Configs come from files and command lines: a key that is silently ignored is a silently wrong number, so every
# key must be one the variant reads, with a value of the right type and range.

TYPES = tuple(VARIANTS)
NEEDS_L = ("dynamic", "ntk-by-parts", "yarn", "dynamic-yarn", "llama3", "longrope")
ALIASES = {"dynamic_yarn": "dynamic-yarn", "ntk_by_parts": "ntk-by-parts", "ntk-aware": "ntk",
           "su": "longrope"}  # Phi-3's first name for it, still in published configs
# the base and the rotated fraction, which transformers 5 writes into the dict (rope_parameters): where a dict says
# them they replace the model's (rope_parameters above), so that a raised base (ABF) is a dict like any other
ROTATION_KEYS = ("rope_theta", "partial_rotary_factor")
# every type reads these ("finetuned", which published YaRN configs carry, changes no number), and some more
COMMON_KEYS = ("rope_type", "factor", "original_max_position_embeddings", "finetuned") + ROTATION_KEYS
BY_PARTS_KEYS = ("beta_fast", "beta_slow", "truncate")
YARN_KEYS = BY_PARTS_KEYS + ("attention_factor", "mscale", "mscale_all_dim")
LONGROPE_KEYS = ("short_factor", "long_factor", "attention_factor")
KEYS = {"ntk-by-parts": BY_PARTS_KEYS, "yarn": YARN_KEYS, "dynamic-yarn": YARN_KEYS,
        "llama3": ("low_freq_factor", "high_freq_factor"), "longrope": LONGROPE_KEYS}


def parse_rope_scaling(rope_scaling, head_dim=None, max_position_embeddings=None, partial_rotary_factor=1.0):
    """Check an HF-style rope_scaling dict (older files say "type"; transformers 5's rope_parameters also hold
    rope_theta and partial_rotary_factor) and return a normalized copy, or None for plain RoPE (None, or rope_type
    "default" that says no base). Errors are one line that names the key. The model's head_dim,
    max_position_embeddings and partial_rotary_factor, which model.LlamaConfig and Llama.set_rope_scaling pass,
    complete the checks of the rotated dims and of longrope's lists (check_longrope)."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope scaling must be a JSON object such as {{\"rope_type\": \"yarn\", \"factor\": 4.0, "
                         f"...}}, not {type(rope_scaling).__name__} {rope_scaling!r}")
    scaling = {k: v for k, v in rope_scaling.items() if v is not None}  # HF writes unset keys as null
    rope_type = rope_type_of(scaling)
    scaling = {"rope_type": rope_type, **{k: v for k, v in scaling.items() if k not in ("rope_type", "type")}}
    known = COMMON_KEYS + KEYS.get(rope_type, ())
    if unknown := [k for k in scaling if k not in known]:
        raise ValueError(f"rope scaling key {unknown[0]!r} is not read by rope_type {rope_type} (it reads: "
                         f"{', '.join(known)})")
    if rope_type == "default":  # plain RoPE: None, unless the dict says a base or a rotated fraction
        scaling = {k: v for k, v in scaling.items() if k in ("rope_type",) + ROTATION_KEYS}
        if len(scaling) == 1:
            return None
    elif "factor" not in scaling and rope_type != "longrope":  # longrope's may be derived (check_longrope)
        raise ValueError(f"rope_type {rope_type} needs a 'factor'")
    if rope_type in NEEDS_L and "original_max_position_embeddings" not in scaling:
        raise ValueError(f"rope_type {rope_type} needs 'original_max_position_embeddings' (the context length the "
                         "model was pre-trained at)")
    scaling = {key: check_value(rope_type, key, value) for key, value in scaling.items()}
    if scaling.get("beta_fast", 32.0) <= scaling.get("beta_slow", 1.0):
        raise ValueError(f"beta_fast ({scaling.get('beta_fast', 32.0):g}) must be greater than beta_slow "
                         f"({scaling.get('beta_slow', 1.0):g}): pairs turning more than beta_fast times are kept, "
                         "fewer than beta_slow times interpolated")
    if scaling.get("high_freq_factor", 4.0) < scaling.get("low_freq_factor", 1.0):
        raise ValueError("llama3 rope scaling needs high_freq_factor >= low_freq_factor")
    D = head_dim and rotary_dim(head_dim, scaling.get("partial_rotary_factor", partial_rotary_factor))
    return check_longrope(scaling, head_dim, D, max_position_embeddings) if rope_type == "longrope" else scaling


def check_longrope(scaling, head_dim, D, max_position_embeddings):
    """longrope needs both lists, of one factor per rotary pair: as long as each other, and D/2 long where the
    caller knows head_dim (D: the dims it rotates). A missing factor (Phi-3's configs have none) is max_position_embeddings / L, as
    transformers derives it; it only sets the attention factor, which is 1 for s <= 1, hence at least 1."""
    if "short_factor" not in scaling or "long_factor" not in scaling:
        raise ValueError("rope_type longrope needs 'short_factor' and 'long_factor' (lists of one factor per rotary "
                         "pair, for lengths up to original_max_position_embeddings and past it)")
    short, long = len(scaling["short_factor"]), len(scaling["long_factor"])
    if short != long:
        raise ValueError(f"longrope short_factor has {short} entries but long_factor {long}: both need one per "
                         "rotary pair")
    if D and short != D // 2:
        rotated = f" rotates {D} of its dims:" if D < head_dim else " has"
        raise ValueError(f"longrope short_factor and long_factor have {short} entries, but head_dim {head_dim}"
                         f"{rotated} {D // 2} rotary pairs (one factor each)")
    if "factor" in scaling:
        return scaling
    if max_position_embeddings is None:
        raise ValueError("rope_type longrope needs a 'factor' (or the model's max_position_embeddings, from which "
                         "it is derived)")
    return {**scaling, "factor": max(1.0, max_position_embeddings / scaling["original_max_position_embeddings"])}


def rope_type_of(scaling):
    """The rope_type of a dict that may say "type" (older HF files), "rope_type", or both alike."""
    given = [name for name in (scaling.get("type"), scaling.get("rope_type")) if name is not None]
    if not all(isinstance(name, str) for name in given):
        raise ValueError(f"rope_type must be a string (got {given})")
    names = {ALIASES.get(name, name) for name in given}
    if len(names) > 1:
        raise ValueError(f"rope scaling says both \"type\": {scaling['type']!r} and \"rope_type\": "
                         f"{scaling['rope_type']!r}: keep one")
    rope_type = names.pop() if names else "default"
    if rope_type not in VARIANTS:
        raise ValueError(f"unknown rope_type {rope_type!r}; expected one of {', '.join(TYPES)}")
    return rope_type


def check_value(rope_type, key, value):
    if key == "rope_type":
        return value
    if key in ("finetuned", "truncate"):
        if not isinstance(value, bool):
            raise ValueError(f"rope scaling {key} must be true or false (got {value!r})")
        return value
    if key in ("short_factor", "long_factor"):
        return check_factors(key, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"rope scaling {key} must be a finite number (got {value!r})")
    if key == "factor" and value < 1:
        raise ValueError(f"factor must be >= 1 for {rope_type} (got {value:g})")
    if key == "partial_rotary_factor" and not 0 < value <= 1:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], the fraction of each head RoPE rotates (got "
                         f"{value:g})")
    if key == "original_max_position_embeddings":
        if value != int(value) or value < 1:
            raise ValueError(f"original_max_position_embeddings must be a positive integer (got {value!r})")
        return int(value)
    if value < 0 or value == 0 and key not in ("mscale", "mscale_all_dim"):
        raise ValueError(f"rope scaling {key} must be positive (got {value:g})")
    return float(value)


def check_factors(key, value):
    """longrope's short_factor or long_factor: a list of finite positive numbers (θ_i is divided by entry i)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"rope scaling {key} must be a list of numbers, one per rotary pair (got {value!r})")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x <= 0:
            raise ValueError(f"rope scaling {key}[{i}] must be a finite positive number (got {x!r})")
    return [float(x) for x in value]
