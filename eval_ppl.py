"""Perplexity of one checkpoint under several RoPE scalings, side by side (YaRN paper §4.3.1, Tables 1-2, Figure 1).

    python eval_ppl.py --plot ppl.png --out results.json   # SmolLM2-135M (trained at 8192) on a book, 2k..16k tokens:
                                                           # plain RoPE vs PI vs YaRN at scale 2
    python eval_ppl.py --mode sliding --lengths 1024 2048 --stride 256 --max-docs 5
    python eval_ppl.py --rope default ntk dynamic yarn dynamic-yarn --scale 2 --data my_docs/ more.jsonl
    python eval_ppl.py --checkpoint checkpoints/llama-2-7b --rope default '{"rope_type": "yarn", "factor": 4, "beta_fast": 64}'
    python eval_ppl.py --checkpoint runs/yarn/final --rope checkpoint     # a fine-tuned model, with its own scaling

Modes, for a document of N tokens and an evaluation length W (docs/method.md, "Evaluations"):
  truncated  (the paper's tables) the document is cut to its first W tokens, one window, W - 1 tokens scored.
             Static RoPE variants get every length from ONE pass over max(lengths) tokens: attention is causal, so
             the losses on the first W tokens of a long pass are those of a pass over W tokens. Dynamic variants
             (rope.DYNAMIC) rescale with the pass length, so they get one pass per length.
  sliding    Press et al.'s sliding window: windows of W tokens start every --stride tokens, and each window
             scores only the tokens the previous window did not; all tokens but the first are scored once.
Reported: the token-weighted mean (exp of the total loss over the total number of scored tokens, over all
documents), not the mean of per-window means the reference script uses. A document is evaluated at length W only
if it has at least W tokens. No BOS is prepended: windows are plain slices of the document's tokens (SmolLM2's BOS
id is the chat marker <|im_start|>; its pre-training documents did not start with one); so the first token of a
window is context only. Lengths past the checkpoint's max_position_embeddings are allowed: the blow-up there is
what the evaluation shows.

--rope names the configurations to compare: "checkpoint" is the checkpoint's own scaling (what config.json says),
a rope_type of rope.py ("default" is plain RoPE; linear, ntk, dynamic, ntk-by-parts, yarn, dynamic-yarn, llama3)
gets --scale as its factor and --original-max-position-embeddings, and a JSON dict is used as it is (missing factor
and original length filled in the same way). The model is loaded once; each configuration swaps the cos/sin tables.
dynamic-yarn scales by max(factor, l/L), factor being the scale the model was fine-tuned with: for a model that
never was, use '{"rope_type": "dynamic-yarn", "factor": 1}' (with factor 2 it equals yarn up to 2L).
Data: .txt files (one document each), .jsonl files (one document per line, its "text" field), folders of them
(searched recursively); documents are taken in the order given. Default: alice29 and asyoulik, the two books of
tools/assets.py that train.py does not fine-tune on.
"""
import json
import time
from pathlib import Path

import torch

import rope
from common import (EVALUATION_REUSES_UP_TO, ArgumentParser, LayerProgress, add_model_args, check_outputs, cli,
                    compile_blocks, default_device, document_files, dtype_reason, exp_or_inf, keep_freed_memory,
                    load_evaluated, null_nonfinite, number, parse_rope_args, peak_memory, read_documents, save_plot,
                    write_json)

# ----------------------------------------------------------------------------- the method: the two protocols


def token_nll(model, x):
    """nll [T-1] (fp32) of x[1:] given what precedes, from one forward pass over the T tokens of x (the pass length
    is T, which is what a dynamic variant scales to; the last token's prediction is not used)."""
    targets = torch.cat([x[1:], x.new_full((1,), -100)])
    with torch.inference_mode():
        return model.nll(x[None], targets[None])[0, :-1]


def windows(n, length, stride):
    """Press et al.: [(start, end, first)] of windows x[start:end] over n tokens, starting every `stride` tokens.
    Window k scores its targets first..end-1, where first = max(the previous window's end, start + 1): the tokens
    before the previous end were scored already, and a window's own first token has no context inside it (so token
    0 is never scored). With stride < length the windows overlap and every later token is scored exactly once."""
    out, scored = [], 1
    for start in range(0, n, stride):
        end = min(start + length, n)
        out.append((start, end, max(scored, start + 1)))
        scored = end
        if end == n:
            break
    return out


def sliding_nll(model, doc, length, stride):
    """(total nll, number of scored tokens) of a document with Press et al.'s sliding window."""
    total, count = 0.0, 0
    for start, end, first in windows(len(doc), length, stride):
        # token_nll's entry j is the loss of token start + 1 + j, so targets first..end-1 start at first - start - 1
        nll = token_nll(model, doc[start:end])[first - start - 1:]
        total, count = total + nll.double().sum().item(), count + nll.numel()
    return total, count


