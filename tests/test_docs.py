"""The README and docs/ against the code and the numbers the scripts wrote: links that point where they say, tables
that equal the JSON files beside them, and a repository that needs nothing outside itself."""
import json
import re
import subprocess

from conftest import ROOT

README = (ROOT / "README.md").read_text()


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


def markdown_table(heading):
    """The rows of the first table after `heading` in the README, as lists of cells."""
    section = README[README.index(heading):]
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


def test_the_main_table_is_what_eval_ppl_wrote():
    report = json.loads((ROOT / "docs" / "ppl.json").read_text())
    header, rows = markdown_table("## Results on a real model")
    lengths = [int(h) for h in header[1:]]
    assert lengths == report["settings"]["lengths"]
    assert len(rows) == len(report["perplexity"])
    for row, by_length in zip(rows, report["perplexity"].values()):
        assert [numbers(cell)[0] for cell in row[1:]] == [round(by_length[str(W)], 2) for W in lengths], row


def test_the_fine_tuning_tables_are_what_the_study_wrote():
    finetune = json.loads((ROOT / "docs" / "finetune.json").read_text())
    header, rows = markdown_table("### Perplexity before and after")
    lengths = [int(h.replace(",", "")) for h in header[1:]]
    assert lengths == finetune["perplexity"]["lengths"]
    models = finetune["perplexity"]["models"]
    assert [row[0] for row in rows] == list(models)
    for row in rows:
        assert [numbers(cell)[0] for cell in row[1:]] == [round(models[row[0]][str(W)], 2) for W in lengths], row
    header, rows = markdown_table("### Passkey retrieval before and after")
    for row in rows:
        by_length = finetune["passkey"][row[0]]
        assert [numbers(cell)[:2] for cell in row[1:]] == [[by_length[L]["correct"], by_length[L]["trials"]]
                                                          for L in by_length], row
    assert list(finetune["runs"]) == ["yarn", "pi"]
    for run in finetune["runs"].values():  # every finished run, each step of it
        assert [r["step"] for r in run["log"]] == list(range(1, run["settings"]["steps"] + 1))
    temperature = json.loads((ROOT / "docs" / "temperature.json").read_text())
    assert list(temperature) == ["s=2", "s=4"]
    for sweep in temperature.values():
        header, rows = markdown_table(f"| YaRN s = {sweep['scale']}, attention_factor |")
        assert [float(h) for h in header[1:]] == sweep["attention_factors"]
        assert [[round(p, 2) for p in row] for row in sweep["perplexity"].values()] == \
               [[numbers(cell)[0] for cell in row[1:]] for row in rows]


def test_every_test_the_readme_names_exists():
    named = set(re.findall(r"`(test_\w+)`", README))
    defined = {name for path in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert len(named) >= 15 and named <= defined, named - defined
