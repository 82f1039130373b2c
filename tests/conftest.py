"""Helpers the test files share: tiny models written by transformers or by us, a byte-level tokenizer, and the
checks that a script's bad input ends in one line."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_hf_llama(path, rope_parameters=None, n_kv_heads=2, tie=False, max_position_embeddings=64, seed=0,
                   legacy_config=False, vocab_size=320):
    """Save a random tiny transformers LlamaForCausalLM to `path`; return it (eval mode).
    legacy_config rewrites config.json in the transformers 4.x shape (rope_theta + rope_scaling with "type")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    params = {"rope_theta": 10000.0, "rope_type": "default", **(rope_parameters or {})}
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5,
                      max_position_embeddings=max_position_embeddings, rope_parameters=params,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initializes norms to 1: randomize them so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    if legacy_config:
        config_path = Path(path) / "config.json"
        raw = json.loads(config_path.read_text())
        rope_parameters = raw.pop("rope_parameters")
        raw["rope_theta"] = rope_parameters.pop("rope_theta")
        rope_type = rope_parameters.pop("rope_type")
        raw["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope_parameters}
        config_path.write_text(json.dumps(raw))
    return model


def tiny_llama(rope_scaling=None, vocab_size=258, seed=0, n_layers=2, max_position_embeddings=64, **kw):
    """A random tiny Llama of ours (GQA, tied unless told), with norms away from 1 and small weights."""
    from model import Llama, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=vocab_size,
                      max_position_embeddings=max_position_embeddings, rope_scaling=rope_scaling,
                      **{"tie_word_embeddings": True, **kw})
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.02)
    return model.eval()


def byte_tokenizer():
    """One token per byte (ids 0..255) plus BOS/EOS (256, 257): the vocabulary of the tiny models."""
    from tokenizer import Tokenizer

    return Tokenizer(ranks={bytes([i]): i for i in range(256)}, pattern=r"\S+|\s+",
                     special_tokens={"<s>": 256, "</s>": 257}, bos_id=256, eos_id=257)


def run_script(script, *args, cwd=ROOT, env=None, timeout=300):
    """Run one of the project's scripts as a user does (a tool as `python -m tools.NAME`, from the root)."""
    command = ["-m", script[:-3].replace("/", ".")] if script.startswith("tools/") else [str(ROOT / script)]
    if script.startswith("tools/"):
        env = {"PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *command, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def one_error_line(result, script, *words, code=1):
    """The script failed with exactly one line on stderr, `script: error: ...`, holding every word."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"{script}: error: ") and "Traceback" not in result.stderr, lines[0]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def sigint_as_ctrl_c():
    """Popen's preexec_fn for a child that a test sends SIGINT: a shell that starts a job in the background (`cmd &`)
    makes its processes ignore SIGINT, and Python then installs no Ctrl-C handler; restore the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def hf_state_in_our_names(model):
    """transformers' state dict under our tensor names (written out here, independently of convert_llama)."""
    ours = {}
    for name, w in model.state_dict().items():
        for theirs, mine in [("model.embed_tokens", "tok_embeddings"), ("model.norm", "norm"), ("lm_head", "output"),
                             ("model.layers", "layers"), ("input_layernorm", "attention_norm"),
                             ("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
                             ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
                             ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "feed_forward.w1"),
                             ("mlp.down_proj", "feed_forward.w2"), ("mlp.up_proj", "feed_forward.w3")]:
            name = name.replace(theirs, mine)
        ours[name] = w
    if model.config.tie_word_embeddings:
        del ours["output.weight"]
    return ours


def load_ours(path):
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors"), json.loads((Path(path) / "config.json").read_text())


def snapshot(path):
    """Every file and folder below path with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).rglob("*"))}


@pytest.fixture
def hf_llama():
    return write_hf_llama