def truncated_nll(model, doc, lengths):
    """{length: (total nll, W - 1)} of the document cut to each length: one pass over max(lengths) tokens for a
    static variant (prefix sums of the per-token losses), one pass per length for a dynamic one."""
    if rope.is_dynamic(model.config.rope_scaling) and len(lengths) > 1:
        return {W: truncated_nll(model, doc, [W])[W] for W in lengths}
    cumsum = token_nll(model, doc[:max(lengths)]).double().cumsum(0)
    return {W: (cumsum[W - 2].item(), W - 1) for W in lengths}  # the first W tokens score targets 1..W-1


def evaluate(model, docs, methods, lengths, mode="truncated", stride=256):
    """{label: {length: [(total nll, scored tokens) per document, None where it is shorter than length]}}."""
    results = {}
    for label, scaling in methods:
        model.set_rope_scaling(scaling)
        per_doc = []
        for _, doc in docs:
            fits = [W for W in lengths if W <= len(doc)]
            if mode == "sliding":
                per_doc.append({W: sliding_nll(model, doc, W, stride) for W in fits})
            else:
                per_doc.append(truncated_nll(model, doc, fits) if fits else {})
        results[label] = {W: [d.get(W) for d in per_doc] for W in lengths}
    return results


def perplexity(pairs):
    """Token-weighted: exp(total nll / total scored tokens) over the (total, count) pairs that exist."""
    pairs = [p for p in pairs if p is not None]
    return exp_or_inf(sum(t for t, _ in pairs) / sum(c for _, c in pairs))


# ----------------------------------------------------------------------------- documents, and the passes they take


def tokenize(texts, tok, min_tokens, max_docs, device):
    """[(name, tokens LongTensor [N])] of the first max_docs documents with at least min_tokens tokens."""
    docs, longest = [], 0
    for name, text in texts:
        ids = tok.encode(text)
        longest = max(longest, len(ids))
        if len(ids) >= min_tokens:
            docs.append((name, torch.tensor(ids, device=device)))
            if len(docs) == max_docs:
                break
    if not docs:
        raise ValueError(f"no document has at least {min_tokens} tokens (the longest has {longest}): "
                         f"lower --lengths / --min-tokens or give longer --data")
    return docs


def forward_passes(docs, methods, lengths, mode, stride):
    """The number of forward passes evaluate() runs (the progress bar's size): a pass per window of windows() in
    sliding mode; in truncated mode one per document for a static variant, one per length that fits for a dynamic
    one (truncated_nll)."""
    total = 0
    for _, scaling in methods:
        for _, doc in docs:
            fits = [W for W in lengths if W <= len(doc)]
            if mode == "sliding":
                total += sum(len(windows(len(doc), W, stride)) for W in fits)
            else:
                total += len(fits) if rope.is_dynamic(scaling) else min(len(fits), 1)
    return total


# ----------------------------------------------------------------------------- output and the command line


def table(results, lengths, title):
    width = max(len("method"), *map(len, results)) + 2
    lines = [title, f"{'method':<{width}}" + "".join(f"{W:>10}" for W in lengths)]
    for label, by_length in results.items():
        lines.append(f"{label:<{width}}" + "".join(f"{perplexity(by_length[W]):>10.3f}" for W in lengths))
    return "\n".join(lines)


