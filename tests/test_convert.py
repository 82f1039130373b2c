"""convert_llama.py on tiny checkpoints the tests write: Hugging Face (safetensors, sharded, .bin; both config.json
shapes), Meta (2 model-parallel shards, Llama 2 and Llama 3 layouts), GGUF, and back to Hugging Face, checked
against transformers; and every kind of bad input."""
import json
import socket
import subprocess
import sys

import gguf
import pytest
import torch

from tools import assets
from conftest import ROOT, hf_state_in_our_names, load_ours, one_error_line, run_script, snapshot, tiny_llama, write_hf_llama
from convert_llama import convert
from checkpoint import load_model, save_model

VOCAB = 320
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def assert_same_tensors(got, expected):
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), f"{name}: max abs diff " \
            f"{(got[name].float() - expected[name].float()).abs().max().item()}"


def assert_same_logits(out, hf, atol=1e-4):
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (load_model(out)(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= atol, f"max abs logit difference {diff}"


def to_pairs(w, n_heads):
    """HF's halves layout -> Meta's adjacent-pairs layout, the inverse of the converter's permutation."""
    return w.view(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("weights, n_kv_heads, tie", [("safetensors", 4, False), ("safetensors", 2, True),
                                                      ("sharded", 2, False), ("bin", 4, True)],
                         ids=["safetensors-mha-untied", "safetensors-gqa-tied", "sharded-gqa-untied", "bin-mha-tied"])
def test_hf_checkpoint_converts_to_the_same_tensors_and_logits(tmp_path, weights, n_kv_heads, tie):
    src = tmp_path / "hf"
    hf = write_hf_llama(src, n_kv_heads=n_kv_heads, tie=tie, vocab_size=VOCAB)
    if weights == "sharded":
        (src / "model.safetensors").unlink()
        hf.save_pretrained(src, max_shard_size="40KB")
        assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 3
    if weights == "bin":  # as transformers 4.x wrote it (safe_serialization=False), with Llama 2's inv_freq buffers
        (src / "model.safetensors").unlink()
        state = dict(hf.state_dict())
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        torch.save(state, src / "pytorch_model.bin")
    (src / "tokenizer.model").write_bytes(b"copied as is")
    convert(src, tmp_path / "ours")

    state, config = load_ours(tmp_path / "ours")
    assert_same_tensors(state, hf_state_in_our_names(hf))
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == b"copied as is"
    assert config == {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": n_kv_heads, "head_dim": 16,
                      "hidden_dim": 96, "vocab_size": VOCAB, "norm_eps": 1e-5, "rope_theta": 10000.0,
                      "max_position_embeddings": 64, "rope_scaling": None, "partial_rotary_factor": 1.0,
                      "qkv_bias": False, "tie_word_embeddings": tie,
                      "bos_token_id": hf.config.bos_token_id, "eos_token_id": hf.config.eos_token_id,
                      "source": "hf:hf"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    assert_same_logits(tmp_path / "ours", hf)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny GQA, untied HF checkpoint (plain RoPE) and its model; tests copy it before editing it."""
    path = tmp_path_factory.mktemp("tiny") / "hf"
    return path, write_hf_llama(path, vocab_size=VOCAB)


def copy_hf(tiny_hf, dest, **edits):
    """Copy the tiny HF checkpoint to dest, with config.json keys replaced (None deletes a key)."""
    dest.mkdir(parents=True)
    for f in tiny_hf[0].iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    raw = json.loads((dest / "config.json").read_text())
    raw.update(edits)
    (dest / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return dest


YARN_4X = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096, "finetuned": True}
CONFIG_SHAPES = {  # config.json edits -> (our rope_theta, rope_scaling, max_position_embeddings)
    "4.x-yarn-finetuned": ({"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": YARN_4X,
                            "max_position_embeddings": 65536},
                           (10000.0, {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
                                      "finetuned": True}, 65536)),
    "4.x-llama3.1": ({"rope_parameters": None, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                      "rope_scaling": {**LLAMA3_ROPE, "rope_type": "llama3"}},
                     (500000.0, LLAMA3_ROPE, 131072)),
    "4.x-no-scaling": ({"rope_parameters": None, "rope_theta": 1e6, "rope_scaling": None}, (1e6, None, 64)),
    "5.x-yarn": ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 64}, "max_position_embeddings": 256},
                 (10000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256)),
    "5.x-default": ({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}, (100000.0, None, 64)),
    # transformers' fallback: `dynamic` (and a yarn config without it) grows from max_position_embeddings
    "5.x-dynamic-without-original": ({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "dynamic",
                                                          "factor": 2.0}},
                                     (10000.0, {"rope_type": "dynamic", "factor": 2.0,
                                                "original_max_position_embeddings": 64}, 64)),
}


@pytest.mark.parametrize("shape", CONFIG_SHAPES)
def test_both_config_json_shapes_give_our_rope_settings(tmp_path, tiny_hf, shape):
    edits, (rope_theta, rope_scaling, max_position_embeddings) = CONFIG_SHAPES[shape]
    convert(copy_hf(tiny_hf, tmp_path / "hf", **edits), tmp_path / "ours")
    _, config = load_ours(tmp_path / "ours")
    assert config["rope_theta"] == rope_theta
    assert config["rope_scaling"] == rope_scaling
    assert config["max_position_embeddings"] == max_position_embeddings


def test_head_dim_from_config_and_dtype_cast(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # head_dim 32 != hidden 64 / 4 heads, as in some newer Llama-architecture models
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours")
    state, config = load_ours(tmp_path / "ours")
    assert config["head_dim"] == 32 and state["layers.0.attention.wq.weight"].shape == (128, 64)
    assert_same_logits(tmp_path / "ours", hf)
    convert(tmp_path / "hf", tmp_path / "bf16", dtype="bfloat16")
    state, _ = load_ours(tmp_path / "bf16")
    expected = {k: v.to(torch.bfloat16) for k, v in hf_state_in_our_names(hf).items()}
    assert_same_tensors(state, expected)


def test_existing_output_is_kept_unless_forced(tmp_path, tiny_hf):
    out = tmp_path / "ours"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        convert(tiny_hf[0], out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(tiny_hf[0], out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]


# ------------------------------------------------------------------------------------------------------- Meta


def write_meta(hf, path, layout, n_shards=2, tokenizer_model=None, **params):
    """Save `hf` as Meta's reference code did: params.json and consolidated.NN.pth model-parallel shards, q/k in the
    adjacent-pairs layout; tok_embeddings split across its width (Llama 1/2) or its vocabulary (Llama 3)."""
    cfg = hf.config
    state = hf_state_in_our_names(hf)
    for i in range(cfg.num_hidden_layers):
        state[f"layers.{i}.attention.wq.weight"] = to_pairs(state[f"layers.{i}.attention.wq.weight"],
                                                            cfg.num_attention_heads)
        state[f"layers.{i}.attention.wk.weight"] = to_pairs(state[f"layers.{i}.attention.wk.weight"],
                                                            cfg.num_key_value_heads)
    shards = [{} for _ in range(n_shards)]
    for name, w in state.items():
        if w.dim() == 1:
            parts = [w] * n_shards
        elif name == "tok_embeddings.weight":
            parts = w.chunk(n_shards, dim=0 if layout == "llama3" else 1)
        else:
            parts = w.chunk(n_shards, dim=1 if name.split(".")[-2] in ("wo", "w2") else 0)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    path.mkdir()
    for i, shard in enumerate(shards):
        if layout == "llama2":
            shard["rope.freqs"] = torch.ones(cfg.head_dim // 2)  # Llama 1/2 shards carry their inverse frequencies
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    (path / "params.json").write_text(json.dumps(
        {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
         "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps, **params}))
    if tokenizer_model:
        (path / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    return path


META = {  # layout -> (HF model, params.json extras, tokenizer, our bos/eos, max_position_embeddings, rope_scaling)
    # Llama 2 13B-like: MHA, untied, vocab_size -1 ("take it from the weights"); intermediate 96 = 32·⌈int(0.5·170)/32⌉
    "llama2": (dict(n_kv_heads=4, tie=False), {"vocab_size": -1, "multiple_of": 32, "ffn_dim_multiplier": 0.5,
                                               "rope_theta": 10000.0},
               ("mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1"), (1, 2), 4096, None),
    # Llama 3.1/3.2-like: GQA, tied, scaled rope, tiktoken tokenizer.model; 96 = 16·⌈int(0.5625·170)/16⌉
    "llama3": (dict(n_kv_heads=2, tie=True, rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE},
                    max_position_embeddings=131072),
               {"vocab_size": VOCAB, "multiple_of": 16, "ffn_dim_multiplier": 0.5625, "rope_theta": 500000.0,
                "use_scaled_rope": True},
               ("llama-models", "0.3.0", "llama_models/llama3/tokenizer.model"), (128000, 128001), 131072,
               LLAMA3_ROPE),
}


@pytest.mark.parametrize("layout", META)
def test_meta_shards_merge_to_the_unsharded_model(tmp_path, layout):
    hf_args, params, tokenizer_file, (bos, eos), max_position_embeddings, rope_scaling = META[layout]
    hf = write_hf_llama(tmp_path / "hf", vocab_size=VOCAB, **hf_args)
    src = write_meta(hf, tmp_path / "meta", layout, tokenizer_model=assets.fetch_file(*tokenizer_file), **params)
    assert torch.load(src / "consolidated.01.pth")["tok_embeddings.weight"].shape == \
        ((VOCAB // 2, 64) if layout == "llama3" else (VOCAB, 32))
    convert(src, tmp_path / "ours")
    convert(tmp_path / "hf", tmp_path / "from-hf")

    state, config = load_ours(tmp_path / "ours")
    assert_same_tensors(state, load_ours(tmp_path / "from-hf")[0])
    assert config["hidden_dim"] == 96 and config["vocab_size"] == VOCAB
    assert config["tie_word_embeddings"] == hf_args["tie"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (bos, eos)
    assert config["max_position_embeddings"] == max_position_embeddings
    assert config["rope_scaling"] == rope_scaling
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert_same_logits(tmp_path / "ours", hf)


# ------------------------------------------------------------------------------------------------------- GGUF


def gpt2_vocabulary():
    """VOCAB token strings of a byte-level BPE vocabulary: GPT-2's 256 byte characters, then 64 two-letter merges."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    return [chars[b] for b in range(256)] + [a + b for a in "abcdefgh" for b in "abcdefgh"]


GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


def write_gguf(hf, path, arch="llama", quantize=(), rope_scaling=None, rope_freqs=None):
    """Save `hf` as llama.cpp's convert_hf_to_gguf.py does: F32 tensors (those named in `quantize` as Q8_0), q/k in
    the adjacent-pairs layout, llama.* metadata and a byte-level BPE vocabulary."""
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling["rope_type"]))
        w.add_rope_scaling_factor(rope_scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(rope_scaling["original_max_position_embeddings"])
        w.add_rope_scaling_finetuned(True)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(gpt2_vocabulary())
    w.add_token_types([1] * VOCAB)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in hf_state_in_our_names(hf).items():
        if name.endswith(("wq.weight", "wk.weight")):
            t = to_pairs(t, cfg.num_attention_heads if "wq" in name else cfg.num_key_value_heads)
        stem = name.removesuffix(".weight")
        gguf_name = f"blk.{stem.split('.')[1]}.{GGUF_NAMES[stem.split('.', 2)[2]]}.weight" \
            if stem.startswith("layers.") else f"{GGUF_NAMES[stem]}.weight"
        if gguf_name in quantize:
            q = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name, t.numpy())
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_converts_to_the_same_tensors_as_transformers_gguf_loader(tmp_path):
    from transformers import LlamaForCausalLM

    hf = write_hf_llama(tmp_path / "hf", n_kv_heads=2, tie=False, vocab_size=VOCAB)
    quantized = ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight", "output.weight")
    write_gguf(hf, tmp_path / "tiny.gguf", quantize=quantized)
    convert(tmp_path / "tiny.gguf", tmp_path / "ours")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()

    state, config = load_ours(tmp_path / "ours")
    assert_same_tensors(state, hf_state_in_our_names(loaded))
    source = hf_state_in_our_names(hf)  # F32 tensors come back unchanged, Q8_0 ones within half an 8-bit step
    for name, w in state.items():
        if name in ("layers.0.attention.wq.weight", "layers.1.attention.wk.weight", "layers.0.feed_forward.w2.weight",
                    "output.weight"):
            assert (w - source[name]).abs().max() <= source[name].abs().max() / 254, name
        else:
            assert torch.equal(w, source[name]), name
    assert config["tie_word_embeddings"] is False and config["n_kv_heads"] == 2
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert (tmp_path / "ours" / "tokenizer.model").exists()
    assert_same_logits(tmp_path / "ours", loaded, atol=1e-4)


@pytest.mark.parametrize("scaling", ["yarn", "llama3-rope_freqs"])
def test_gguf_rope_scaling_gives_the_same_logits(tmp_path, scaling):
    import rope

    if scaling == "yarn":
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
        hf = write_hf_llama(tmp_path / "hf", tie=True, vocab_size=VOCAB, rope_parameters=yarn)
        write_gguf(hf, tmp_path / "tiny.gguf", rope_scaling=yarn)
        expected = {**yarn, "finetuned": True}
    else:  # llama.cpp stores Llama 3.1's scaling as a tensor of per-pair divisors θ_i / inv_freq_i, no metadata
        hf = write_hf_llama(tmp_path / "hf", tie=True, vocab_size=VOCAB, max_position_embeddings=131072,
                            rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})
        inv_freq, _ = rope.llama3(LLAMA3_ROPE, 16, 500000.0, 0)
        write_gguf(hf, tmp_path / "tiny.gguf", rope_freqs=rope.inv_freq(16, 500000.0) / inv_freq)
        expected = LLAMA3_ROPE
    convert(tmp_path / "tiny.gguf", tmp_path / "ours")
    assert load_ours(tmp_path / "ours")[1]["rope_scaling"] == expected
    assert_same_logits(tmp_path / "ours", hf)


# ------------------------------------------------------------------------------------------- ours -> Hugging Face


@pytest.mark.parametrize("rope_scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "ntk", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "ntk-by-parts", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 16},
], ids=lambda s: s["rope_type"] if s else "default")
def test_export_to_hugging_face_gives_the_same_logits_in_transformers(tmp_path, rope_scaling):
    from transformers import AutoModelForCausalLM

    save_model(tiny_llama(rope_scaling, vocab_size=VOCAB, max_position_embeddings=64), tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer.model").write_bytes(b"copied as is")
    convert(tmp_path / "ours", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"copied as is"
    tokens = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(tmp_path / "ours")(tokens)
        assert (hf(tokens).logits - ours).abs().max() <= 1e-4
        if rope_scaling:  # so that the scaling is part of what was compared
            plain = load_model(tmp_path / "ours", rope_scaling={"rope_type": "default"})(tokens)
            assert (plain - ours).abs().max() > 1e-3


def test_export_refuses_a_non_empty_out_and_its_own_source(tmp_path):
    save_model(tiny_llama(vocab_size=VOCAB), tmp_path / "ours")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="already exists and is not empty: pass --force"):
        convert(tmp_path / "ours", tmp_path / "hf")
    for out in (tmp_path / "ours", tmp_path / "ours" / "hf", tmp_path):
        with pytest.raises(ValueError, match="overlap"):
            convert(tmp_path / "ours", out, force=True)
    assert snapshot(tmp_path) == before


def test_export_of_a_variant_transformers_lacks_is_a_clear_error(tmp_path):
    scaling = {"rope_type": "dynamic-yarn", "factor": 2.0, "original_max_position_embeddings": 16}
    save_model(tiny_llama(scaling, vocab_size=VOCAB), tmp_path / "ours")
    with pytest.raises(ValueError, match="transformers has no dynamic-yarn RoPE scaling"):
        convert(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------- bad inputs


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_hf):
    """One small source of every format, written once: tests copy what they damage."""
    root = tmp_path_factory.mktemp("sources")
    hf = tiny_hf[1]
    write_meta(hf, root / "meta", "llama2", vocab_size=VOCAB, multiple_of=32, ffn_dim_multiplier=0.5)
    write_gguf(hf, root / "tiny.gguf")
    write_gguf(hf, root / "gpt2.gguf", arch="gpt2")
    return {"hf": tiny_hf[0], "meta": root / "meta", "gguf": root / "tiny.gguf", "gpt2": root / "gpt2.gguf"}


def copy_tree(src, dest):
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def damage(case, sources, tiny_hf, tmp):
    """Make the bad input `case` in tmp; return (SRC, words the one-line error must contain)."""
    if case == "missing-path":
        return tmp / "nowhere", ["nowhere", "does not exist"]
    if case == "unknown-format":
        (tmp / "weights.npz").write_bytes(b"x")
        return tmp, ["config.json", "params.json", ".gguf"]
    if case == "truncated-safetensors":
        src = copy_hf(tiny_hf, tmp / "hf")
        truncate(src / "model.safetensors")
        return src, ["model.safetensors", "truncated or corrupt"]
    if case == "truncated-pth":
        src = copy_tree(sources["meta"], tmp / "meta")
        truncate(src / "consolidated.01.pth")
        return src, ["consolidated.01.pth", "truncated or corrupt"]
    if case == "truncated-gguf":
        (tmp / "cut.gguf").write_bytes(sources["gguf"].read_bytes()[:60_000])
        return tmp / "cut.gguf", ["cut.gguf", "truncated or corrupt"]
    if case == "bad-json":
        src = copy_hf(tiny_hf, tmp / "hf")
        truncate(src / "config.json")
        return src, ["config.json is not valid JSON"]
    if case == "config-without-a-key":
        return copy_hf(tiny_hf, tmp / "hf", intermediate_size=None), ["config.json has no 'intermediate_size'"]
    if case == "config-number-as-string":
        return copy_hf(tiny_hf, tmp / "hf", num_hidden_layers="2"), ["n_layers must be a positive integer (got '2')"]
    if case == "config-does-not-match-weights":
        return copy_hf(tiny_hf, tmp / "hf", hidden_size=128), \
            ["tok_embeddings.weight has shape (320, 64) but the config implies (320, 128)"]
    if case == "config-more-layers-than-weights":
        return copy_hf(tiny_hf, tmp / "hf", num_hidden_layers=3), ["layers.2.attention_norm.weight is missing"]
    if case == "unsupported-activation":
        return copy_hf(tiny_hf, tmp / "hf", hidden_act="gelu"), ["hidden_act 'gelu' is not supported"]
    if case == "meta-missing-shard":
        src = copy_tree(sources["meta"], tmp / "meta")
        (src / "consolidated.01.pth").rename(src / "consolidated.02.pth")
        return src, ["consolidated.01.pth is missing"]
    if case == "meta-only-one-of-two-shards":
        src = copy_tree(sources["meta"], tmp / "meta")
        (src / "consolidated.01.pth").unlink()
        return src, ["has shape", "but the config implies"]
    if case == "meta-shards-disagree":
        src = copy_tree(sources["meta"], tmp / "meta")
        shard = torch.load(src / "consolidated.01.pth")
        shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :40].clone()
        torch.save(shard, src / "consolidated.01.pth")
        return src, ["shards disagree on layers.1.feed_forward.w2.weight", "(64, 48)", "(64, 40)"]
    if case == "gguf-unknown-architecture":
        return sources["gpt2"], ["general.architecture is 'gpt2'"]
    if case == "unknown-rope-type":
        return copy_hf(tiny_hf, tmp / "hf", rope_parameters={"rope_theta": 1e4, "rope_type": "proportional"}), \
            ["unknown rope_type 'proportional'"]
    if case == "rope-factor-below-1":
        return copy_hf(tiny_hf, tmp / "hf", rope_parameters=None, rope_theta=1e4,
                       rope_scaling={"type": "linear", "factor": 0.5}), ["factor must be >= 1"]
    if case == "rope-misspelt-key":
        return copy_hf(tiny_hf, tmp / "hf", rope_parameters=None, rope_theta=1e4,
                       rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                                     "beta_fats": 8}), ["key 'beta_fats' is not read by rope_type yarn"]
    if case == "output-exists":
        (tmp / "out").mkdir()
        (tmp / "out" / "x").write_text("x")
        return sources["hf"], ["already exists", "--force"]
    raise AssertionError(case)


