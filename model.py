"""A small, self-contained LLaMA that loads real weights, with every RoPE variant of rope.py.

    model = Llama.from_pretrained("checkpoints/smollm2-135m",
                                  rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                "original_max_position_embeddings": 8192})
    logits = model(tokens)                       # [B, T] -> [B, T, vocab]
    nll = model.nll(tokens[:, :-1], tokens[:, 1:])  # per-token loss, never the full [T, vocab] logits
    out = model.generate(tokens, max_new_tokens=32)

Checkpoint directories (config.json + model.safetensors) are written by convert_llama.py and train.py. The rotary
layout is Hugging Face's: pair i of a head is (x[i], x[i + head_dim/2]); the converters permute Meta/GGUF q, k.
"""
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import rope


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

    @classmethod
    def from_checkpoint(cls, path, **overrides):
        """The config of a checkpoint directory (its config.json; other keys, such as "source", are ignored)."""
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (needs config.json and model.safetensors); "
                                    "make one with convert_llama.py")
        raw = {**json.loads((path / "config.json").read_text()), **overrides}
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        self.rope_scaling = rope.parse_rope_scaling(self.rope_scaling)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in fp32, cast back (as Meta and HF do)
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class KVCache:
    """Rotated keys and values of one layer, written by position into preallocated tensors (as gpt-fast does)."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        self.k = torch.zeros(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

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
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = rope.apply_rotary(q, cos[pos:pos + T], sin[pos:pos + T])
        k = rope.apply_rotary(k, cos[pos:pos + T], sin[pos:pos + T])
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
        self._tables = None  # (length, cos, sin) of a static RoPE, built once for the longest length seen

    def set_rope_scaling(self, rope_scaling):
        """Switch to another RoPE scaling (HF-style dict, None = plain RoPE); the cached tables are rebuilt."""
        self.config.rope_scaling = rope.parse_rope_scaling(rope_scaling)
        self._tables = None

    def rope_tables(self, seq_len):
        """cos/sin [seq_len, head_dim] for positions 0..seq_len-1 with the rotation used at length seq_len."""
        cfg, ref = self.config, self.tok_embeddings.weight
        dynamic = cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] in rope.DYNAMIC
        stale = self._tables is None or self._tables[0] < seq_len or self._tables[1].device != ref.device \
            or self._tables[1].dtype != ref.dtype
        if dynamic or stale:
            length = seq_len if dynamic else max(seq_len, cfg.max_position_embeddings)
            inv_freq, attention_factor = rope.rope_parameters(cfg.rope_scaling, cfg.head_dim, cfg.rope_theta, seq_len)
            self._tables = (length, *rope.cos_sin_tables(inv_freq.to(ref.device), attention_factor, length, ref.dtype))
        return self._tables[1][:seq_len], self._tables[2][:seq_len]

    def hidden(self, tokens, cache=None, pos=0):
        """Final (normalized) hidden states [B, T, dim]; with a cache, tokens sit at positions pos..pos+T-1."""
        cos, sin = self.rope_tables(pos + tokens.size(1))
        x = self.tok_embeddings(tokens)
        for i, block in enumerate(self.layers):
            if self.activation_checkpointing and torch.is_grad_enabled():
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
        h, t = self.hidden(tokens).flatten(0, 1), targets.flatten()
        losses = []
        for i in range(0, t.numel(), chunk_size):
            args = (h[i:i + chunk_size], t[i:i + chunk_size])
            losses.append(checkpoint(self._chunk_nll, *args, use_reentrant=False) if torch.is_grad_enabled()
                          else self._chunk_nll(*args))
        return torch.cat(losses).view_as(targets)

    @torch.inference_mode()
    def generate(self, tokens, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, return_logits=False):
        """Continue tokens [B, T] by max_new_tokens through the KV cache; greedy when temperature == 0.
        Returns [B, T + n] tokens, and with return_logits the [B, n, vocab] logits each new token was drawn from.

        The cache is valid only while the RoPE parameters stay the same. A dynamic variant changes them as the
        sequence grows (for `dynamic`, at every token past L), and then every cached token's keys, values and
        deeper hidden states change too: caching keys before rotation (paper §3.3) fixes the first layer only.
        So when the parameters change we recompute the whole sequence, which keeps decoding exactly equal to
        recomputation, at the price of one full forward per such token."""
        cfg, (B, T) = self.config, tokens.shape
        ref = self.tok_embeddings.weight
        cache = [KVCache(B, T + max_new_tokens, cfg.n_kv_heads, cfg.head_dim, ref.dtype, ref.device)
                 for _ in self.layers]
        out, pos, done = tokens, 0, torch.zeros(B, dtype=torch.bool, device=tokens.device)
        cached_params, steps = None, []
        for _ in range(max_new_tokens):
            params = rope.rope_parameters(cfg.rope_scaling, cfg.head_dim, cfg.rope_theta, out.size(1))
            if cached_params is not None and (params[1] != cached_params[1] or not torch.equal(params[0], cached_params[0])):
                pos = 0  # the rotation changed: recompute every cached token
            cached_params = params
            logits = self.head(self.hidden(out[:, pos:], cache, pos)[:, -1]).float()
            pos = out.size(1)
            steps.append(logits)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            if done.all():
                break
        return (out, torch.stack(steps, 1)) if return_logits else out

    @classmethod
    def from_pretrained(cls, path, rope_scaling=None, dtype=None, device=None):
        """Load a checkpoint directory (mmap, no second copy of the weights). rope_scaling (HF-style dict)
        replaces the checkpoint's own; {"rope_type": "default"} means plain RoPE. fp32 on CPU, bf16 on CUDA."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        config = LlamaConfig.from_checkpoint(path, **({} if rope_scaling is None else {"rope_scaling": rope_scaling}))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:
            state = load_file(path / "model.safetensors", device=str(device))
        except SafetensorError as e:
            raise ValueError(f"{path / 'model.safetensors'} is truncated or corrupt ({e})") from None
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        for name in sorted(expected.keys() | found.keys()):
            if expected.get(name) != found.get(name):
                raise ValueError(f"{path} weights do not match its config.json: {name} is {found.get(name)} in "
                                 f"model.safetensors but the config implies {expected.get(name)}")
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
        return model.eval()

    def save_pretrained(self, out_dir):
        """Write config.json and model.safetensors into out_dir, each atomically (temp file, then rename)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, out / "model.safetensors.tmp")
        os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
        (out / "config.json.tmp").write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        os.replace(out / "config.json.tmp", out / "config.json")
