"""Convert Llama checkpoints: Hugging Face, Meta or GGUF into this project's checkpoint directory, and back to HF.

    python convert_llama.py path/to/Llama-2-7b-hf checkpoints/llama-2-7b         # config.json + *.safetensors/*.bin
    python convert_llama.py path/to/llama-2-13b checkpoints/llama-2-13b          # params.json + consolidated.NN.pth
    python convert_llama.py SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/smollm2  # llama.cpp GGUF, dequantized
    python convert_llama.py runs/yarn/final runs/yarn/hf                         # ours -> Hugging Face transformers

The format is detected from SRC; Hugging Face folders may hold Llama, Mistral, Phi-3 or Qwen2 (read_hf). OUT gets
config.json (model.LlamaConfig), model.safetensors and the tokenizer files, or, from one of our directories, a Hugging
Face directory (LlamaForCausalLM; Qwen2ForCausalLM or Phi3ForCausalLM for what only they compute: read_ours). It is
written into a temporary folder next to OUT and renamed at the end, so OUT is complete or as it was; a non-empty OUT
is replaced only with --force, and never when OUT and SRC overlap. Our rotary layout is Hugging Face's "halves" layout
(docs/method.md), so HF weights go in and out as they are, while Meta and GGUF q/k weights are permuted from Meta's
adjacent-pairs layout: in `permute`, and nowhere else in the project. Tensors keep the source dtype (GGUF: dequantized
to fp32) unless --dtype says otherwise.
"""
import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from tools import assets
import rope
from common import (DEFAULT_CHECKPOINT, DTYPES, ArgumentParser, check_not_an_input, cli, is_within, number,
                    read_json_object, write_dir_atomic)
from tokenizer import Tokenizer
from checkpoint import check_finite, check_weights, layout, llama_config, load_config, save_weights

# our tensor names -> theirs, used in both directions; blocks are model.layers.N.* in HF, blk.N.* in GGUF
HF_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
            "attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm", "feed_forward.w1": "mlp.gate_proj",
            "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj"}
GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
HF_LAYERS, GGUF_LAYERS = "model.layers.", "blk."
# Phi-3 fuses q, k and v into one projection, and gate and up into another: each is its parts' rows, in this order
PHI3_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json")


def ours_to(name, table, layer_prefix):
    """layers.3.feed_forward.w3.weight -> model.layers.3.mlp.up_proj.weight (with HF's table)."""
    stem, suffix = name.rsplit(".", 1)
    if stem.startswith("layers."):
        _, i, part = stem.split(".", 2)
        return f"{layer_prefix}{i}.{table[part]}.{suffix}"
    return f"{table[stem]}.{suffix}"


def to_ours(name, table, layer_prefix):
    """The inverse of ours_to; None for a name that is not in the table."""
    inverse = {theirs: ours for ours, theirs in table.items()}
    stem, suffix = name.rsplit(".", 1)
    if stem.startswith(layer_prefix):
        i, _, part = stem.removeprefix(layer_prefix).partition(".")
        return f"layers.{i}.{inverse[part]}.{suffix}" if part in inverse and i.isdigit() else None
    return f"{inverse[stem]}.{suffix}" if stem in inverse else None


def corrupt(path, e):
    return ValueError(f"{path} is truncated or corrupt: {' '.join(str(e).split())}")


def read_json(path):
    """config.json, params.json, an index: JSON objects, anything else a one-line error (common.read_json_object)."""
    return read_json_object(path)


# ---------------------------------------------------------------------------------------- Hugging Face directory

