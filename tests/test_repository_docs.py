"""Facts the documents state about the repository, checked against it: one version, every results folder indexed
in benchmarks/README.md, and the method document that the code cites."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_version(pyproject_text: str) -> str:
    """The ``version`` of pyproject.toml's [project] table (tomllib is 3.11+, the package supports 3.10)."""
    section = re.search(r"^\[project\]\n(.*?)(?=^\[|\Z)", pyproject_text, re.DOTALL | re.MULTILINE)
    assert section, "pyproject.toml has no [project] table"
    match = re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.MULTILINE)
    assert match, "pyproject.toml's [project] table has no version"
    return match.group(1)


def test_package_version_is_the_bundle_version():
    meta = json.loads((ROOT / "bundle/configs/metadata.json").read_text())
    assert project_version((ROOT / "pyproject.toml").read_text()) == meta["version"]
    assert meta["version"] in meta["changelog"], "metadata.json's version has no changelog entry"


def test_project_version_reads_the_project_table_only():
    text = '[build-system]\nversion = "9"\n[project]\nname = "x"\nversion = "1.2.3"\n[tool.x]\nversion = "8"\n'
    assert project_version(text) == "1.2.3"


def test_every_results_folder_is_indexed_in_benchmarks_readme():
    index = (ROOT / "benchmarks/README.md").read_text()
    results = ROOT / "benchmarks/results"
    missing = [p.name for p in sorted(results.iterdir()) if p.is_dir() and f"results/{p.name}/" not in index]
    assert not missing, f"benchmarks/README.md does not name these benchmarks/results folders: {missing}"
    files = [p.name for p in sorted(results.iterdir()) if p.is_file() and f"results/{p.name}" not in index]
    assert not files, f"benchmarks/README.md does not name these benchmarks/results files: {files}"


def test_cited_method_document_ships_with_its_sections():
    method = (ROOT / "bundle/docs/METHOD.md").read_text()
    for heading in ("## Round 0", "## Rounds", "## Optional step"):
        assert heading in method, f"bundle/docs/METHOD.md lacks the section '{heading}' that the code cites"
    cited = [p for p in (ROOT / "bundle/scripts").glob("*.py") if "METHOD.md" in p.read_text()]
    assert cited, "no module cites METHOD.md any more: drop this test or the document"


README_COMMANDS = (  # CI (.ci/run) runs the second one; changing either breaks the promise of the README
    "pip install -e . && cd bundle && python -m monai.bundle run --config_file configs/medsmile.json",
    'pip install -e ".[test,deploy]" && python -m pytest -q tests',
)


def test_root_readme_is_short_and_keeps_its_two_commands():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150)"
    long = [i for i, line in enumerate(lines, 1) if len(line) > 200]
    assert not long, f"README.md lines over 200 characters: {long}"
    assert not re.search(r"\b(commit|at) `?[0-9a-f]{7,40}\b", text), "README.md names a commit hash"
    for command in README_COMMANDS:
        assert command in lines, f"README.md lost the command line: {command}"


def test_root_readme_layout_names_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    words = set(re.findall(r"[\w.]+", layout))
    modules = [
        p
        for folder in ("bundle/scripts", "bundle/deploy", "benchmarks")
        for p in sorted((ROOT / folder).glob("*.py"))
        if p.stem != "__init__"
    ]
    missing = [str(p.relative_to(ROOT)) for p in modules if p.stem not in words]
    assert not missing, f"README.md's Layout section does not name: {missing}"


def test_model_card_is_short_and_its_results_come_from_the_linked_files():
    card = (ROOT / "bundle/docs/README.md").read_text()
    assert len(card.split()) <= 1500, f"the model card has {len(card.split())} words (at most 1500)"
    assert "## MONAI Bundle Commands" in card
    for command in ("run suggest", "configs/inference.json", "configs/evaluate.json", "ckpt_export", "start_server"):
        assert command in card, f"the model card's commands lack {command}"
    links = dict(re.findall(r"^\[(\w)\]: (\S+)$", card, re.MULTILINE))
    folders = {k: (ROOT / "bundle/docs" / v).resolve() for k, v in links.items()}
    assert folders and all(f.is_dir() for f in folders.values()), f"dead result links: {links}"
    header = next(line for line in card.splitlines() if line.startswith("| test split |"))
    columns = [re.search(r"\]\[(\w)\]", cell) for cell in header.strip("|").split("|")]
    rows = re.findall(r"^\| (Kvasir-SEG|CVC-ClinicDB|ISIC 2017|BUSI \(malignant\)) \|(.*)\|$", card, re.MULTILINE)
    assert len(rows) == 4
    for split, cells in rows:
        for i, cell in enumerate(cells.split("|"), start=1):
            # round 0 (column 1) is read from the defaults' folder, the column after it
            link = columns[i] or columns[i + 1]
            text = "".join(p.read_text() for p in folders[link.group(1)].glob("*.md"))
            assert cell.strip() in text, f"{split}: '{cell.strip()}' is not in {folders[link.group(1)]}"
