"""How much GPU memory train.py needs: an estimate per GPU for the paper's runs and for Llama 2 at 16k..128k tokens.

    python -m tools.memory_plan                   # 8 GPUs of 80 GiB
    python -m tools.memory_plan --gpus 16 --gpu-gib 141

A model of memory, not a measurement (see estimate_memory): FSDP2 shards fp32 weights, gradients and AdamW moments
over the GPUs; blocks compute in bf16 with flash attention (no T x T matrix); micro-batch 1; the loss is chunked.
More GPUs shrink the sharded state, not the activations: train.py has no sequence parallelism. For fewer GPUs than
this asks for, FSDP2's CPUOffloadPolicy (optimizer state and weights in host memory) is the lever; train.py does not
offer it, as its code path could not be tested here.
"""
from common import ArgumentParser, cli, number
from model import LlamaConfig

SHAPES = {  # Touvron et al. 2023 (Llama 2, vocabulary 32000); Mistral 7B v0.1 (Jiang et al. 2023)
    "Llama 2 7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008),
    "Llama 2 13B": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "Llama 2 70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    "Mistral 7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336),
}
# the runs the paper reports, as its reference run script made them: (model, s, sequence length, steps, GPUs the
# authors used: one node of 8 A100 80 GB for Llama 2 7B, 64 GPUs in 8 nodes for 13B and 70B; not stated for Mistral)
PAPER_RUNS = [("Llama 2 7B", 16, 65536, 400, 8), ("Llama 2 7B", 32, 65536, 200, 8),
              ("Llama 2 13B", 16, 65536, 400, 64), ("Llama 2 13B", 32, 65536, 200, 64),
              ("Llama 2 70B", 8, 8192, 400, 64), ("Mistral 7B", 8, 16384, 1000, None),
              ("Mistral 7B", 16, 16384, 500, None)]
GIB = 1024 ** 3


def estimate_memory(cfg, seq_len, n_gpus, activation_checkpointing=True, micro_batch_size=1, loss_chunk=1024):
    """Estimated per-GPU memory in bytes of train.py's step, by part: FSDP2 shards the fp32 weights, fp32 gradients
    and AdamW's two fp32 moments over n_gpus (16 bytes per parameter); it all-gathers bf16 weights of a block at a
    time (two with prefetching; the root's embeddings and head stay gathered) and reduces one block's gradients in
    fp32. Activations: flash attention keeps no T x T matrix, so per token and layer the block keeps its bf16
    tensors for backward (the two normed inputs, q, k, v, rotated q and k, the attention output and its reshaped
    copy, the four SwiGLU tensors) plus the two fp32 RMSNorm inputs: 20·dim + 6·kv_dim + 8·hidden_dim bytes. With
    activation checkpointing a layer keeps only its bf16 input and one layer at a time is recomputed. The loss holds
    fp32 logits for loss_chunk tokens at a time. Allocator fragmentation, temporary buffers and the CUDA context (a
    few GB) are not counted."""
    kv_dim, tokens = cfg.n_kv_heads * cfg.head_dim, seq_len * micro_batch_size
    block = 2 * cfg.dim + cfg.dim * (cfg.n_heads * cfg.head_dim * 2 + 2 * kv_dim) + 3 * cfg.dim * cfg.hidden_dim
    root = cfg.vocab_size * cfg.dim * (1 if cfg.tie_word_embeddings else 2) + cfg.dim
    layer_activations = tokens * (20 * cfg.dim + 6 * kv_dim + 8 * cfg.hidden_dim)
    if activation_checkpointing:
        activations = tokens * cfg.n_layers * 2 * cfg.dim + layer_activations
    else:
        activations = cfg.n_layers * layer_activations
    parts = {
        "sharded state": 16 * (cfg.n_layers * block + root) / n_gpus,
        "gathered": 2 * (2 * block + root) + 4 * (block + root),
        "activations": activations + tokens * 8 * cfg.dim,  # + the final norm and hidden states
        "loss": loss_chunk * cfg.vocab_size * 10,  # fp32 logits, their gradient, bf16 logits
    }
    return {**parts, "total": sum(parts.values())}


def gpus_needed(cfg, seq_len, gpu_gib, step=8):
    """The smallest multiple of `step` GPUs on which the estimate fits, or None when the activations alone do not."""
    return next((n for n in range(step, 4097, step) if estimate_memory(cfg, seq_len, n)["total"] <= gpu_gib * GIB),
                None)


def config(name):
    return LlamaConfig(**SHAPES[name], vocab_size=32000)


def paper_table(gpu_gib):
    lines = [f"{'run (paper)':<31} {'seq_len':>8} {'GPUs used':>9} {'GiB/GPU (AC)':>12} {'fits':>5} "
             f"{'GPUs needed':>11}"]
    for name, scale, seq_len, steps, gpus in PAPER_RUNS:
        cfg, run = config(name), f"{name}, s = {scale}, {steps} steps"
        total = estimate_memory(cfg, seq_len, gpus or 8)["total"] / GIB  # on 8 GPUs where the paper does not say
        needed = gpus_needed(cfg, seq_len, gpu_gib)
        lines.append(f"{run:<31} {seq_len:>8} {gpus or '? (8)':>9} {total:>12.0f} "
                     f"{'yes' if total <= gpu_gib else 'no':>5} {needed or '-':>11}")
    return "\n".join(lines)


def sweep_table(n_gpus, gpu_gib):
    lines = [f"{'model':<12} {'seq_len':>8} {'sharded':>8} {'gathered':>9} {'act (AC)':>9} {'total (AC)':>11} "
             f"{'total (no AC)':>14} {'GPUs needed (AC)':>17}"]
    for name in ("Llama 2 7B", "Llama 2 13B", "Llama 2 70B"):
        cfg = config(name)
        for seq_len in (16384, 32768, 65536, 131072):
            ac, no_ac = (estimate_memory(cfg, seq_len, n_gpus, ac) for ac in (True, False))
            total = [f"{m['total'] / GIB:.0f}{'*' if m['total'] > gpu_gib * GIB else ''}" for m in (ac, no_ac)]
            lines.append(f"{name.removeprefix('Llama 2 '):<12} {seq_len:>8} {ac['sharded state'] / GIB:>8.1f} "
                         f"{ac['gathered'] / GIB:>9.1f} {ac['activations'] / GIB:>9.1f} {total[0]:>11} "
                         f"{total[1]:>14} {gpus_needed(cfg, seq_len, gpu_gib) or '-':>17}")
    return "\n".join(lines)


def main(argv=None):
    parser = ArgumentParser(__file__, __doc__)
    parser.add_argument("--gpus", type=number(int, min=1), default=8, help="GPUs for the sweep (default 8)")
    parser.add_argument("--gpu-gib", type=number(float, above=0), default=80, help="memory per GPU (default 80)")
    args = parser.parse_args(argv)
    print(f"ESTIMATED per-GPU memory (GiB) of train.py, FSDP2 with activation checkpointing (AC); 'GPUs needed' is "
          f"the smallest multiple of 8 GPUs of {args.gpu_gib:g} GiB on which it fits ('-': the activations alone do "
          "not). A model of memory, not a measurement.\n\nThe paper's runs, on the GPUs the authors used:")
    print(paper_table(args.gpu_gib))
    print(f"\nLlama 2 on {args.gpus} GPUs ('*': over {args.gpu_gib:g} GiB):")
    print(sweep_table(args.gpus, args.gpu_gib))


if __name__ == "__main__":
    cli(main)
