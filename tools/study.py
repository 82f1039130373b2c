"""The fine-tuning study (docs/study.md): does a short fine-tune extend SmolLM2-135M (trained at 8192 tokens) to 32k,
past the length of its fine-tuning data? The paper's three arms at s = 4, YaRN, PI and NTK-aware, measured before and
after, and the attention temperature of §3.4 on the model without fine-tuning.

    python -m tools.study            # every step below that has not finished yet (hours on 2 CPU cores), then the report
    python -m tools.study --report   # only the report: docs/finetune.json, docs/temperature.json and the figures
    python -m tools.study --list     # the commands, in order

Every number comes from train.py, eval_ppl.py and eval_passkey.py, run with the commands in STEPS. Their reports,
and each fine-tune's run.json and log.jsonl, are kept in docs/study/ (committed: the report is rebuilt from them);
the checkpoints in runs/study/ (not committed). A step whose report exists is skipped; a fine-tune is run again only
when an evaluation that reads its checkpoint is still to do and the checkpoint is gone; an interrupted fine-tune
resumes (--resume). So the study can be stopped and restarted at any point, on any machine. Data: the books of
tools/assets.py, three for fine-tuning and two held out for every evaluation.
"""
import json
import math
import shlex
import statistics
import shutil
import subprocess
import sys
from pathlib import Path

import rope
from common import ArgumentParser, cli, save_plot, write_json
from tools import assets

OUT, RESULTS, DOCS = Path("runs/study"), Path("docs/study"), Path("docs")
TRAIN, HELD_OUT = assets.FINE_TUNING_BOOKS, assets.HELD_OUT_BOOKS  # the default split of train.py and eval_ppl.py
LENGTHS = [4096 * i for i in range(1, 9)]  # 4k .. 32k = 4 x 8192
# s = 4 (8k -> 32k) on 8192-token sequences: a quarter of the target length, as the paper's 128k models were trained
# on 64k sequences. lr: the paper's 2e-5 is for a 7B model over 400 steps; 1e-4 (5x) for a 135M model over 30 steps
# after 5 warm-up steps is a choice, not tuned.
FINE_TUNE = {"--scale": ["4"], "--seq-len": ["8192"], "--batch-size": ["2"], "--steps": ["30"], "--lr": ["1e-4"],
             "--warmup-steps": ["5"], "--save-every": ["5"], "--no-activation-checkpointing": [], "--data": TRAIN}
PPL = ["--data", *HELD_OUT, "--max-docs", "2", "--lengths", *map(str, LENGTHS)]
# one trial at each of 3 depths: a 32k prompt costs ~4 min here (attention is 85% of it), so 3 trials per length
PASSKEY = ["--lengths", "8192", "16384", "32768", "--depths", "0.1", "0.5", "0.9", "--trials", "1"]
# enough to support a conclusion: 12 trials per length (4 keys at each of 3 depths), the same seeded keys for every
# model
PASSKEY_12 = ["--lengths", "8192", "16384", "32768", "--depths", "0.25", "0.5", "0.75", "--trials", "4"]
# PoSE (arXiv 2309.10400): the YaRN run's recipe on 2048-token windows whose positions span s·L = 32k, 8 windows a
# step instead of 2, so the same tokens per step and the same steps
POSE = {"--pose": [], "--seq-len": ["2048"], "--batch-size": ["8"]}
# sqrt(1/t) around the paper's 0.1 ln(s) + 1 (eq. 22): 1.0693 for s = 2, 1.1386 for s = 4; four values at s = 4,
# where each one costs two 32k passes (~9.5 min)
TEMPERATURES = {2: [1.0, 1.035, 1.0693, 1.1, 1.15], 4: [1.0, 1.07, 1.1386, 1.2]}
SWEEP_LENGTHS = {2: [4096, 8192, 12288, 16384], 4: LENGTHS}


def yarn(scale, attention_factor):
    return json.dumps({"rope_type": "yarn", "factor": scale, "attention_factor": attention_factor})


def final(run):
    """The checkpoint a fine-tune writes last, for the evaluations."""
    return OUT / run / "final"


