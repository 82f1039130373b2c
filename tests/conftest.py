import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


@pytest.fixture
def hf_llama():
    return write_hf_llama
