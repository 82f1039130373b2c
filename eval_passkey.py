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

import rope
from common import (EVALUATION_REUSES_UP_TO, ArgumentParser, LayerProgress, add_model_args, check_outputs, cli,
                    default_device, dtype_reason, keep_freed_memory, load_evaluated, memory_capacity, number,
                    parse_rope_args, peak_memory, save_plot, write_json)
from model import Decoder

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


def retrieve(model, tok, ids, key, dynamic_cache="pre-rope", prefix=None):
    """(right?, the decoded answer): greedy decoding through the KV cache; the first integer must be the key.
    prefix: a Decoder that has run the first tokens of ids already; it is copied, not changed."""
    tokens = torch.tensor([ids], device=model.tok_embeddings.weight.device)
    out = model.generate(tokens, MAX_NEW_TOKENS, dynamic_cache=dynamic_cache, decoder=prefix and prefix.copy())
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


def shared_prefix_length(model, prompts):
    """How many first tokens all the prompts of a cell share (the task and the filler before the key; at least one
    token of each is left to run), 0 when fewer than two prompts share any, or for a variant whose rotation depends
    on the length (rope.is_dynamic): a prefix run alone would be rotated for its own length."""
    n = next((i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1), min(map(len, prompts)) - 1)
    return 0 if len(prompts) < 2 or rope.is_dynamic(model.config.rope_scaling) else n


def shared_prefix(model, prompts):
    """A Decoder that has run the shared first tokens of the prompts, so that each trial runs only the rest of its
    prompt; None when there is nothing to share."""
    n = shared_prefix_length(model, prompts)
    if n < 1:
        return None
    decoder = Decoder(model, 1, max(map(len, prompts)) + MAX_NEW_TOKENS)
    with torch.inference_mode():
        decoder(torch.tensor([prompts[0][:n]], device=model.tok_embeddings.weight.device))
    return decoder


def evaluate(model, tok, methods, cells, dynamic_cache="pre-rope", prefix_cache=False):
    """{label: {length: {depth: [{"key", "tokens", "answer", "correct", "seconds"} per trial]}}} over the prompts
    of cells. prefix_cache: the trials of a cell share the KV cache of their common prefix (see shared_prefix; the
    same answers up to rounding, which in bf16 can flip a greedy choice)."""
    results = {}
    for label, scaling in methods:
        model.set_rope_scaling(scaling)
        results[label] = {}
        for (L, d), cell in cells.items():
            trials = results[label].setdefault(L, {}).setdefault(d, [])
            prefix = shared_prefix(model, [ids for _, ids in cell]) if prefix_cache else None
            for key, ids in cell:
                start = time.perf_counter()
                correct, answer = retrieve(model, tok, ids, key, dynamic_cache, prefix)
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


def forward_passes(model, methods, cells, prefix_cache):
    """The forward passes evaluate() runs (the progress bar's size): generate() runs every block once per new token,
    the first being the prompt's prefill, and no EOS stops it early; plus one per cell for a shared prefix."""
    passes = len(methods) * sum(map(len, cells.values())) * MAX_NEW_TOKENS
    for _, scaling in methods if prefix_cache else []:
        model.set_rope_scaling(scaling)
        passes += sum(shared_prefix_length(model, [ids for _, ids in cell]) > 0 for cell in cells.values())
    return passes


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
    parser.add_argument("--prefix-cache", action="store_true",
                        help="the trials of a (length, depth) cell share the KV cache of the tokens their prompts start "
                             "with (static variants). Off by default: measured on CPU it saved no time (the rest of "
                             "each prompt runs through SDPA's masked path), and in bf16 it changed some answers "
                             "(docs/study.md)")
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

    with LayerProgress(model, forward_passes(model, methods, cells, args.prefix_cache)):
        results = evaluate(model, tok, methods, cells, args.dynamic_cache, args.prefix_cache)
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
