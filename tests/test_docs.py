"""The README and docs/ against the code and the numbers the scripts wrote: links that point where they say, tables
that equal the JSON files beside them, a README short enough to be the front door, and a repository that needs
nothing outside itself."""
import json
import re
import subprocess
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text()
PAGES = {path: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
STUDY = (ROOT / "docs" / "study.md").read_text()


def test_reading_order_links_point_at_the_definitions_they_name():
    links = re.findall(r"\[`([\w.]+)`\]\((\w+\.py)#L(\d+)\)", README)
    assert len(links) >= 15
    for name, file, line in links:
        text = (ROOT / file).read_text().splitlines()[int(line) - 1]
        assert re.match(rf"\s*(def|class) {name.split('.')[-1]}\b", text), f"{file}#L{line} is {text!r}, not {name}"


def test_the_repository_stands_alone():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for file in files:
        if file.endswith((".py", ".md", ".txt", ".ini")) and file != "tests/test_docs.py":
            text = (ROOT / file).read_text()
            assert "../shared" not in text and not re.search(r"\bSPEC\b", text), file


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 200


def test_relative_links_point_at_files_that_exist():
    for path, text in PAGES.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            file = target.split("#")[0]
            assert (path.parent / file).resolve().exists(), f"{path.relative_to(ROOT)} links to {target}"


def markdown_table(text, heading):
    """The rows of the first table after `heading` in `text` (a page's markdown), as lists of cells."""
    section = text[text.index(heading):]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    start = section.splitlines().index(lines[0])
    rows = []
    for line in section.splitlines()[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("*") for cell in line.strip("|").split("|")])
    return rows[0], [row for row in rows[2:]]


def numbers(cell):
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", cell.replace(",", ""))]


def test_the_main_tables_are_what_eval_ppl_wrote():
    for file, dtype in [("ppl.json", "bf16"), ("ppl_fp32.json", "float32")]:  # what --dtype auto picks, either way
        report = json.loads((ROOT / "docs" / file).read_text())
        assert report["settings"]["dtype"] == {"bf16": "bfloat16", "float32": "float32"}[dtype]
        header, rows = markdown_table(README, f"| method (perplexity, {dtype}) |")
        lengths = [int(h) for h in header[1:]]
        assert lengths == report["settings"]["lengths"]
        assert len(rows) == len(report["perplexity"])
        for row, by_length in zip(rows, report["perplexity"].values()):
            assert [numbers(cell)[0] for cell in row[1:]] == [round(by_length[str(W)], 2) for W in lengths], row


def test_the_amx_bf16_sentence_is_what_eval_ppl_wrote():
    amx, table = (json.loads((ROOT / "docs" / f).read_text())["perplexity"] for f in ("ppl_bf16_amx.json", "ppl.json"))
    moved = max(abs(amx[m][W] / table[m][W] - 1) for m in table for W in table[m])
    assert f"every cell moves by up to {100 * moved:.2f}% from this table" in " ".join(README.split())
    assert f"moves by up to {100 * moved:.3f}% between the two kinds" in " ".join(STUDY.split())
    for method, cells in (("plain RoPE", amx["default"]), ("YaRN", amx["yarn"])):
        values = list(cells.values())
        assert f"{method} {values[0]:.2f}, {values[1]:.2f} ... {values[-1]:.2f}" in " ".join(README.split())