def fine_tune(name, run, rope_type, extra=None):
    """A fine-tune step: its record is the run's log, copied to RESULTS/run once the run has finished; extra's flags
    ({flag: values}) replace or add to FINE_TUNE's, so that each flag is given once."""
    flags = [x for flag, values in {**FINE_TUNE, **(extra or {})}.items() for x in (flag, *values)]
    return {"name": f"fine-tune {name}", "done": RESULTS / run / "log.jsonl", "run": run,
            "command": ["train.py", *flags, "--rope", rope_type, "--out-dir", str(OUT / run), "--resume"]}


def evaluation(name, out, script, *args, reads=None):
    """A step that writes one report, RESULTS/out, with `script` (eval_ppl.py or eval_passkey.py); `reads`: the
    fine-tune whose checkpoint it evaluates."""
    return {"name": name, "done": RESULTS / out, "reads": reads,
            "command": [script, *args, "--out", str(RESULTS / out)]}


def fine_tuned(run):
    return ["--checkpoint", str(final(run)), "--rope", "checkpoint"]


def sweep(scale):
    """The temperature step: perplexity of YaRN at scale `scale` for each attention_factor in TEMPERATURES."""
    return evaluation(f"temperature sweep, s = {scale}", f"temperature-s{scale}.json", "eval_ppl.py",
                      "--rope", *[yarn(scale, a) for a in TEMPERATURES[scale]], "--data", *HELD_OUT,
                      "--max-docs", "2", "--lengths", *map(str, SWEEP_LENGTHS[scale]))


# in order of what the study needs most: the YaRN fine-tune measured before and after first, then the ablations
STEPS = [
    fine_tune("YaRN", "yarn", "yarn"),
    evaluation("perplexity, no fine-tune", "ppl-base.json", "eval_ppl.py",
               "--rope", "default", "linear", "yarn", "--scale", "4", *PPL),
    evaluation("perplexity, YaRN fine-tuned", "ppl-yarn.json", "eval_ppl.py", *fine_tuned("yarn"), *PPL, reads="yarn"),
    evaluation("passkey, YaRN without fine-tuning", "passkey-base.json", "eval_passkey.py",
               "--rope", "yarn", "--scale", "4", *PASSKEY),
    evaluation("passkey, YaRN fine-tuned", "passkey-yarn.json", "eval_passkey.py", *fine_tuned("yarn"), *PASSKEY,
               reads="yarn"),
    sweep(2),
    fine_tune("PI", "pi", "linear"),
    evaluation("perplexity, PI fine-tuned", "ppl-pi.json", "eval_ppl.py", *fine_tuned("pi"), *PPL, reads="pi"),
    sweep(4),
    fine_tune("NTK-aware", "ntk", "ntk"),
    evaluation("perplexity, NTK-aware, no fine-tune", "ppl-base-ntk.json", "eval_ppl.py",
               "--rope", "ntk", "--scale", "4", *PPL),
    evaluation("perplexity, NTK-aware fine-tuned", "ppl-ntk.json", "eval_ppl.py", *fine_tuned("ntk"), *PPL,
               reads="ntk"),
    fine_tune("YaRN + PoSE", "yarn-pose", "yarn", POSE),
    evaluation("perplexity, YaRN + PoSE fine-tuned", "ppl-yarn-pose.json", "eval_ppl.py", *fine_tuned("yarn-pose"),
               *PPL, reads="yarn-pose"),
    evaluation("passkey, 12 per length, YaRN without fine-tuning", "passkey12-base.json", "eval_passkey.py",
               "--rope", "yarn", "--scale", "4", *PASSKEY_12),
    # the YaRN fine-tune made again for the passkey table (the first run's checkpoint was on another machine), with
    # today's code, compiled: its losses against the first run's are in the report ("made_again")
    fine_tune("YaRN, again (compiled)", "yarn-again", "yarn", {"--compile": []}),
    evaluation("passkey, 12 per length, YaRN fine-tuned", "passkey12-yarn.json", "eval_passkey.py",
               *fine_tuned("yarn-again"), *PASSKEY_12, reads="yarn-again"),
    evaluation("passkey, 12 per length, YaRN + PoSE fine-tuned", "passkey12-yarn-pose.json", "eval_passkey.py",
               *fine_tuned("yarn-pose"), *PASSKEY_12, reads="yarn-pose"),
]
RUNS = {"yarn": "YaRN s=4", "pi": "PI s=4", "ntk": "NTK-aware s=4", "yarn-pose": "YaRN + PoSE s=4",
        "yarn-again": "YaRN s=4, again (compiled)"}


