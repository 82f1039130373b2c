"""Convert a Llama checkpoint (Hugging Face, Meta or GGUF) into this project's checkpoint directory.

    python convert_llama.py path/to/Llama-2-7b-hf checkpoints/llama-2-7b         # config.json + *.safetensors/*.bin
    python convert_llama.py path/to/llama-2-13b checkpoints/llama-2-13b          # params.json + consolidated.NN.pth
    python convert_llama.py SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/smollm2  # llama.cpp GGUF, dequantized

The format is detected from SRC. OUT gets config.json (see model.LlamaConfig), model.safetensors and the tokenizer
files; it is written into a temporary directory next to OUT and renamed at the end, so OUT is complete or absent.
Our rotary layout is Hugging Face's "halves" layout, so HF weights go in as they are, while Meta and GGUF q/k
weights are permuted from Meta's adjacent-pairs layout (SPEC §3): in `permute`, and nowhere else in the project.
Tensors keep the source dtype (GGUF: dequantized to fp32) unless --dtype says otherwise.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import rope

HF_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json")
HF_NAMES = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output",
            "input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
            "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
            "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1",
            "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3"}
GGUF_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
              "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
              "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
              "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def corrupt(path, e):
    return ValueError(f"{path} is truncated or corrupt: {' '.join(str(e).split())}")


def parse_rope_scaling(scaling, path):
    try:
        return rope.parse_rope_scaling(scaling)
    except ValueError as e:
        raise ValueError(f"{path}: rope scaling {scaling}: {e}") from None


def rename(name, table, layer_prefix):
    """Map a source tensor name to ours through `table`, e.g. model.layers.3.mlp.up_proj.weight ->
    layers.3.feed_forward.w3.weight; None for a name that is not in the table."""
    stem, suffix = name.rsplit(".", 1)
    if stem.startswith(layer_prefix):
        i, _, part = stem.removeprefix(layer_prefix).partition(".")
        return f"layers.{i}.{table[part]}.{suffix}" if part in table and i.isdigit() else None
    return f"{table[stem]}.{suffix}" if stem in table else None


# ---------------------------------------------------------------------------------------- Hugging Face directory


def read_hf(src):
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") not in ("llama", "mistral"):  # Mistral's sliding window is dropped, as the paper does
        hint = " (is this already a converted checkpoint?)" if "n_layers" in cfg else ""
        raise ValueError(f"{src / 'config.json'}: model_type {cfg.get('model_type')!r} is not supported "
                         f"(only llama and mistral){hint}")
    # transformers 5.x keeps rope_theta and the scaling in `rope_parameters`, 4.x has `rope_theta` + `rope_scaling`
    params = dict(cfg.get("rope_parameters") or {})
    rope_theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = params or cfg.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) != "default" \
            and not scaling.get("original_max_position_embeddings"):
        # transformers' fallback: the pre-training length is max_position_embeddings (`dynamic` grows from it)
        scaling = {**scaling, "original_max_position_embeddings":
                   cfg.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 2048)}
    eos = cfg.get("eos_token_id")  # Llama 3.1 lists three: keep the first, <|end_of_text|>
    config = dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        hidden_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta, max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rope_scaling=parse_rope_scaling(scaling, src / "config.json"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos)

    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index).exists():
            files = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            break
        if (src / single).exists():
            files = [single]
            break
    else:
        raise ValueError(f"{src} has config.json but no weights (model.safetensors, model.safetensors.index.json "
                         f"or pytorch_model.bin)")
    state = {}
    for file in files:
        if not (src / file).exists():
            raise ValueError(f"{src / file} is missing (listed in {src}'s index.json): download every shard")
        for name, tensor in load_weights(src / file):
            ours = rename(name, HF_NAMES, "model.layers.")
            if name.endswith("rotary_emb.inv_freq") or ours == "output.weight" and config["tie_word_embeddings"]:
                continue  # a buffer older checkpoints saved / a copy of the tied embedding
            state[ours or name] = tensor

    def tokenizer(out):
        for name in HF_TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy(src / name, out / name)
        if not (src / "tokenizer.model").exists() and (src / "original" / "tokenizer.model").exists():
            shutil.copy(src / "original" / "tokenizer.model", out / "tokenizer.model")  # Llama 3 repos keep it there

    return config, state, tokenizer


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
    try:  # mmap: the tensors stay on disk until they are used
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        raise corrupt(path, e) from None


# ------------------------------------------------------------------------------------------------ Meta directory


def read_meta(src):
    params = json.loads((src / "params.json").read_text())
    paths = sorted(src.glob("consolidated.*.pth"))
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if not paths or [p.name for p in paths] != expected:
        missing = sorted(set(expected) - {p.name for p in paths}) or [p.name for p in paths]
        raise ValueError(f"{src}: found {', '.join(p.name for p in paths) or 'no consolidated.NN.pth'}; "
                         f"{missing[0]} is missing or misnamed (shards are consolidated.00.pth, .01, ... without gaps)")
    shards = [load_torch(p) for p in paths]
    for path, shard in zip(paths[1:], shards[1:]):
        for name in shards[0].keys() | shard.keys():
            a, b = shards[0].get(name), shard.get(name)
            if a is None or b is None or a.shape != b.shape:
                raise ValueError(f"{src}: shards disagree on {name}: {None if a is None else tuple(a.shape)} in "
                                 f"{paths[0].name} but {None if b is None else tuple(b.shape)} in {path.name}")

    dim = params["dim"]
    state = {}
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
    bos, eos = None, None
    if tokenizer_model:
        import tokenizer

        tok = tokenizer.Tokenizer.from_pretrained(tokenizer_model)
        bos, eos = tok.bos_id, tok.eos_id
    vocab_size = params.get("vocab_size", -1)
    config = dict(
        dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"], head_dim=dim // params["n_heads"],
        hidden_dim=hidden_dim, vocab_size=state["tok_embeddings.weight"].shape[0] if vocab_size == -1 else vocab_size,
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
        max_position_embeddings=meta_context_length(params),
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192} if params.get("use_scaled_rope") else None,
        tie_word_embeddings="output.weight" not in state, bos_token_id=bos, eos_token_id=eos)

    def copy_tokenizer(out):
        if tokenizer_model:
            shutil.copy(tokenizer_model, out / "tokenizer.model")

    return config, state, copy_tokenizer


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
            state[rename(t.name, GGUF_NAMES, "blk.") or t.name] = w

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
        max_position_embeddings=field("llama.context_length"), rope_scaling=parse_rope_scaling(scaling, src),
        tie_word_embeddings="output.weight" not in state, bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"))

    def tokenizer(out):
        import tokenizer

        tokenizer.Tokenizer.from_gguf(src).save_pretrained(out)

    return config, state, tokenizer


def llama3_scaling(rope_freqs, head_dim, rope_theta, src):
    """llama.cpp stores Llama 3.1's scaling as a tensor of per-pair divisors (rope_freqs), not as metadata: find the
    llama3 rope_scaling that gives them (Meta's constants: L = 8192, low/high_freq_factor 1/4; factor = the largest)."""
    scaling = {"rope_type": "llama3", "factor": rope_freqs.max().item(), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv_freq, _ = rope.rope_parameters(scaling, head_dim, rope_theta)
    if not torch.allclose(rope.theta(head_dim, rope_theta) / rope_freqs, inv_freq, rtol=1e-5):
        raise ValueError(f"{src}: its rope_freqs tensor matches no llama3 rope scaling; it cannot be converted")
    return scaling


# ------------------------------------------------------------------------------------------------------ convert


def expected_shapes(c):
    d, q, kv, f, v = c["dim"], c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"], c["hidden_dim"], \
        c["vocab_size"]
    shapes = {"tok_embeddings.weight": (v, d), "norm.weight": (d,)}
    if not c["tie_word_embeddings"]:
        shapes["output.weight"] = (v, d)
    for i in range(c["n_layers"]):
        shapes.update({f"layers.{i}.{name}.weight": shape for name, shape in [
            ("attention_norm", (d,)), ("attention.wq", (q, d)), ("attention.wk", (kv, d)), ("attention.wv", (kv, d)),
            ("attention.wo", (d, q)), ("ffn_norm", (d,)), ("feed_forward.w1", (f, d)),
            ("feed_forward.w2", (d, f)), ("feed_forward.w3", (f, d))]})
    return shapes


def check_shapes(config, state, src):
    """Every tensor must have the shape the config implies: name the first that does not."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{src}: tensor {name} is missing (the config has {config['n_layers']} layers, "
                             f"tie_word_embeddings={config['tie_word_embeddings']})")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{src}: {name} has shape {tuple(state[name].shape)} but the config implies {shape} "
                             f"(dim {config['dim']}, {config['n_heads']} heads, {config['n_kv_heads']} kv heads, "
                             f"head_dim {config['head_dim']}, hidden_dim {config['hidden_dim']}, "
                             f"vocab_size {config['vocab_size']})")
    if extra := sorted(state.keys() - expected.keys()):
        raise ValueError(f"{src}: unexpected tensor {extra[0]} (not part of a Llama with this config)")
    if config["n_heads"] % config["n_kv_heads"]:
        raise ValueError(f"{src}: n_heads {config['n_heads']} is not a multiple of n_kv_heads {config['n_kv_heads']}")


def permute(w, n_heads):
    """Meta's rotary layout -> Hugging Face's (SPEC §3): in each head, rows (2i, 2i+1) become rows (i, i + D/2)."""
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def detect(src):
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if src.is_dir():
        if (src / "config.json").exists():
            return "hf", src
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
    """Convert the checkpoint at `src` into the checkpoint directory `out` (see the module docstring); returns out.
    dtype: "float32" or "bfloat16" to cast every tensor (default: keep the source's, fp32 for GGUF)."""
    fmt, src = detect(Path(src))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ValueError(f"{out} already exists and is not empty: pass --force (force=True) to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if fmt == "hf":
        config, state, write_tokenizer = read_hf(src)
    elif fmt == "meta":
        config, state, write_tokenizer = read_meta(src)
    else:
        config, state, write_tokenizer = read_gguf(src)
    if max_position_embeddings:
        config["max_position_embeddings"] = max_position_embeddings
    check_shapes(config, state, src)
    if fmt != "hf":  # Meta and GGUF store q and k in Meta's rotary layout; k has n_kv_heads heads (GQA)
        for name in state:
            if name.endswith(("wq.weight", "wk.weight")):
                state[name] = permute(state[name], config["n_heads" if "wq" in name else "n_kv_heads"])
    if dtype:
        state = {name: w.to(DTYPES[dtype]) for name, w in state.items()}
    config["source"] = f"{fmt}:{src.name}"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.")), None
    try:
        save_file({name: w.contiguous() for name, w in state.items()}, tmp / "model.safetensors")
        del state
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer(tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp (and safetensors) create private files; keep the umask-free modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):  # --force: move the old OUT aside first
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="Hugging Face or Meta checkpoint directory, or a .gguf file")
    parser.add_argument("out", type=Path, help="checkpoint directory to write (must not exist, or be empty)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: keep the source's dtype; "
                                                               "GGUF is dequantized to float32)")
    parser.add_argument("--max-position-embeddings", type=int, help="the context length the model is meant to run "
                        "at; Meta's params.json does not record it (default: inferred, e.g. 4096 for Llama 2)")
    args = parser.parse_args()
    out = convert(args.src, args.out, args.force, args.dtype, args.max_position_embeddings)
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {out}: {config['n_layers']} layers, dim {config['dim']}, vocab {config['vocab_size']}, "
          f"rope_scaling {config['rope_scaling']}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"convert_llama.py: error: {e}")