def read_hf(src):
    """Llama, Mistral, Phi-3 (fused projections, partial rotary) and Qwen2 (q/k/v biases); sliding windows (Mistral's,
    Phi-3's, Qwen2's use_sliding_window) are dropped, as the paper does for Mistral."""
    cfg = read_json(src / "config.json")
    model_type = cfg.get("model_type")
    if model_type not in ("llama", "mistral", "phi3", "qwen2"):
        raise ValueError(f"{src / 'config.json'}: model_type {model_type!r} is not supported (only llama, mistral, "
                         "phi3 and qwen2; docs/usage.md lists the model families that load)")
    # transformers 5.x keeps rope_theta and the scaling in `rope_parameters`, 4.x has `rope_theta` + `rope_scaling`
    if not isinstance(cfg.get("rope_parameters") or {}, dict):
        raise ValueError(f"{src / 'config.json'}: rope_parameters must be a JSON object such as {{\"rope_type\": "
                         f"\"yarn\", \"factor\": 4.0, ...}}, not {type(cfg['rope_parameters']).__name__} "
                         f"{cfg['rope_parameters']!r}")
    params = dict(cfg.get("rope_parameters") or {})  # 5.x: with the base and the rotated fraction; 4.x: beside it
    rope_theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    partial_rotary_factor = params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{src / 'config.json'}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
    scaling = params or cfg.get("rope_scaling")
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        if model_type == "phi3":  # transformers gives Phi3Config's own L (4096 unless it says) priority over the dict's
            scaling = {**scaling, "original_max_position_embeddings": cfg.get("original_max_position_embeddings", 4096)}
        elif not scaling.get("original_max_position_embeddings"):
            # transformers' fallback: the pre-training length is max_position_embeddings (`dynamic` grows from it)
            scaling = {**scaling, "original_max_position_embeddings":
                       cfg.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 2048)}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in cfg:
            raise ValueError(f"{src / 'config.json'} has no {key!r}")
    eos = cfg.get("eos_token_id")  # Llama 3.1 lists three: keep the first, <|end_of_text|>
    config = dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim=cfg.get("head_dim") or 0,
        hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048), rope_scaling=scaling,
        partial_rotary_factor=partial_rotary_factor, qkv_bias=model_type == "qwen2",
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos)
    state = {}
    for file in hf_weight_files(src):
        if not (src / file).exists():
            raise ValueError(f"{src / file} is missing (listed in {src}'s index.json): download every shard")
        for name, tensor in unfused(load_weights(src / file), config, src / file):
            ours = to_ours(name, HF_NAMES, HF_LAYERS)
            if name.endswith("rotary_emb.inv_freq") or ours == "output.weight" and config["tie_word_embeddings"]:
                continue  # a buffer older checkpoints saved / a copy of the tied embedding
            state[ours or name] = tensor

    def copy_tokenizer(out):
        for name in HF_TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy(src / name, out / name)
        if not (src / "tokenizer.model").exists() and (src / "original" / "tokenizer.model").exists():
            shutil.copy(src / "original" / "tokenizer.model", out / "tokenizer.model")  # Llama 3 repos keep it there

    return config, state, copy_tokenizer


def unfused(weights, config, where):
    """(name, tensor) pairs with Phi-3's fused projections split into Llama's (PHI3_FUSED); the rest as they are, and
    all of them where the config's sizes are not positive integers (checked_config then names the bad one)."""
    dim, n_heads, n_kv_heads, hidden_dim, head_dim = (config[k] for k in ("dim", "n_heads", "n_kv_heads",
                                                                          "hidden_dim", "head_dim"))
    if not all(isinstance(n, int) and n > 0 for n in (dim, n_heads, n_kv_heads, hidden_dim, head_dim or 1)):
        yield from weights
        return
    head_dim = head_dim or dim // n_heads
    rows = {"self_attn.qkv_proj": [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim],
            "mlp.gate_up_proj": [hidden_dim, hidden_dim]}
    for name, tensor in weights:
        fused = next((f for f in PHI3_FUSED if name.endswith(f"{f}.weight")), None)
        if fused is None:
            yield name, tensor
            continue
        if tensor.dim() != 2 or tensor.shape[0] != sum(rows[fused]):
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, but the config implies "
                             f"{sum(rows[fused])} rows ({' + '.join(map(str, rows[fused]))}: "
                             f"{', '.join(PHI3_FUSED[fused])})")
        for part, rows_of_part in zip(PHI3_FUSED[fused], tensor.split(rows[fused])):
            yield name.replace(fused, part), rows_of_part