def run_steps():
    """Every evaluation not done yet, in order; the fine-tune it reads first, when its checkpoint is not here (a
    fine-tune recorded in RESULTS but run on another machine is run again: same seed, same data)."""
    assets.ensure_books()
    tunes = {step["run"]: step for step in STEPS if "run" in step}
    for step in STEPS:
        needs = tunes.get(step.get("reads"))
        if step["done"].exists():
            print(f"done: {step['name']}")
            continue
        if needs and not (final(needs["run"]) / "config.json").exists():
            run_step(needs)
        run_step(step)


def run_step(step):
    print(f"running: {step['name']}: python {shlex.join(step['command'])}", flush=True)
    if subprocess.run([sys.executable, *step["command"]]).returncode:
        raise ValueError(f"step '{step['name']}' failed; fix what it says, then run the study again to continue")
    if "run" in step:  # keep the record of the run beside the reports
        (RESULTS / step["run"]).mkdir(parents=True, exist_ok=True)
        for name in ("run.json", "log.jsonl"):
            shutil.copy(OUT / step["run"] / name, RESULTS / step["run"] / name)


# ----------------------------------------------------------------------------- the report

def load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def run_log(run):
    path = RESULTS / run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def passkey_by_length(report):
    """{length: {"correct", "trials", "wilson_95", "correct_by_depth"}} over every depth of the one configuration in
    an eval_passkey.py report."""
    (trials,) = report["trials"].values()
    return {L: passkey_counts(by_depth) for L, by_depth in trials.items()}


def passkey_counts(by_depth):
    correct = {depth: sum(t["correct"] for t in cell) for depth, cell in by_depth.items()}
    k, n = sum(correct.values()), sum(map(len, by_depth.values()))
    return {"correct": k, "trials": n, "wilson_95": wilson(k, n), "correct_by_depth": correct}


PPL_ROWS = {"plain RoPE, no fine-tune": ("ppl-base.json", "default"),
            "PI s=4, no fine-tune": ("ppl-base.json", "linear"),
            "NTK-aware s=4, no fine-tune": ("ppl-base-ntk.json", "ntk"),
            "YaRN s=4, no fine-tune": ("ppl-base.json", "yarn"),
            "PI s=4, fine-tuned": ("ppl-pi.json", "checkpoint"),
            "NTK-aware s=4, fine-tuned": ("ppl-ntk.json", "checkpoint"),
            "YaRN s=4, fine-tuned": ("ppl-yarn.json", "checkpoint"),
            "YaRN + PoSE s=4, fine-tuned": ("ppl-yarn-pose.json", "checkpoint")}
PASSKEY_ROWS = {"passkey": {"YaRN s=4, no fine-tune": "passkey-base.json", "YaRN s=4, fine-tuned": "passkey-yarn.json"},
                "passkey_12": {"YaRN s=4, no fine-tune": "passkey12-base.json",
                               "YaRN s=4, fine-tuned": "passkey12-yarn.json",
                               "YaRN + PoSE s=4, fine-tuned": "passkey12-yarn-pose.json"}}


def wilson(k, n, z=1.96):
    """The 95% Wilson score interval of a proportion k/n (it stays inside [0, 1] and is sane at k = 0 or n)."""
    p, z2 = k / n, z * z
    center, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def cost(run):
    """Wall time, median tokens/s and peak memory (where logged) of a fine-tune, from its log."""
    log = run_log(run)
    peaks = [r["peak_memory_bytes"] for r in log if "peak_memory_bytes" in r]
    return {"seconds": sum(r["seconds"] for r in log), "median_tokens_per_s": statistics.median(
        r["tokens_per_s"] for r in log), "peak_memory_bytes": max(peaks) if peaks else None}