BAD_INPUTS = ["missing-path", "unknown-format", "truncated-safetensors", "truncated-pth", "truncated-gguf", "bad-json",
              "config-without-a-key", "config-number-as-string", "config-does-not-match-weights",
              "config-more-layers-than-weights", "unsupported-activation", "meta-missing-shard",
              "meta-only-one-of-two-shards", "meta-shards-disagree", "gguf-unknown-architecture", "unknown-rope-type",
              "rope-factor-below-1", "rope-misspelt-key", "output-exists"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, sources, tiny_hf, case):
    src, words = damage(case, sources, tiny_hf, tmp_path)
    with pytest.raises((ValueError, OSError)) as e:
        convert(src, tmp_path / "out")
    for word in words:
        assert word in str(e.value), str(e.value)
    if case != "output-exists":
        assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_bad_input_on_the_command_line_is_one_line_and_exit_1(tmp_path, sources):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    one_error_line(run_script("convert_llama.py", sources["hf"], tmp_path / "out"), "convert_llama.py",
                   "already exists", "--force")
    result = run_script("convert_llama.py", sources["hf"], tmp_path / "o", "--max-position-embeddings", "-5")
    one_error_line(result, "convert_llama.py", "--max-position-embeddings: must be a finite number >= 1", code=2)


