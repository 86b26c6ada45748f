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
