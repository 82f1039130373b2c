"""Passkey retrieval (Mohtashami & Jaggi 2023; YaRN paper §4.3): hide a number in filler text, ask for it back.

    python eval_passkey.py --plot passkey.png --out passkey.json  # SmolLM2-135M, 2k/4k/8k x 5 depths, plain vs YaRN
    python eval_passkey.py --lengths 16384 --depths 0.5 --trials 1 --rope default yarn --scale 2
    python eval_passkey.py --checkpoint checkpoints/llama-2-7b --lengths 8192 16384 --trials 10 --rope yarn --scale 4
    python eval_passkey.py --checkpoint runs/yarn/final --rope checkpoint --lengths 8192 16384 32768

The prompt (docs/method.md, "Evaluations"; the reference's text) is, joined by newlines: the task description, the first part of the
filler, the pass key line, the rest of the filler, and the question. The filler is the five sentences below, cycled
and joined by spaces; `depth` is the fraction of its sentences that come before the pass key (0: right after the
task, 1: right before the question). For each length the filler is grown until the prompt just fits: the longest
filler (in whole sentences) whose prompt has at most `length` tokens. No BOS is prepended (as in eval_ppl.py).
The key is uniform in 1..50000 (seeded, the same keys for every RoPE configuration); the model decodes 10 tokens
greedily through its KV cache and is right if the first integer in them is the key. Lengths past the checkpoint's
max_position_embeddings are allowed (that is the point); the KV cache holds prompt + 10 tokens. A dynamic variant
caches keys before RoPE and rotates them anew at each step (the paper's §3.3), or with --dynamic-cache recompute
runs the whole prompt again for every token (see Llama.generate).
--rope, --scale, --original-max-position-embeddings and --dtype work as in eval_ppl.py.
"""
import json
import random
import re
import time

import torch

from common import (EVALUATION_REUSES_UP_TO, ArgumentParser, LayerProgress, add_model_args, check_outputs, cli,
                    default_device, dtype_reason, keep_freed_memory, load_evaluated, memory_capacity, number,
                    parse_rope_args, peak_memory, save_plot, write_json)

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
INFO = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 10


def prompt(key, n_sentences, depth):
    """The prompt with n_sentences filler sentences, round(depth · n_sentences) of them before the key."""
    filler = [FILLER[i % len(FILLER)] for i in range(n_sentences)]
    cut = round(depth * n_sentences)
    return "\n".join([TASK, " ".join(filler[:cut]), INFO.format(key=key), " ".join(filler[cut:]), QUESTION])


def fit_prompt(tok, key, depth, length):
    """Token ids of the longest prompt with at most `length` tokens (binary search on the filler's sentences)."""
    def ids(n):
        return tok.encode(prompt(key, n, depth))

    if len(ids(0)) > length:
        raise ValueError(f"--lengths {length} is shorter than the prompt without filler ({len(ids(0))} tokens)")
    lo, hi = 0, length  # every sentence has at least one token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(ids(mid)) <= length else (lo, mid - 1)
    return ids(lo)


def retrieve(model, tok, ids, key, dynamic_cache="pre-rope"):
    """(right?, the decoded answer): greedy decoding through the KV cache; the first integer must be the key."""
    tokens = torch.tensor([ids], device=model.tok_embeddings.weight.device)
    out = model.generate(tokens, MAX_NEW_TOKENS, dynamic_cache=dynamic_cache)
    answer = tok.decode(out[0, len(ids):].tolist())
    number = re.search(r"\d+", answer)
    return number is not None and int(number.group()) == key, answer


def build_prompts(tok, lengths, depths, trials, seed=0):
    """{(length, depth): [(key, prompt token ids) per trial]}, seeded; shared by every RoPE configuration."""
    rng = random.Random(seed)
    cells = {(L, d): [] for L in lengths for d in depths}
    for (L, d), cell in cells.items():
        for _ in range(trials):
            key = rng.randint(1, 50000)
            cell.append((key, fit_prompt(tok, key, d, L)))
    return cells


def evaluate(model, tok, methods, cells, dynamic_cache="pre-rope"):
    """{label: {length: {depth: [{"key", "tokens", "answer", "correct", "seconds"} per trial]}}} over the prompts
    of cells."""
    results = {}
    for label, scaling in methods:
        model.set_rope_scaling(scaling)
        results[label] = {}
        for (L, d), cell in cells.items():
            trials = results[label].setdefault(L, {}).setdefault(d, [])
            for key, ids in cell:
                start = time.perf_counter()
                correct, answer = retrieve(model, tok, ids, key, dynamic_cache)
                trials.append({"key": key, "tokens": len(ids), "answer": answer, "correct": correct,
                               "seconds": time.perf_counter() - start})
    return results


# ----------------------------------------------------------------------------- output and the command line


def accuracy(trials):
    return sum(t["correct"] for t in trials) / len(trials)


def table(results, lengths, depths):
    lines = []
    for label, by_length in results.items():
        lines.append(f"{label}: accuracy (%), rows = length in tokens, columns = depth of the key")
        lines.append(f"{'length':>8}" + "".join(f"{d:>8.2f}" for d in depths) + f"{'mean':>8}")
        for L in lengths:
            row = [100 * accuracy(by_length[L][d]) for d in depths]
            lines.append(f"{L:>8}" + "".join(f"{a:>8.0f}" for a in row) + f"{sum(row) / len(row):>8.0f}")
    return "\n".join(lines)