def again(run):
    """A fine-tune made twice (same recipe, seed and data; later code, compiled, another machine): how far its losses
    moved."""
    first, second = run_log(run), run_log(f"{run}-again")
    return {"max_loss_difference": max(abs(a["loss"] - b["loss"]) for a, b in zip(first, second)),
            "final_losses": [first[-1]["loss"], second[-1]["loss"]]}


def report():
    files = [*dict.fromkeys(file for file, _ in PPL_ROWS.values()),
             *(file for rows in PASSKEY_ROWS.values() for file in rows.values())]
    evals = {name: load(name) for name in files}  # in a fixed order, so that a rerun writes the same file
    runs = [run for run in RUNS if (RESULTS / run / "log.jsonl").exists()]
    finetune = {
        "commands": [f"python {shlex.join(step['command'])}" for step in STEPS],
        "data": {"fine-tune": TRAIN, "held-out": HELD_OUT}, "reports": str(RESULTS),
        "runs": {run: {"settings": load(f"{run}/run.json"), "cost": cost(run), "log": run_log(run)} for run in runs},
        "made_again": {run: again(run) for run in runs if f"{run}-again" in runs},
        "perplexity": {"lengths": LENGTHS, "models": {model: evals[file]["perplexity"][label] for model, (file, label)
                                                      in PPL_ROWS.items() if evals[file]},
                       "dtypes": {model: evals[file]["settings"]["dtype"] for model, (file, _) in PPL_ROWS.items()
                                  if evals[file]}},
        **{key: {model: passkey_by_length(evals[file]) for model, file in rows.items() if evals[file]}
           for key, rows in PASSKEY_ROWS.items()},
    }
    write_json(DOCS / "finetune.json", finetune)
    temperature = temperature_report()
    write_json(DOCS / "temperature.json", temperature)
    plot(finetune, temperature)
    print(markdown(finetune, temperature))
    print(f"wrote {DOCS / 'finetune.json'}, {DOCS / 'temperature.json'} and the figures in {DOCS}")


def temperature_report():
    temperature = {}
    for scale in (2, 4):
        sweep = load(f"temperature-s{scale}.json")
        if sweep:
            temperature[f"s={scale}"] = {
                "scale": scale, "formula": rope.yarn_attention_factor(scale), "attention_factors": TEMPERATURES[scale],
                "lengths": SWEEP_LENGTHS[scale], "evaluation": sweep,
                "perplexity": {W: [by_length[str(W)] for by_length in sweep["perplexity"].values()]
                               for W in SWEEP_LENGTHS[scale]}}
    return temperature


