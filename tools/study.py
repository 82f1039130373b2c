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
import shlex
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
FINE_TUNE = ["--scale", "4", "--seq-len", "8192", "--batch-size", "2", "--steps", "30", "--lr", "1e-4",
             "--warmup-steps", "5", "--save-every", "5", "--no-activation-checkpointing", "--data", *TRAIN]
PPL = ["--data", *HELD_OUT, "--max-docs", "2", "--lengths", *map(str, LENGTHS)]
# one trial at each of 3 depths: a 32k prompt costs ~4 min here (attention is 85% of it), so 3 trials per length
PASSKEY = ["--lengths", "8192", "16384", "32768", "--depths", "0.1", "0.5", "0.9", "--trials", "1"]
# sqrt(1/t) around the paper's 0.1 ln(s) + 1 (eq. 22): 1.0693 for s = 2, 1.1386 for s = 4; four values at s = 4,
# where each one costs two 32k passes (~9.5 min)
TEMPERATURES = {2: [1.0, 1.035, 1.0693, 1.1, 1.15], 4: [1.0, 1.07, 1.1386, 1.2]}
SWEEP_LENGTHS = {2: [4096, 8192, 12288, 16384], 4: LENGTHS}


def yarn(scale, attention_factor):
    return json.dumps({"rope_type": "yarn", "factor": scale, "attention_factor": attention_factor})


def final(run):
    """The checkpoint a fine-tune writes last, for the evaluations."""
    return OUT / run / "final"


def fine_tune(name, run, rope_type):
    """A fine-tune step: its record is the run's log, copied to RESULTS/run once the run has finished."""
    return {"name": f"fine-tune {name}", "done": RESULTS / run / "log.jsonl", "run": run,
            "command": ["train.py", *FINE_TUNE, "--rope", rope_type, "--out-dir", str(OUT / run), "--resume"]}


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
]


def to_do(step):
    """An evaluation is to do until its report exists; a fine-tune until its log is recorded, or again when an
    evaluation to do reads its checkpoint and the checkpoint is gone."""
    if not step["done"].exists():
        return True
    if "run" in step:
        readers = [s for s in STEPS if s.get("reads") == step["run"] and not s["done"].exists()]
        return bool(readers) and not (final(step["run"]) / "config.json").exists()
    return False


def run_steps():
    assets.ensure_books()
    for step in STEPS:
        if not to_do(step):
            print(f"done: {step['name']}")
            continue
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
    """{length: {"correct", "trials"}} over every depth of the one configuration in an eval_passkey.py report."""
    (trials,) = report["trials"].values()
    return {L: {"correct": sum(t["correct"] for cell in by_depth.values() for t in cell),
                "trials": sum(len(cell) for cell in by_depth.values())} for L, by_depth in trials.items()}


def report():
    ppl = {"plain RoPE, no fine-tune": ("ppl-base.json", "default"), "PI s=4, no fine-tune": ("ppl-base.json", "linear"),
           "NTK-aware s=4, no fine-tune": ("ppl-base-ntk.json", "ntk"),
           "YaRN s=4, no fine-tune": ("ppl-base.json", "yarn"), "PI s=4, fine-tuned": ("ppl-pi.json", "checkpoint"),
           "NTK-aware s=4, fine-tuned": ("ppl-ntk.json", "checkpoint"),
           "YaRN s=4, fine-tuned": ("ppl-yarn.json", "checkpoint")}
    files = dict.fromkeys([*(file for file, _ in ppl.values()), "passkey-base.json", "passkey-yarn.json"])
    evals = {name: load(name) for name in files}  # in a fixed order, so that a rerun writes the same file
    finetune = {
        "commands": [f"python {shlex.join(step['command'])}" for step in STEPS],
        "data": {"fine-tune": TRAIN, "held-out": HELD_OUT},
        "runs": {run: {"settings": load(f"{run}/run.json"), "log": run_log(run)} for run in ("yarn", "pi", "ntk")
                 if (RESULTS / run / "log.jsonl").exists()},
        "perplexity": {"lengths": LENGTHS, "models": {model: evals[file]["perplexity"][label] for model, (file, label)
                                                      in ppl.items() if evals[file]}},
        "passkey": {model: passkey_by_length(evals[file]) for model, file in
                    (("YaRN s=4, no fine-tune", "passkey-base.json"), ("YaRN s=4, fine-tuned", "passkey-yarn.json"))
                    if evals[file]},
        "evaluations": evals,
    }
    write_json(DOCS / "finetune.json", finetune)
    temperature = {}
    for scale in (2, 4):
        sweep = load(f"temperature-s{scale}.json")
        if sweep:
            temperature[f"s={scale}"] = {
                "scale": scale, "formula": rope.yarn_attention_factor(scale), "attention_factors": TEMPERATURES[scale],
                "lengths": SWEEP_LENGTHS[scale], "evaluation": sweep,
                "perplexity": {W: [by_length[str(W)] for by_length in sweep["perplexity"].values()]
                               for W in SWEEP_LENGTHS[scale]}}
    write_json(DOCS / "temperature.json", temperature)
    plot(finetune, temperature)
    print(markdown(finetune, temperature))
    print(f"wrote {DOCS / 'finetune.json'}, {DOCS / 'temperature.json'} and the figures in {DOCS}")


def markdown(finetune, temperature):
    """The README's tables, from the report."""
    lines = ["| model (perplexity, held-out books) | " + " | ".join(f"{W:,}" for W in LENGTHS) + " |",
             "|---" * (len(LENGTHS) + 1) + "|"]
    for model, by_length in finetune["perplexity"]["models"].items():
        lines.append(f"| {model} | " + " | ".join(f"{round(by_length[str(W)], 2):.2f}" for W in LENGTHS) + " |")
    lines += ["", "| model (passkey: right / trials) | " + " | ".join(f"{int(L):,}" for L in PASSKEY[1:4]) + " |",
              "|---|---|---|---|"]
    for model, by_length in finetune["passkey"].items():
        lines.append(f"| {model} | " + " | ".join(f"{c['correct']} / {c['trials']}" for c in by_length.values()) + " |")
    for sweep in temperature.values():
        lines += ["", f"| YaRN s = {sweep['scale']}, attention_factor | "
                  + " | ".join(f"{a:g}" for a in sweep["attention_factors"]) + " |",
                  "|---" * (len(sweep["attention_factors"]) + 1) + "|"]
        for W, row in sweep["perplexity"].items():
            lines.append(f"| perplexity at {W:,} | " + " | ".join(f"{p:.2f}" for p in row) + " |")
    return "\n".join(lines)


COLORS = {"plain": "tab:gray", "PI": "tab:orange", "NTK-aware": "tab:green", "YaRN": "tab:blue"}  # one per method; dashed before fine-tuning


def plot(finetune, temperature):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run, label in (("yarn", "YaRN s=4"), ("pi", "PI s=4"), ("ntk", "NTK-aware s=4")):
        if run not in finetune["runs"]:
            continue
        log = finetune["runs"][run]["log"]
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], marker=".", color=COLORS[label.split()[0]],
                label=label)
    ax.set(xlabel="step (2 sequences of 8192 tokens)", ylabel="training loss", title="fine-tuning SmolLM2-135M")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_plot(fig, DOCS / "finetune_loss.png")

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for model, by_length in finetune["perplexity"]["models"].items():
        ax.plot(LENGTHS, [by_length[str(W)] for W in LENGTHS], "-" if "fine-tuned" in model else "--",
                color=COLORS[model.split()[0]], marker="o", label=model)
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