def plot(results, lengths, trained_length, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_length in results.items():
        ax.plot(lengths, [perplexity(by_length[W]) for W in lengths], marker="o", label=label)
    ax.axvline(trained_length, color="gray", linestyle=":", label=f"max_position_embeddings ({trained_length})")
    ax.set(xlabel="context length (tokens)", ylabel="perplexity (token-weighted, log scale)", yscale="log")
    ax.set_title(title, fontsize=9)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_plot(fig, path)


def report(args, model, docs, methods, lengths, results, wall):
    device = model.tok_embeddings.weight.device
    return {
        "settings": {**vars(args), "lengths": lengths, "rope_scaling": dict(methods), "mean": "token-weighted",
                     "bos": False, "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
                     "device": str(device), "max_position_embeddings": model.config.max_position_embeddings},
        "documents": [{"name": name, "tokens": len(doc)} for name, doc in docs],
        "perplexity": {label: {W: perplexity(r[W]) for W in lengths} for label, r in results.items()},
        "per_document": {label: {W: [None if p is None else {"name": name, "nll_sum": p[0], "tokens": p[1],
                                                               "perplexity": exp_or_inf(p[0] / p[1])}
                                     for (name, _), p in zip(docs, r[W])] for W in lengths}
                         for label, r in results.items()},
        "wall_seconds": wall, "peak_memory_bytes": peak_memory(device),
        "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss",
    }


def write_outputs(args, model, docs, methods, lengths, results, wall):
    """The table on stdout, then --out and --plot."""
    out = report(args, model, docs, methods, lengths, results, wall)
    what = "truncated: one window per document and length" if args.mode == "truncated" else \
        f"sliding window, stride {args.stride}"
    title = f"{Path(args.checkpoint).name} ({out['settings']['dtype']}), {len(docs)} document(s), {what}"
    print(table(results, lengths, f"perplexity (token-weighted mean), {title}"))
    print(f"wall time {out['wall_seconds']:.0f} s, peak memory {out['peak_memory_bytes'] / 2**30:.2f} GiB "
          f"({out['peak_memory_kind']})")
    if args.out:
        write_json(args.out, null_nonfinite(out, "the loss was not finite, or its perplexity too large for a float: "
                                            "the weights were checked finite when loaded, so the activations "
                                            f"overflowed {out['settings']['dtype']}"))
        print(f"wrote {args.out}")
    if args.plot:
        plot(results, lengths, model.config.max_position_embeddings, title, args.plot)
        print(f"wrote {args.plot}")



def parse_args(argv):
    parser = ArgumentParser(__file__, __doc__)
    add_model_args(parser, rope_default=["default", "linear", "yarn"])
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help=".txt / .jsonl files or folders of them (default: alice29 and asyoulik of tools/assets.py, "
                             "held out from train.py's default data)")
    parser.add_argument("--mode", choices=["truncated", "sliding"], default="truncated",
                        help="truncated: one window per document, cut to each length (the paper's tables, default); "
                             "sliding: Press et al.'s sliding window with --stride")
    parser.add_argument("--lengths", type=number(int, min=2), nargs="+", default=[2048 * i for i in range(1, 9)],
                        metavar="W", help="evaluation lengths in tokens (default 2048 4096 ... 16384)")
    parser.add_argument("--stride", type=number(int, min=1), default=256,
                        help="sliding-window stride S (default 256, the paper's)")
    parser.add_argument("--min-tokens", type=number(int, min=2),
                        help="use documents with at least this many tokens (default: the largest length)")
    parser.add_argument("--max-docs", type=number(int, min=1), default=1,
                        help="number of documents (default 1; the paper: 10)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each block: 10-20 s to compile, then faster passes (docs/performance.md)")
    parser.add_argument("--out", help="write every number (per document too) and the settings to this JSON file")
    parser.add_argument("--plot", help="write perplexity against length, one line per method, to this image "
                                       "(.png, .pdf, .svg, ...)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    lengths = sorted(set(args.lengths))
    if args.mode == "sliding" and args.stride > lengths[0]:
        raise ValueError(f"--stride ({args.stride}) must not exceed the smallest length ({lengths[0]})")
    parsed_rope = parse_rope_args(args.rope)
    from tools import assets
    check_outputs(args, [("--checkpoint", args.checkpoint),
                         *(("--data", path) for path in args.data or assets.HELD_OUT_BOOKS)])
    print(f"dtype: {dtype_reason(args.dtype, default_device())}", flush=True)
    keep_freed_memory(EVALUATION_REUSES_UP_TO)  # every window allocates the same big tensors: no page faults for them
    start = time.time()
    if args.data is None:
        assets.ensure_books()
        args.data = assets.HELD_OUT_BOOKS
    texts = list(read_documents(document_files(args.data)))
    model, tok, methods = load_evaluated(args, parsed_rope)
    if args.compile:
        compile_blocks(model)
    docs = tokenize(texts, tok, args.min_tokens or lengths[-1], args.max_docs, model.tok_embeddings.weight.device)
    if lengths[-1] > max(len(doc) for _, doc in docs):
        raise ValueError(f"no document has {lengths[-1]} tokens (--lengths); the longest has "
                         f"{max(len(doc) for _, doc in docs)}")
    for label, scaling in methods:
        print(f"{label}: rope_scaling = {json.dumps(scaling)}")
    print(f"{len(docs)} document(s): " + ", ".join(f"{name} ({len(doc)} tokens)" for name, doc in docs), flush=True)

    with LayerProgress(model, forward_passes(docs, methods, lengths, args.mode, args.stride)):
        results = evaluate(model, docs, methods, lengths, args.mode, args.stride)
    write_outputs(args, model, docs, methods, lengths, results, time.time() - start)


if __name__ == "__main__":
    cli(main)