@pytest.mark.parametrize("where", ["same", "out-inside-src", "src-inside-out"])
def test_out_overlapping_src_is_refused_even_with_force(tmp_path, tiny_hf, sources, where):
    src = copy_hf(tiny_hf, tmp_path / "models" / "hf")
    (tmp_path / "models" / "tiny.gguf").write_bytes(sources["gguf"].read_bytes())
    out = {"same": src, "out-inside-src": src / "converted", "src-inside-out": tmp_path / "models"}[where]
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="overlap"):
        convert(src, out, force=True)
    with pytest.raises(ValueError, match="overlap"):  # a .gguf file into the folder that holds it
        convert(tmp_path / "models" / "tiny.gguf", tmp_path / "models", force=True)
    assert snapshot(tmp_path) == before


def test_a_killed_conversion_leaves_no_temporary_folder_behind(tmp_path, tiny_hf):
    """A conversion killed with SIGKILL leaves its temporary folder; the next conversion to the same OUT removes it."""
    stale = tmp_path / ".ours.{}.{}.tmp".format(socket.gethostname(), 2 ** 22 + 1)  # a pid no process has
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    alive = tmp_path / ".ours.{}.1.tmp".format(socket.gethostname())  # a running process's (pid 1 always runs)
    alive.mkdir()
    convert(tiny_hf[0], tmp_path / "ours")
    assert not stale.exists() and alive.exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_hf):
    """A real full disk: a 64 KiB tmpfs, mounted in a user and mount namespace of its own (no root needed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=64k tmpfs {disk} && {sys.executable} {ROOT / 'convert_llama.py'} "
              f"{tiny_hf[0]} {disk / 'out'}; code=$?; ls -A {disk}; exit $code")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                            capture_output=True, text=True, timeout=120)
    one_error_line(result, "convert_llama.py", "No space left on device")
    assert result.stdout == ""  # the tmpfs is empty again: no partial OUT, no temporary folder