def hf_weight_files(src):
    """The weight files of an HF checkpoint folder: its shards (an index names them), or its one file."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index).exists():
            return shard_files(src / index)
        if (src / single).exists():
            return [single]
    raise ValueError(f"{src} has config.json but no weights (model.safetensors, model.safetensors.index.json or "
                     "pytorch_model.bin)")


def shard_files(index):
    """The shard files an HF index (model.safetensors.index.json) maps tensors to: names of files in its folder (a
    name that leads out of it, ../x or /x, is refused: a checkpoint reads nothing outside itself)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index} has no \"weight_map\" object {{tensor name: shard file}}: the download is "
                         "incomplete or the file is not an index")
    files = sorted(set(weight_map.values()))
    for file in files:
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise ValueError(f"{index} lists the shard {file}, outside {index.parent}: a checkpoint's shards lie in "
                             "its own folder")
    return files


def load_weights(path):
    """(name, tensor) pairs of one .safetensors or .bin file (a .bin is memory-mapped, not read at once)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise corrupt(path, e) from None
    else:
        yield from load_torch(path).items()


def load_torch(path):
    if is_legacy_torch_file(path):
        raise ValueError(f"{path} is in PyTorch's legacy format (torch.save before 1.6, not a zip archive), which "
                         "cannot be memory-mapped: save it again in the current format, e.g. `python -c \"import torch;"
                         f" torch.save(torch.load('{path}', weights_only=True), 'new.bin')\"`, and replace it")
    try:  # mmap: the tensors stay on disk until they are used
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        raise corrupt(path, e) from None


def is_legacy_torch_file(path):
    """Whether `path` was written by torch.save's pre-1.6 format: a pickle that starts with torch's magic number."""
    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


# ------------------------------------------------------------------------------------------------ Meta directory

def read_meta(src):
    params = read_meta_params(src / "params.json")
    paths = sorted(src.glob("consolidated.*.pth"))
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if not paths or [p.name for p in paths] != expected:
        missing = sorted(set(expected) - {p.name for p in paths}) or [p.name for p in paths] or ["consolidated.00.pth"]
        raise ValueError(f"{src}: found {', '.join(p.name for p in paths) or 'no consolidated.NN.pth'}; "
                         f"{missing[0]} is missing or misnamed (shards are consolidated.00.pth, .01, ... without gaps)")
    shards = [load_torch(p) for p in paths]
    for path, shard in zip(paths[1:], shards[1:]):
        for name in shards[0].keys() | shard.keys():
            a, b = shards[0].get(name), shard.get(name)
            if a is None or b is None or a.shape != b.shape:
                raise ValueError(f"{src}: shards disagree on {name}: {None if a is None else tuple(a.shape)} in "
                                 f"{paths[0].name} but {None if b is None else tuple(b.shape)} in {path.name}")
    dim, state = params["dim"], {}
    for name in shards[0]:
        if name == "rope.freqs":  # Llama 1/2 saved their (unscaled) inverse frequencies
            continue
        parts = [shard[name] for shard in shards]
        if len(parts) == 1 or parts[0].dim() == 1:  # norms are replicated
            state[name] = parts[0]
        elif name == "tok_embeddings.weight":
            # Llama 1/2 split the embedding across its width (ParallelEmbedding), Llama 3 across the vocabulary
            # (VocabParallelEmbedding): a shard as wide as the model is a slice of the vocabulary
            state[name] = torch.cat(parts, dim=0 if parts[0].shape[1] == dim else 1)
        else:  # wo and w2 are row-parallel (split inputs), the rest column-parallel (split outputs)
            state[name] = torch.cat(parts, dim=1 if name.split(".")[-2] in ("wo", "w2") else 0)

    hidden_dim = int(2 * 4 * dim / 3)  # SwiGLU keeps the parameter count of a 4·dim MLP, rounded up
    if params.get("ffn_dim_multiplier"):
        hidden_dim = int(params["ffn_dim_multiplier"] * hidden_dim)
    multiple_of = params.get("multiple_of", 256)
    hidden_dim = multiple_of * -(-hidden_dim // multiple_of)
    tokenizer_model = next((p for p in (src / "tokenizer.model", src.parent / "tokenizer.model") if p.exists()), None)
    tok = Tokenizer.from_pretrained(tokenizer_model) if tokenizer_model else None
    vocab_size = params.get("vocab_size", -1)
    config = dict(
        dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"], head_dim=dim // params["n_heads"],
        hidden_dim=hidden_dim, vocab_size=state["tok_embeddings.weight"].shape[0] if vocab_size == -1 else vocab_size,
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
        max_position_embeddings=meta_context_length(params),
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192} if params.get("use_scaled_rope") else None,
        tie_word_embeddings="output.weight" not in state, bos_token_id=tok and tok.bos_id, eos_token_id=tok and tok.eos_id)

    def copy_tokenizer(out):
        if tokenizer_model:
            shutil.copy(tokenizer_model, out / "tokenizer.model")

    return config, state, copy_tokenizer


def read_meta_params(path):
    """Meta's params.json: dim, n_layers and n_heads (positive integers) must be there; the other settings it may
    hold must be numbers (or null) before they are computed with (llama_config checks their ranges later)."""
    params = read_json(path)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ValueError(f"{path} has no {key!r}: it is not a Llama params.json, or an incomplete one")
        if not isinstance(params[key], int) or isinstance(params[key], bool) or params[key] < 1:
            raise ValueError(f"{path}: {key} must be a positive integer (got {params[key]!r})")
    for key in ("n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or key == "multiple_of" and value < 1):
            raise ValueError(f"{path}: {key} must be a {'positive ' * (key == 'multiple_of')}number (got {value!r})")
    return params


def meta_context_length(params):
    """params.json does not record the trained context length: infer it from the Llama generation's settings
    (override with --max-position-embeddings)."""
    if params.get("use_scaled_rope"):
        return 131072  # Llama 3.1+: 128k, as its Hugging Face config says
    if params.get("rope_theta", 10000.0) >= 1e6:
        return 16384  # Code Llama
    if params.get("rope_theta", 10000.0) >= 5e5:
        return 8192  # Llama 3
    return 2048 if params.get("norm_eps") == 1e-6 else 4096  # Llama 1 : Llama 2


# --------------------------------------------------------------------------------------------------------- GGUF

def read_gguf(src):
    import gguf  # here, not at the top: only GGUF files need it (the GPU check's machine lacks it)

    try:
        reader = gguf.GGUFReader(src)
    except Exception as e:  # numpy/struct errors on a short or damaged file
        raise corrupt(src, e) from None

    def field(key, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    def f32(x):  # GGUF stores floats as float32: the shortest decimal that reads back the same (1e-05)
        return float(str(np.float32(x)))

    if (arch := field("general.architecture")) != "llama":
        raise ValueError(f"{src}: general.architecture is {arch!r}; only 'llama' GGUF files can be converted")
    state, rope_freqs = {}, None
    for t in reader.tensors:
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{src}: tensor {t.name}: {e} (try a newer gguf package)") from None
        # float32, copied only where it is not a writable float32 array already (F32 tensors are views of the file);
        # GGUF lists dimensions fastest first
        w = torch.from_numpy(np.require(w, np.float32, "W")).reshape(tuple(reversed(t.shape.tolist())))
        if t.name == "rope_freqs.weight":
            rope_freqs = w
        else:
            state[to_ours(t.name, GGUF_NAMES, GGUF_LAYERS) or t.name] = w

    for key in ("llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                "llama.feed_forward_length", "llama.context_length", "llama.attention.layer_norm_rms_epsilon"):
        if key not in reader.fields:
            raise ValueError(f"{src}: GGUF metadata {key} is missing")
    dim, n_heads = field("llama.embedding_length"), field("llama.attention.head_count")
    head_dim = field("llama.attention.key_length", dim // n_heads)
    if field("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{src}: partial rotary embeddings (llama.rope.dimension_count "
                         f"{field('llama.rope.dimension_count')} < head_dim {head_dim}) are not supported")
    rope_theta = f32(field("llama.rope.freq_base", 10000.0))
    scaling = None
    if field("llama.rope.scaling.type", "none") != "none":
        scaling = {"rope_type": field("llama.rope.scaling.type"), "factor": f32(field("llama.rope.scaling.factor"))}
        if field("llama.rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = field("llama.rope.scaling.original_context_length")
        if field("llama.rope.scaling.finetuned") is not None:
            scaling["finetuned"] = field("llama.rope.scaling.finetuned")
        for key in ("beta_fast", "beta_slow"):
            if f"llama.rope.scaling.yarn_{key}" in reader.fields:
                scaling[key] = f32(field(f"llama.rope.scaling.yarn_{key}"))
    elif rope_freqs is not None:
        scaling = llama3_scaling(rope_freqs, head_dim, rope_theta, src)
    config = dict(
        dim=dim, n_layers=field("llama.block_count"), n_heads=n_heads,
        n_kv_heads=field("llama.attention.head_count_kv", n_heads), head_dim=head_dim,
        hidden_dim=field("llama.feed_forward_length"),
        vocab_size=field("llama.vocab_size") or len(field("tokenizer.ggml.tokens", [])),
        norm_eps=f32(field("llama.attention.layer_norm_rms_epsilon")), rope_theta=rope_theta,
        max_position_embeddings=field("llama.context_length"), rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in state, bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"))
    return config, state, lambda out: Tokenizer.from_gguf(src).save_pretrained(out)


def llama3_scaling(rope_freqs, head_dim, rope_theta, src):
    """llama.cpp stores Llama 3.1's scaling as a tensor of per-pair divisors (rope_freqs), not as metadata: find the
    llama3 rope_scaling that gives them (Meta's constants: L = 8192, low/high_freq_factor 1/4; factor = the largest)."""
    scaling = {"rope_type": "llama3", "factor": rope_freqs.max().item(), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv_freq, _ = rope.rope_parameters(scaling, head_dim, rope_theta)
    if not torch.allclose(rope.inv_freq(head_dim, rope_theta) / rope_freqs, inv_freq, rtol=1e-5):
        raise ValueError(f"{src}: its rope_freqs tensor matches no llama3 rope scaling; it cannot be converted")
    return scaling


def permute(w, n_heads):
    """Meta's rotary layout -> Hugging Face's: in each head, rows (2i, 2i+1) become rows (i, i + D/2)."""
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------- ours -> Hugging Face

def hf_rope(cfg):
    """(rope_theta, rope_scaling, max_position_embeddings) with which transformers computes our rotation."""
    scaling, mpe = cfg.rope_scaling, cfg.max_position_embeddings
    kind = scaling and scaling["rope_type"]
    if kind is None:
        return cfg.rope_theta, None, mpe
    if kind == "ntk":  # transformers has no static NTK-aware scaling: it is plain RoPE with the changed base
        D = rope.rotary_dim(cfg.head_dim, cfg.partial_rotary_factor)
        return rope.ntk_base(cfg.rope_theta, scaling["factor"], D), None, mpe
    if kind == "linear":
        return cfg.rope_theta, {"rope_type": "linear", "factor": scaling["factor"]}, mpe
    if kind == "dynamic":  # transformers grows from max_position_embeddings where we grow from the original length
        return cfg.rope_theta, {"rope_type": "dynamic", "factor": scaling["factor"]}, cfg.original_max_position_embeddings
    if kind in ("yarn", "ntk-by-parts"):  # NTK-by-parts is YaRN without the attention temperature
        keys = ["factor", "original_max_position_embeddings"] + [k for k in rope.YARN_KEYS if k in scaling]
        out = {"rope_type": "yarn", **{k: scaling[k] for k in keys}}
        if kind == "ntk-by-parts":
            out["attention_factor"] = 1.0
        # some transformers versions derive the factor from max_position_embeddings / original: keep them equal
        return cfg.rope_theta, out, round(scaling["factor"] * cfg.original_max_position_embeddings)
    if kind == "llama3":
        return cfg.rope_theta, {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                **{k: v for k, v in scaling.items() if k != "finetuned"}}, mpe
    if kind == "longrope":  # with its factor written out; transformers 4.x derives it from mpe / L: keep them equal
        out = {k: v for k, v in scaling.items() if k != "finetuned"}
        return cfg.rope_theta, out, round(scaling["factor"] * scaling["original_max_position_embeddings"])
    raise ValueError(f"transformers has no {kind} RoPE scaling, so this checkpoint cannot be exported (dynamic-yarn "
                     "equals yarn up to the fine-tuned length: export a yarn checkpoint)")


def read_ours(src):
    """One of our checkpoint directories as the tensors and config.json of a Hugging Face model: LlamaForCausalLM,
    or the Llama-shaped class that computes what a flag adds: Qwen2ForCausalLM q/k/v biases, Phi3ForCausalLM (fused
    projections) partial rotary, which transformers' Llama lacks."""
    from safetensors.torch import load_file

    cfg = load_config(src)
    rope_theta, rope_scaling, max_position_embeddings = hf_rope(cfg)
    family = "phi3" if cfg.partial_rotary_factor < 1 else "qwen2" if cfg.qkv_bias else "llama"
    if family == "phi3" and (cfg.qkv_bias or rope_scaling and rope_scaling["rope_type"] != "longrope"):
        raise ValueError("transformers rotates part of each head (partial_rotary_factor) only in Phi3ForCausalLM, "
                         "which has no q/k/v biases and takes plain RoPE or longrope only: this checkpoint (qkv_bias "
                         f"{cfg.qkv_bias}, rope_type {rope_scaling and rope_scaling['rope_type']}) cannot be exported")
    try:
        state = {ours_to(name, HF_NAMES, HF_LAYERS): t for name, t in load_file(src / "model.safetensors").items()}
    except SafetensorError as e:
        raise corrupt(src / "model.safetensors", e) from None
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}[family]
    config = {
        "architectures": [architecture], "model_type": family, "hidden_act": "silu", "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": max_position_embeddings, "rope_theta": rope_theta,
        "rope_scaling": rope_scaling, "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "torch_dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}
    config.update({"llama": {"attention_bias": False, "mlp_bias": False}, "qwen2": {"use_sliding_window": False},
                   # Phi3Config's default pad id, 32000, may lie past the vocabulary
                   "phi3": {"partial_rotary_factor": cfg.partial_rotary_factor, "sliding_window": None,
                            "pad_token_id": None}}[family])
    if rope_scaling and rope_scaling["rope_type"] == "longrope":  # where transformers 4.x and Phi3Config read L
        config["original_max_position_embeddings"] = rope_scaling["original_max_position_embeddings"]
    if family == "phi3":
        for fused, parts in PHI3_FUSED.items():
            for name in [name for name in state if name.endswith(f"{parts[0]}.weight")]:
                state[name.replace(parts[0], fused)] = torch.cat([state.pop(name.replace(parts[0], p)) for p in parts])

    def copy_tokenizer(out):  # as they are: transformers reads a SentencePiece tokenizer.model, not a tiktoken one
        for f in src.iterdir():
            if f.is_file() and f.name not in ("config.json", "model.safetensors") and not f.name.startswith("."):
                shutil.copy2(f, out / f.name)

    return config, state, copy_tokenizer


# ------------------------------------------------------------------------------------------------------ convert

def detect(src):
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if src.is_dir():
        if (src / "config.json").exists():
            return ("ours" if "n_layers" in read_json(src / "config.json") else "hf"), src
        if (src / "params.json").exists():
            return "meta", src
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) > 1:
            raise ValueError(f"{src} holds several .gguf files ({ggufs[0].name}, {ggufs[1].name}, ...): pass one")
        if ggufs:
            return "gguf", ggufs[0]
    elif src.suffix == ".gguf":
        return "gguf", src
    raise ValueError(f"{src} is not a checkpoint this script knows: give a Hugging Face directory (config.json), "
                     f"a Meta directory (params.json + consolidated.NN.pth) or a .gguf file")


