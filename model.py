"""A small, self-contained LLaMA with every RoPE variant of rope.py.

    model = checkpoint.load_model("checkpoints/smollm2-135m",
                                  rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                "original_max_position_embeddings": 8192})
    logits = model(tokens)                          # [B, T] -> [B, T, vocab]
    nll = model.nll(tokens[:, :-1], tokens[:, 1:])  # per-token loss, never the full [T, vocab] logits
    out = model.generate(tokens, max_new_tokens=32)

The rotary layout is Hugging Face's: pair i of a head is (x[i], x[i + head_dim/2]); convert_llama.py permutes Meta and
GGUF q and k into it. Two flags cover the Llama-shaped families that differ from it: partial_rotary_factor (Phi-4-mini
rotates the first 3/4 of each head) and qkv_bias (Qwen2's biases on q, k and v). In bf16, RMSNorm, the RoPE tables
and rotation, attention's softmax (inside SDPA) and the loss are computed in fp32. Reading and writing checkpoint
folders, with every check of what is read, is checkpoint.py's.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
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
    rope_theta: float = 10000.0  # the base b
    max_position_embeddings: int = 2048  # the context the model is meant to run at (s·L for a scaled model)
    rope_scaling: dict | None = None  # HF-style, see rope.py; None = plain RoPE
    partial_rotary_factor: float = 1.0  # RoPE rotates the first int(head_dim·this) dims of each head
    qkv_bias: bool = False  # biases on q, k and v (Qwen2; transformers' Llama attention_bias also biases o)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert self.head_dim % 2 == 0, "RoPE rotates pairs: head_dim must be even"
        # None for plain RoPE, however spelt; checked against head_dim (and completed: longrope's factor, see rope.py)
        scaling = self.checked(self.rope_scaling) or {}
        # transformers 5 writes the base and the rotated fraction into the dict (rope_parameters): here they are fields
        for key in rope.ROTATION_KEYS:
            if key in scaling:
                setattr(self, key, scaling.pop(key))
        rope.rotary_dim(self.head_dim, self.partial_rotary_factor)  # an even number of rotated dims
        self.rope_scaling = None if scaling.get("rope_type", "default") == "default" else scaling

    def checked(self, rope_scaling):
        """rope.parse_rope_scaling with this model's head_dim, max_position_embeddings and partial_rotary_factor."""
        return rope.parse_rope_scaling(rope_scaling, self.head_dim, self.max_position_embeddings,
                                       self.partial_rotary_factor)

    def rope_parameters(self, seq_len):
        """(h(θ_i), attention factor) of this model's rotation at length seq_len (rope.rope_parameters)."""
        return rope.rope_parameters(self.rope_scaling, self.head_dim, self.rope_theta, seq_len,
                                    self.partial_rotary_factor)

    @property
    def original_max_position_embeddings(self):
        """L: the context length the model was pre-trained at (its rope_scaling's, else max_position_embeddings)."""
        return (self.rope_scaling or {}).get("original_max_position_embeddings") or self.max_position_embeddings


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
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, pos=0):
        """x [B, T, dim] at positions pos..pos+T-1; cos/sin [pos+T, head_dim] cover every position so far (or are
        [B, T, head_dim], gathered at explicit position ids, pos = 0: Llama.hidden)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, heads, head_dim]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, heads, T, head_dim] for SDPA
        # q and k are rotated in this layout, where they are contiguous, with tables [T, 1, head_dim] for every head
        here = cos[..., pos:, None, :], sin[..., pos:, None, :]
        q = rope.apply_rotary(q, *here).transpose(1, 2)
        if cache is not None and not cache.rotated:  # every cached key is rotated with this step's tables
            k, v = cache.update(pos, k.transpose(1, 2), v)
            k = rope.apply_rotary(k, cos, sin)
        else:
            k = rope.apply_rotary(k, *here).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(pos, k, v)
        if torch.is_grad_enabled():  # training: SDPA's CPU backward is ~9% faster on contiguous q, k, v
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask = None
        if 1 < T < k.size(2):  # a chunk after cached tokens: the causal mask aligned to the bottom right, which
            mask = causal_lower_right(T, k.size(2))  # runs flash attention on CUDA (a tensor mask cannot, with GQA)
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
        """Switch to another RoPE scaling (HF-style dict, None = plain RoPE; a rope_theta in it replaces the model's
        base for as long as it is set); the tables are rebuilt."""
        self.config.rope_scaling = self.config.checked(rope_scaling)
        self._tables = None

    def rope_tables(self, seq_len):
        """fp32 cos/sin [seq_len, D] (rope.cos_sin_tables; D = the rotated dims) for positions 0..seq_len-1 as
        rotated at length seq_len: built once for a static variant (for max_position_embeddings, or longer), for every
        length for a dynamic one."""
        cfg, device = self.config, self.tok_embeddings.weight.device
        dynamic = rope.is_dynamic(cfg.rope_scaling)
        if dynamic or self._tables is None or len(self._tables[0]) < seq_len or self._tables[0].device != device:
            inv_freq, attention_factor = cfg.rope_parameters(seq_len)
            length = seq_len if dynamic else max(seq_len, cfg.max_position_embeddings)
            self._tables = rope.cos_sin_tables(inv_freq.to(device), attention_factor, length)
        cos, sin = self._tables
        return cos[:seq_len], sin[:seq_len]

    def hidden(self, tokens, cache=None, pos=0, positions=None):
        """Final (normalized) hidden states [B, T, dim] of tokens at positions pos..pos+T-1, after `pos` tokens
        held in `cache` (one KVCache per layer); or, in training only, at the position ids `positions` [B, T]."""
        if positions is None:
            cos, sin = self.rope_tables(pos + tokens.size(1))
        else:  # PoSE (Zhu et al., arXiv 2309.10400): short windows whose position ids skip across the long context
            assert cache is None and pos == 0, "explicit positions are for training, without a KV cache"
            tables = self.rope_tables(int(positions.max()) + 1)
            cos, sin = (t[positions.to(t.device)] for t in tables)  # [B, T, head_dim]
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

    def nll(self, tokens, targets, chunk_size=1024, positions=None):
        """Per-token negative log-likelihood [B, T] in fp32 (0 where targets == -100), computed chunk by chunk so
        that [T, vocab] logits never exist at once; in training each chunk's logits are recomputed in backward.
        positions: the tokens' position ids [B, T] (PoSE training, see hidden); None: 0..T-1."""
        hidden, flat_targets = self.hidden(tokens, positions=positions).flatten(0, 1), targets.flatten()
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
        new token was drawn from. dynamic_cache: how a dynamic variant keeps its cache (see Decoder)."""
        next_logits = Decoder(self, tokens.size(0), tokens.size(1) + max_new_tokens, dynamic_cache)
        out, steps = tokens, []
        done = torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            logits = next_logits(out)
            steps.append(logits)
            nxt = sample(logits, temperature, top_k)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            out = torch.cat((out, nxt[:, None]), dim=1)
            if done.all():
                break
        return (out, torch.stack(steps, 1)) if return_logits else out


class Decoder:
    """next_logits(tokens [B, t]) -> fp32 logits [B, vocab] of the token after them, running only the tokens the KV
    cache does not hold yet.

    A dynamic variant (rope.DYNAMIC) rotates every token anew as the sequence grows. dynamic_cache="pre-rope", the
    paper's way (§3.3), caches keys before rotation and rotates all of them with the current tables at every step:
    exact for the first layer, while deeper layers keep the keys and values computed from hidden states of earlier
    steps, under earlier scales. "recompute" runs the whole sequence again whenever the rotation changed: exactly a
    full forward pass, at one full pass per such token. A variant that switches its rotation once, as the length
    passes L (rope.SWITCHED: longrope), is always recomputed: one full pass, once, for the exact result."""

    def __init__(self, model, batch_size, max_len, dynamic_cache="pre-rope"):
        if dynamic_cache not in ("pre-rope", "recompute"):
            raise ValueError(f"dynamic_cache must be 'pre-rope' or 'recompute' (got {dynamic_cache!r})")
        cfg, ref = model.config, model.tok_embeddings.weight
        dynamic = rope.is_dynamic(cfg.rope_scaling)
        switched = dynamic and cfg.rope_scaling["rope_type"] in rope.SWITCHED
        self.model, self.recompute = model, dynamic and dynamic_cache == "recompute" or switched
        self.cache = [KVCache(batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, ref.dtype, ref.device,
                              rotated=not dynamic or self.recompute) for _ in model.layers]
        self.pos, self.rotation = 0, None  # tokens cached; the rotation they were cached under ("recompute")

    def __call__(self, tokens):
        if self.recompute:
            now = self.model.config.rope_parameters(tokens.size(1))
            if self.rotation is not None and (now[1] != self.rotation[1] or not torch.equal(now[0], self.rotation[0])):
                self.pos = 0  # the rotation changed: every cached token is computed again
            self.rotation = now
        hidden = self.model.hidden(tokens[:, self.pos:], self.cache, self.pos)
        self.pos = tokens.size(1)
        return self.model.head(hidden[:, -1]).float()


def sample(logits, temperature, top_k):
    """The next token [B] from logits [B, vocab]: the most likely at temperature 0, else drawn from the top_k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)