def markdown(finetune, temperature):
    """The tables of docs/study.md, from the report."""
    lines = ["| model (perplexity, held-out books) | " + " | ".join(f"{W:,}" for W in LENGTHS) + " |",
             "|---" * (len(LENGTHS) + 1) + "|"]
    for model, by_length in finetune["perplexity"]["models"].items():
        lines.append(f"| {model} | " + " | ".join(f"{round(by_length[str(W)], 2):.2f}" for W in LENGTHS) + " |")
    for key, what in (("passkey", "right / trials"), ("passkey_12", "right / trials, 95% Wilson interval")):
        if finetune[key]:
            lengths = next(iter(finetune[key].values()))
            lines += ["", f"| model (passkey: {what}) | " + " | ".join(f"{int(L):,}" for L in lengths) + " |",
                      "|---" * (len(lengths) + 1) + "|"]
        for model, by_length in finetune[key].items():
            cells = [f"{c['correct']} / {c['trials']}" + (f" ({100 * c['wilson_95'][0]:.0f}-"
                                                           f"{100 * c['wilson_95'][1]:.0f}%)") * (key != "passkey")
                     for c in by_length.values()]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if finetune["passkey_12"]:  # the same trials, per depth: how much of a cell's result is its depth, not its keys
        depths = next(iter(next(iter(finetune["passkey_12"].values())).values()))["correct_by_depth"]
        lines += ["", f"| model (passkey: right of 4 at depth {' · '.join(depths)}) | "
                  + " | ".join(f"{int(L):,}" for L in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for model, by_length in finetune["passkey_12"].items():
            lines.append(f"| {model} | " + " | ".join(" · ".join(map(str, c["correct_by_depth"].values()))
                                                      for c in by_length.values()) + " |")
    lines += ["", "| fine-tune | wall time | median tokens/s | peak memory |", "|---|---|---|---|"]
    for run, r in finetune["runs"].items():
        peak = r["cost"]["peak_memory_bytes"]
        lines.append(f"| {RUNS[run]} | {r['cost']['seconds'] / 60:.1f} min | {r['cost']['median_tokens_per_s']:.0f} | "
                     + (f"{peak / 2**30:.2f} GiB" if peak else "not logged") + " |")
    for sweep in temperature.values():
        lines += ["", f"| YaRN s = {sweep['scale']}, attention_factor | "
                  + " | ".join(f"{a:g}" for a in sweep["attention_factors"]) + " |",
                  "|---" * (len(sweep["attention_factors"]) + 1) + "|"]
        for W, row in sweep["perplexity"].items():
            lines.append(f"| perplexity at {W:,} | " + " | ".join(f"{p:.2f}" for p in row) + " |")
    return "\n".join(lines)


COLORS = {"plain": "tab:gray", "PI": "tab:orange", "NTK-aware": "tab:green", "YaRN": "tab:blue", "YaRN +": "tab:purple"}  # one per method; dashed before fine-tuning


def color(model):
    return COLORS["YaRN +"] if "PoSE" in model else COLORS[model.split()[0]]


def plot(finetune, temperature):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run, r in finetune["runs"].items():
        ax.plot([x["step"] for x in r["log"]], [x["loss"] for x in r["log"]], marker=".", color=color(RUNS[run]),
                label=RUNS[run])
    ax.set(xlabel="step (2 sequences of 8192 tokens)", ylabel="training loss", title="fine-tuning SmolLM2-135M")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_plot(fig, DOCS / "finetune_loss.png")

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for model, by_length in finetune["perplexity"]["models"].items():
        ax.plot(LENGTHS, [by_length[str(W)] for W in LENGTHS], "-" if "fine-tuned" in model else "--",
                color=color(model), marker="o", label=model)
    ax.axvline(8192, color="gray", linestyle=":", label="trained context and fine-tuning length (8192)")
    ax.set(xlabel="context length (tokens)", ylabel="perplexity, held-out books (log scale)", yscale="log",
           title="SmolLM2-135M extended to 32k: before and after fine-tuning")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_plot(fig, DOCS / "finetune_ppl.png")

    if temperature:
        fig, axes = plt.subplots(1, len(temperature), figsize=(5.5 * len(temperature), 4), squeeze=False)
        for ax, sweep in zip(axes[0], temperature.values()):
            W = sweep["lengths"][-1]
            ax.plot(sweep["attention_factors"], sweep["perplexity"][W], marker="o", label=f"{W} tokens")
            ax.axvline(sweep["formula"], color="red", linestyle=":", label=f"0.1 ln(s) + 1 = {sweep['formula']:.3f}")
            ax.set(xlabel="attention_factor sqrt(1/t)", ylabel="perplexity, held-out books",
                   title=f"YaRN s = {sweep['scale']}, no fine-tuning")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        save_plot(fig, DOCS / "temperature.png")


def main(argv=None):
    parser = ArgumentParser(__file__, __doc__)
    parser.add_argument("--report", action="store_true", help="only write the report from what runs/study holds")
    parser.add_argument("--list", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    if args.list:
        return print("\n".join(f"# {step['name']}\npython {shlex.join(step['command'])}" for step in STEPS))
    if not args.report:
        run_steps()
    report()


if __name__ == "__main__":
    cli(main)