def convert(src, out, force=False, dtype=None, max_position_embeddings=None):
    """Convert the checkpoint at `src` into the directory `out` (see the module docstring); returns out.
    dtype: "float32" or "bfloat16" to cast every tensor (default: keep the source's, fp32 for GGUF)."""
    fmt, src = detect(Path(src))
    out = Path(out)
    if is_within(out, src) or is_within(src, out):
        raise ValueError(f"{out} and {src} overlap: write the conversion outside its source")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if fmt == "ours" and max_position_embeddings:
        raise ValueError("--max-position-embeddings is for conversions into this project's format")
    if fmt == "meta":  # its tokenizer.model may lie next to the folder
        check_not_an_input(out, "OUT", [("SRC's tokenizer", src.parent / "tokenizer.model")])
    config, state, copy_tokenizer = {"hf": read_hf, "meta": read_meta, "gguf": read_gguf, "ours": read_ours}[fmt](src)
    check_finite(state, src)
    if dtype:
        state = {name: w.to(DTYPES[dtype]) for name, w in state.items()}

    def write(tmp):
        if fmt == "ours":
            save_weights(state, tmp / "model.safetensors", {"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        else:
            checked = checked_config(config, state, src, fmt, max_position_embeddings)
            for name in state if fmt != "hf" else ():  # Meta and GGUF store q and k in Meta's rotary layout
                if name.endswith(("wq.weight", "wk.weight")):  # k has n_kv_heads heads (GQA)
                    state[name] = permute(state[name], checked.n_heads if "wq" in name else checked.n_kv_heads)
            save_weights(state, tmp / "model.safetensors", layout(checked))
            (tmp / "config.json").write_text(json.dumps({**dataclasses.asdict(checked), "source": f"{fmt}:{src.name}"},
                                                        indent=2) + "\n")
        copy_tokenizer(tmp)

    return write_dir_atomic(out, write, force)


def checked_config(config, state, src, fmt, max_position_embeddings):
    """LlamaConfig of a source's settings, and its tensors checked against it; errors name the source."""
    where = {"hf": src / "config.json", "meta": src / "params.json"}.get(fmt, src)
    try:
        cfg = llama_config({**config, **({"max_position_embeddings": max_position_embeddings}
                                         if max_position_embeddings else {})})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    check_weights(cfg, {name: w.shape for name, w in state.items()}, src)
    return cfg


def default_checkpoint(path=DEFAULT_CHECKPOINT):
    """The default checkpoint directory (SmolLM2-135M), converted from its GGUF (fetched by assets.py) when absent."""
    path = Path(path)
    if not (path / "config.json").exists():
        source = assets.smollm2_gguf()
        print(f"converting {source.name} -> {path}")
        convert(source, path)
    return path


def main(argv=None):
    parser = ArgumentParser(__file__, __doc__)
    parser.add_argument("src", type=Path, help="Hugging Face, Meta or our checkpoint directory, or a .gguf file")
    parser.add_argument("out", type=Path, help="directory to write (must not exist, or be empty)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it holds something")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: keep the source's dtype; "
                                                               "GGUF is dequantized to float32)")
    parser.add_argument("--max-position-embeddings", type=number(int, min=1),
                        help="the context length the model is meant to run at; Meta's params.json does not record it "
                             "(default: inferred, e.g. 4096 for Llama 2)")
    args = parser.parse_args(argv)
    out = convert(args.src, args.out, args.force, args.dtype, args.max_position_embeddings)
    config = read_json(out / "config.json")
    if "n_layers" in config:
        print(f"wrote {out}: {config['n_layers']} layers, dim {config['dim']}, vocab {config['vocab_size']}, "
              f"rope_scaling {config['rope_scaling']}")
    else:
        print(f"wrote {out} for Hugging Face transformers: rope_theta {config['rope_theta']}, rope_scaling "
              f"{config['rope_scaling']}, max_position_embeddings {config['max_position_embeddings']}")


if __name__ == "__main__":
    cli(main)