def test_the_fine_tuning_tables_are_what_the_study_wrote():
    finetune = json.loads((ROOT / "docs" / "finetune.json").read_text())
    header, rows = markdown_table(STUDY, "### Perplexity before and after")
    lengths = [int(h.replace(",", "")) for h in header[1:]]
    assert lengths == finetune["perplexity"]["lengths"]
    models = finetune["perplexity"]["models"]
    assert [row[0] for row in rows] == list(models)
    for row in rows:
        assert [numbers(cell)[0] for cell in row[1:]] == [round(models[row[0]][str(W)], 2) for W in lengths], row
    header, rows = markdown_table(STUDY, "### Passkey retrieval before and after")
    for row in rows:
        by_length = finetune["passkey"][row[0]]
        assert [numbers(cell)[:2] for cell in row[1:]] == [[by_length[L]["correct"], by_length[L]["trials"]]
                                                          for L in by_length], row
    header, rows = markdown_table(STUDY, "| model (passkey: right / trials, 95% Wilson interval) |")
    assert [row[0] for row in rows] == list(finetune["passkey_12"])
    for row in rows:
        cells = finetune["passkey_12"][row[0]].values()
        assert [numbers(cell.replace("-", " ")) for cell in row[1:]] == \
               [[c["correct"], c["trials"], round(100 * c["wilson_95"][0]), round(100 * c["wilson_95"][1])]
                for c in cells], row
    assert list(finetune["runs"])[:3] == ["yarn", "pi", "ntk"] and set(finetune["runs"]) <= {"yarn", "pi", "ntk",
                                                                                              "yarn-pose", "yarn-again"}
    for run in finetune["runs"].values():  # every finished run, each step of it
        assert [r["step"] for r in run["log"]] == list(range(1, run["settings"]["steps"] + 1))
    header, rows = markdown_table(STUDY, "| fine-tune | wall time |")
    assert [[numbers(row[1])[0], numbers(row[2])[0]] for row in rows] == \
           [[round(r["cost"]["seconds"] / 60, 1), round(r["cost"]["median_tokens_per_s"])]
            for r in finetune["runs"].values()]
    temperature = json.loads((ROOT / "docs" / "temperature.json").read_text())
    assert list(temperature) == ["s=2", "s=4"]
    for sweep in temperature.values():
        header, rows = markdown_table(STUDY, f"| YaRN s = {sweep['scale']}, attention_factor |")
        assert [float(h) for h in header[1:]] == sweep["attention_factors"]
        assert [[round(p, 2) for p in row] for row in sweep["perplexity"].values()] == \
               [[numbers(cell)[0] for cell in row[1:]] for row in rows]


def test_every_test_the_docs_name_exists():
    named = {name for text in PAGES.values() for name in re.findall(r"`(test_\w+)`", text)}
    defined = {name for path in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert len(named) >= 15 and named <= defined, named - defined


def test_the_gpu_tables_are_what_gpu_check_wrote():
    """docs/performance.md's H200 tables: each row's tokens/s and ratio are those of the JSON its section names (the
    compiled table's cells hold the two compiled runs, in order, where both measured the case)."""
    page = (ROOT / "docs" / "performance.md").read_text()
    runs = {name: json.loads((ROOT / "docs" / "speed" / f"gpu_check_{name}.json").read_text())["bench"]["results"]
            for name in ("eager", "compiled", "compiled_32k")}

    def measured(run, shape, case):
        rows = [r for r in runs[run] if r["shape"] == shape and f"{r['case']} {r['tokens'] // 1024}k" == case.split("+")[0]]
        key = "decode_tokens_per_s" if rows and rows[0]["case"] == "decode" else "tokens_per_s"
        return [(r["ours"][key], r["hf"][key]) for r in rows if key in r["ours"] and key in r["hf"]]

    for heading, names in (("### Eager, what the scripts run", ["eager"]),
                           ("### Compiled: `--compile`", ["compiled", "compiled_32k"])):
        _, rows = markdown_table(page, heading)
        assert len(rows) >= 8
        for shape, case, ours, hf, ratio, *_ in rows:
            expected = [m for name in names for m in measured(name, shape, case)]
            if "failed" in ours or "out of memory" in hf:
                continue
            assert list(zip(numbers(ours), numbers(hf))) == [(round(o), round(h)) for o, h in expected], (shape, case)
            assert numbers(ratio) == [round(o / h, 2) for o, h in expected], (shape, case)


def test_every_python_block_in_the_docs_runs():
    """Each ```python block of README.md and docs/*.md, run as a reader would, from the repository root (the default
    checkpoint converted first, as the quick start does): a renamed function cannot leave a stale example behind."""
    from convert_llama import default_checkpoint

    default_checkpoint()
    blocks = [(path, block) for path, text in PAGES.items() for block in re.findall(r"```python\n(.*?)```", text, re.S)]
    assert blocks
    for path, block in blocks:
        run = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{path.relative_to(ROOT)}:\n{block}\n{run.stderr[-2000:]}"