def plot(results, lengths, depths, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = (1.2 + 0.8 * len(depths) * len(results), 0.5 * len(lengths) + 1.8)
    fig, axes = plt.subplots(1, len(results), figsize=size, squeeze=False)
    for ax, (label, by_length) in zip(axes[0], results.items()):
        grid = [[100 * accuracy(by_length[L][d]) for d in depths] for L in lengths]
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(grid):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.0f}", ha="center", va="center")
        ax.set(title=label, xlabel="depth", xticks=range(len(depths)), xticklabels=[f"{d:g}" for d in depths],
               yticks=range(len(lengths)), yticklabels=lengths)
    axes[0][0].set_ylabel("length (tokens)")
    fig.suptitle("passkey retrieval accuracy (%)")
    fig.tight_layout()
    save_plot(fig, path)


def forward_passes(methods, cells):
    """The forward passes evaluate() runs (the progress bar's size): generate() runs every block once per new token,
    the first being the prompt's prefill, and no EOS stops it early."""
    return len(methods) * sum(map(len, cells.values())) * MAX_NEW_TOKENS


def write_report(path, args, model, methods, results, lengths, depths, wall, peak):
    report = {"settings": {**vars(args), "lengths": lengths, "depths": depths, "rope_scaling": dict(methods),
                           "max_new_tokens": MAX_NEW_TOKENS, "bos": False,
                           "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
                           "max_position_embeddings": model.config.max_position_embeddings},
              "accuracy": {label: {L: {d: accuracy(r[L][d]) for d in depths} for L in lengths}
                           for label, r in results.items()},
              "trials": results, "wall_seconds": wall, "peak_memory_bytes": peak}
    write_json(path, report)


def check_lengths_fit(lengths, model):
    """Refuse a --lengths whose KV cache alone (keys and values of every layer, prompt + MAX_NEW_TOKENS tokens, in the
    model's dtype) would not fit in the device's memory, before the prompts of that length are built."""
    c, weight = model.config, model.tok_embeddings.weight
    need = 2 * c.n_layers * c.n_kv_heads * c.head_dim * weight.element_size() * (max(lengths) + MAX_NEW_TOKENS)
    have = memory_capacity(weight.device)
    if need > have:
        raise ValueError(f"--lengths {max(lengths):,}: the KV cache alone would take {need / 2**30:,.1f} GiB, more "
                         f"than the {have / 2**30:,.1f} GiB of memory of this {weight.device.type} device: give "
                         f"shorter lengths")


def parse_args(argv):
    parser = ArgumentParser(__file__, __doc__)
    add_model_args(parser, rope_default=["default", "yarn"])
    parser.add_argument("--lengths", type=number(int, min=1), nargs="+", default=[2048, 4096, 8192], metavar="L",
                        help="prompt lengths in tokens (default 2048 4096 8192)")
    parser.add_argument("--depths", type=number(float, min=0, max=1), nargs="+", default=[0, 0.25, 0.5, 0.75, 1],
                        metavar="D", help="where the key goes, as a fraction of the filler (default 0 0.25 0.5 0.75 1)")
    parser.add_argument("--trials", type=number(int, min=1), default=2,
                        help="trials per (length, depth) cell (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pass keys (default 0)")
    parser.add_argument("--dynamic-cache", choices=["pre-rope", "recompute"], default="pre-rope",
                        help="dynamic variants only: cache keys before RoPE and rotate them at every step (the "
                             "paper's, default), or recompute the whole sequence whenever the rotation changes")
    parser.add_argument("--out", help="write every trial (key, prompt tokens, answer) and the settings to this JSON")
    parser.add_argument("--plot", help="write the accuracy heatmaps (one per method) to this image (.png, .pdf, ...)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    lengths, depths = sorted(set(args.lengths)), sorted(set(args.depths))
    parsed_rope = parse_rope_args(args.rope)
    check_outputs(args, [("--checkpoint", args.checkpoint)])
    print(f"dtype: {dtype_reason(args.dtype, default_device())}", flush=True)
    keep_freed_memory(EVALUATION_REUSES_UP_TO)  # every prompt allocates the same big tensors: no page faults for them
    start = time.time()
    model, tok, methods = load_evaluated(args, parsed_rope)
    check_lengths_fit(lengths, model)
    cells = build_prompts(tok, lengths, depths, args.trials, args.seed)
    for label, scaling in methods:
        print(f"{label}: rope_scaling = {json.dumps(scaling)}", flush=True)

    with LayerProgress(model, forward_passes(methods, cells)):
        results = evaluate(model, tok, methods, cells, args.dynamic_cache)
    device = model.tok_embeddings.weight.device
    wall, peak = time.time() - start, peak_memory(device)
    print(table(results, lengths, depths))
    print(f"{args.trials} trial(s) per cell, wall time {wall:.0f} s, peak memory {peak / 2**30:.2f} GiB "
          f"({'CUDA allocated' if device.type == 'cuda' else 'peak RSS'})")
    if args.out:
        write_report(args.out, args, model, methods, results, lengths, depths, wall, peak)
        print(f"wrote {args.out}")
    if args.plot:
        plot(results, lengths, depths, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    cli(main)
