"""A small, self-contained LLaMA that loads real weights, with every RoPE variant of rope.py.

    model = Llama.from_pretrained("checkpoints/smollm2-135m",
                                  rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                "original_max_position_embeddings": 8192})
    logits = model(tokens)                          # [B, T] -> [B, T, vocab]
    nll = model.nll(tokens[:, :-1], tokens[:, 1:])  # per-token loss, never the full [T, vocab] logits
    out = model.generate(tokens, max_new_tokens=32)

Checkpoint directories (config.json + model.safetensors) are written by convert_llama.py and train.py. The rotary
layout is Hugging Face's: pair i of a head is (x[i], x[i + head_dim/2]); the converter permutes Meta/GGUF q and k.
In bf16, RMSNorm, the RoPE tables and rotation, attention's softmax (inside SDPA) and the loss are computed in fp32.
"""
import dataclasses
import json
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import rope
from common import write_atomic

LAYOUT_KEYS = ("n_heads", "n_kv_heads", "head_dim")  # recorded in model.safetensors: shapes alone cannot tell them


@dataclass
class LlamaConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int  # SwiGLU width
    vocab_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048  # the context the model is meant to run at (s·L for a scaled model)
    rope_scaling: dict | None = None  # HF-style, see rope.py; None = plain RoPE
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_position_embeddings",
                     "head_dim", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            optional = name in ("head_dim", "bos_token_id", "eos_token_id")
            if not (optional and value is None) and (not isinstance(value, int) or isinstance(value, bool)
                                                     or value < (0 if optional else 1)):
                raise ValueError(f"{name} must be a {'non-negative' if optional else 'positive'} integer (got {value!r})")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number (got {value!r})")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be true or false (got {self.tie_word_embeddings!r})")
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}), and "
                             f"head_dim ({self.head_dim}) even")
        self.rope_scaling = rope.parse_rope_scaling(self.rope_scaling)

    def to_dict(self):
        return dataclasses.asdict(self)

    def layout(self):
        return {key: str(getattr(self, key)) for key in LAYOUT_KEYS}

    @property
    def original_max_position_embeddings(self):
        """L: the context length the model was pre-trained at (its rope_scaling's, else max_position_embeddings)."""
        return (self.rope_scaling or {}).get("original_max_position_embeddings") or self.max_position_embeddings

    def flops(self, tokens, past=0, head_tokens=None):
        """Model FLOPs of one forward pass over `tokens` positions after `past` cached ones: 2 per multiply-add of
        every linear layer (the output head only on head_tokens positions, default all), plus attention's q·k and
        p·v, 4·n_heads·head_dim per (query, key) pair and layer, causal pairs only. A training step counts as 3
        forward passes (backward = 2x forward); recomputation under activation checkpointing is not counted."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_token = self.n_layers * (2 * self.dim * q + 2 * self.dim * kv + 3 * self.dim * self.hidden_dim)
        pairs = past * tokens + tokens * (tokens + 1) // 2
        head_tokens = tokens if head_tokens is None else head_tokens
        return 2 * per_token * tokens + 2 * self.vocab_size * self.dim * head_tokens + 4 * q * self.n_layers * pairs

    @classmethod
    def from_checkpoint(cls, path, **overrides):
        """The config of a checkpoint directory. Keys it does not know are errors (a misspelt key would otherwise
        load as its default); "source", which convert_llama.py writes, is the one extra key."""
        path = Path(path)
        file = path / "config.json"
        if not file.is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (config.json and model.safetensors): "
                                    f"make one with `python convert_llama.py SRC {path}`")
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON ({e})") from None
        if not isinstance(raw, dict) or "hidden_size" in raw or "model_type" in raw:
            raise ValueError(f"{file} is not this project's config (a Hugging Face checkpoint? convert it with "
                             f"`python convert_llama.py {path} OUT`)")
        fields = [f.name for f in dataclasses.fields(cls)]
        if unknown := sorted(raw.keys() - {*fields, "source"}):
            raise ValueError(f"{file}: unknown key {unknown[0]!r} (known: {', '.join(fields)}, source)")
        if missing := [f.name for f in dataclasses.fields(cls)
                       if f.default is dataclasses.MISSING and f.name not in raw]:
            raise ValueError(f"{file} has no {missing[0]!r}")
        try:
            config = cls(**{k: v for k, v in raw.items() if k != "source"})
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        return dataclasses.replace(config, **overrides)


def expected_shapes(config):
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in Llama(config).state_dict().items()}


def check_weights(config, shapes, where):
    """Every tensor the config implies, with its shape, and no other: name the first that differs."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"{where}: tensor {name} is missing (the config has {config.n_layers} layers, "
                             f"tie_word_embeddings={config.tie_word_embeddings})")
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(shapes[name])} but the config implies {shape} (dim "
                             f"{config.dim}, {config.n_heads} heads, {config.n_kv_heads} kv heads, head_dim "
                             f"{config.head_dim}, hidden_dim {config.hidden_dim}, vocab_size {config.vocab_size})")
    if extra := sorted(shapes.keys() - expected.keys()):
        raise ValueError(f"{where}: unexpected tensor {extra[0]} (not part of a Llama with this config)")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in fp32, cast back (as Meta and HF do)
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """Keys and values of one layer for generate(), written by position into preallocated tensors (as gpt-fast
    does). With rotated=False the keys are kept before RoPE (paper §3.3), for the dynamic variants."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device, rotated=True):
        self.k = torch.zeros(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.rotated = rotated

    def update(self, pos, k, v):
        end = pos + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"sequence of {end} tokens does not fit a KV cache of {self.k.size(2)}")
        self.k[:, :, pos:end], self.v[:, :, pos:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, pos=0):
        """x [B, T, dim] at positions pos..pos+T-1; cos/sin [pos+T, head_dim/2] cover every position so far."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = rope.apply_rotary(q, cos[pos:], sin[pos:])
        if cache is not None and not cache.rotated:  # every cached key is rotated with this step's tables
            k, v = cache.update(pos, k, v)
            k = rope.apply_rotary(k, cos, sin)
        else:
            k = rope.apply_rotary(k, cos[pos:], sin[pos:])
            if cache is not None:
                k, v = cache.update(pos, k, v)
        mask = None
        if 1 < T < k.size(2):  # a chunk after cached tokens: causal mask aligned to the bottom right
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_word_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.activation_checkpointing = False  # train.py turns it on: recompute each block in backward
        self._tables = None  # cos/sin of a static RoPE, built once for the longest length seen

    def set_rope_scaling(self, rope_scaling):
        """Switch to another RoPE scaling (HF-style dict, None = plain RoPE); the tables are rebuilt."""
        self.config.rope_scaling = rope.parse_rope_scaling(rope_scaling)
        self._tables = None

    def rope_tables(self, seq_len):
        """fp32 cos/sin [seq_len, head_dim/2] for positions 0..seq_len-1 as rotated at length seq_len: built once
        for a static variant (for max_position_embeddings, or longer), for every length for a dynamic one."""
        cfg, device = self.config, self.tok_embeddings.weight.device
        dynamic = rope.is_dynamic(cfg.rope_scaling)
        if dynamic or self._tables is None or len(self._tables[0]) < seq_len or self._tables[0].device != device:
            inv_freq, attention_factor = rope.rope_parameters(cfg.rope_scaling, cfg.head_dim, cfg.rope_theta, seq_len)
            length = seq_len if dynamic else max(seq_len, cfg.max_position_embeddings)
            self._tables = rope.cos_sin_tables(inv_freq.to(device), attention_factor, length)
        cos, sin = self._tables
        return cos[:seq_len], sin[:seq_len]

    def hidden(self, tokens, cache=None, pos=0):
        """Final (normalized) hidden states [B, T, dim] of tokens at positions pos..pos+T-1, after `pos` tokens
        held in `cache` (one KVCache per layer)."""
        cos, sin = self.rope_tables(pos + tokens.size(1))
        x = self.tok_embeddings(tokens)
        for i, block in enumerate(self.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():  # training, so no KV cache here
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache[i] if cache else None, pos)
        return self.norm(x)

    def head(self, h):
        return F.linear(h, self.tok_embeddings.weight if self.output is None else self.output.weight)

    def forward(self, tokens):
        return self.head(self.hidden(tokens))

    def _chunk_nll(self, h, targets):
        return F.cross_entropy(self.head(h).float(), targets, ignore_index=-100, reduction="none")

    def nll(self, tokens, targets, chunk_size=1024):
        """Per-token negative log-likelihood [B, T] in fp32 (0 where targets == -100), computed chunk by chunk so
        that [T, vocab] logits never exist at once; in training each chunk's logits are recomputed in backward."""
        hidden, flat_targets = self.hidden(tokens).flatten(0, 1), targets.flatten()
        losses = []
        for i in range(0, flat_targets.numel(), chunk_size):
            args = (hidden[i:i + chunk_size], flat_targets[i:i + chunk_size])
            losses.append(checkpoint(self._chunk_nll, *args, use_reentrant=False) if torch.is_grad_enabled()
                          else self._chunk_nll(*args))
        return torch.cat(losses).view_as(targets)

    @torch.inference_mode()
    def generate(self, tokens, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, return_logits=False,
                 dynamic_cache="pre-rope"):
        """Continue tokens [B, T] by max_new_tokens through the KV cache; greedy when temperature == 0, else sampled
        from the top_k most likely. Returns [B, T + n] tokens, and with return_logits the [B, n, vocab] logits each
        new token was drawn from.

        A dynamic variant (rope.DYNAMIC) rotates every token anew as the sequence grows. dynamic_cache="pre-rope",
        the paper's way (§3.3), caches keys before rotation and rotates all of them with the current tables at every
        step: exact for the first layer, while deeper layers keep the keys and values computed from hidden states
        of earlier steps, under earlier scales. "recompute" runs the whole sequence again whenever the rotation
        changed: exactly a full forward pass, at one full pass per such token."""
        if dynamic_cache not in ("pre-rope", "recompute"):
            raise ValueError(f"dynamic_cache must be 'pre-rope' or 'recompute' (got {dynamic_cache!r})")
        cfg, (B, T), ref = self.config, tokens.shape, self.tok_embeddings.weight
        recompute = rope.is_dynamic(cfg.rope_scaling) and dynamic_cache == "recompute"
        rotated = not rope.is_dynamic(cfg.rope_scaling) or recompute
        cache = [KVCache(B, T + max_new_tokens, cfg.n_kv_heads, cfg.head_dim, ref.dtype, ref.device, rotated)
                 for _ in self.layers]
        out, pos, done = tokens, 0, torch.zeros(B, dtype=torch.bool, device=tokens.device)
        params, steps = None, []
        for _ in range(max_new_tokens):
            if recompute:
                now = rope.rope_parameters(cfg.rope_scaling, cfg.head_dim, cfg.rope_theta, out.size(1))
                if params is not None and (now[1] != params[1] or not torch.equal(now[0], params[0])):
                    pos = 0  # the rotation changed: every cached token is computed again
                params = now
            logits = self.head(self.hidden(out[:, pos:], cache, pos)[:, -1]).float()
            pos = out.size(1)
            steps.append(logits)
            nxt = sample(logits, temperature, top_k)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            if done.all():
                break
        return (out, torch.stack(steps, 1)) if return_logits else out

    @classmethod
    def from_pretrained(cls, path, rope_scaling=None, dtype=None, device=None):
        """Load a checkpoint directory (memory-mapped, no second copy of the weights). rope_scaling (HF-style dict)
        replaces the checkpoint's own; {"rope_type": "default"} means plain RoPE. dtype: default fp32 on CPU, bf16
        on CUDA."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        config = LlamaConfig.from_checkpoint(path, **({} if rope_scaling is None else {"rope_scaling": rope_scaling}))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        weights = path / "model.safetensors"
        try:
            with safe_open(weights, "pt") as f:
                layout = f.metadata() or {}
            state = load_file(weights, device=str(device))
        except SafetensorError as e:
            raise ValueError(f"{weights} is truncated or corrupt ({e})") from None
        for key in LAYOUT_KEYS:
            if key in layout and layout[key] != str(getattr(config, key)):
                raise ValueError(f"{path / 'config.json'} says {key} {getattr(config, key)} but {weights} was written "
                                 f"with {layout[key]}: the config was edited; restore its {key}")
        check_weights(config, {k: v.shape for k, v in state.items()}, f"{weights} and its config.json disagree")
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
        return model.eval()

    def save_pretrained(self, out_dir, dtype=None):
        """Write config.json and model.safetensors (in dtype, default the model's) into out_dir, each atomically."""
        out = Path(out_dir)
        state = {k: v.detach().to(dtype or v.dtype) for k, v in self.state_dict().items()}
        write_atomic(out / "model.safetensors", lambda tmp: save_weights(state, tmp, self.config.layout()))
        write_atomic(out / "config.json", lambda tmp: tmp.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n"))


def save_weights(state, path, metadata):
    """safetensors' save_file, with its I/O failures (a full disk) raised as the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file({name: t.contiguous() for name, t in state.items()}, path, metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"cannot write {path}: {e}") from None


def sample(logits, temperature, top_k):
    """The next token [B] from logits [B, vocab]: the most likely at temperature 0, else drawn from the top_k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)
