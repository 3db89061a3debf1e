"""The docs name things that exist: files cited in the README, docs/ and the code's docstrings,
and the metrics record kinds that harness/metrics.py documents."""

from __future__ import annotations

import ast
import re

from conftest import REPO

CODE = ("harness", "launchers", "models", "bench")
ROOTS = ("configs", "docs", "tests", "harness", "launchers", "slurm", "bench", "models",
         "scripts", "third_party")
EXTENSIONS = ("py", "toml", "md", "sh", "sbatch", "jsonl", "txt", "cfg", "patch")
# a repository path with a file extension (a glob is allowed), or a bare Markdown file name
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(ROOTS)})/[\w./*-]*\.(?:{'|'.join(EXTENSIONS)}))\b")
MARKDOWN = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")
WRITTEN_BY_THE_HARNESS = {"report.md"}         # an output, not a file of the repository


def docstrings(path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [n for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n".join(d for d in map(ast.get_docstring, nodes) if d)


def cited_texts() -> dict[str, str]:
    texts = {p.relative_to(REPO).as_posix(): p.read_text()
             for p in [REPO / "README.md", *sorted(REPO.glob("docs/*.md"))]}
    for root in CODE:
        for p in sorted((REPO / root).rglob("*.py")):
            texts[p.relative_to(REPO).as_posix()] = docstrings(p)
    return texts


def test_every_file_the_docs_cite_exists():
    missing = []
    for where, text in cited_texts().items():
        for path in PATH.findall(text):
            if not (list(REPO.glob(path)) if "*" in path else (REPO / path).exists()):
                missing.append(f"{where}: {path}")
        for name in set(MARKDOWN.findall(text)) - WRITTEN_BY_THE_HARNESS:
            if not list(REPO.glob(f"**/{name}")):
                missing.append(f"{where}: {name}")
    assert not missing, "cited but not in the repository:\n" + "\n".join(missing)


def test_the_metrics_record_kinds_documented_are_the_ones_written():
    from harness import metrics

    documented = set(re.findall(r"^\* ``(\w+)``:", metrics.__doc__, re.M))
    written = set()
    for p in (REPO / "harness").rglob("*.py"):
        written |= set(re.findall(r"\bmetrics\.write\(\s*\"(\w+)\"", p.read_text()))
    assert documented == written, (f"documented, never written: {documented - written}; "
                                   f"written, not documented: {written - documented}")


# the raw records whose tables docs/benchmarks.md quotes as its current ones (the other files in
# docs/bench-data are earlier runs that its prose cites by figure)
QUOTED_RECORDS = ("allreduce", "allreduce_target", "overhead", "overhead_5523cb6",
                  "overhead_a49c5ac", "overhead_1ad7a8a", "scaling", "async_sync", "fusion",
                  "main_job", "main_job_5523cb6", "main_job_1ad7a8a", "main_job_patch0007",
                  "allreduce_flat", "peers", "peers_5526f9b", "compression", "threads", "paths")
# earlier runs (cited by figure), and records that are not benchmark tables
NOT_TABULATED = ("allreduce_flat_patch0004", "allreduce_flat_patch0007",
                 "allreduce_flat_edf08c0", "main_job_cycle20",
                 "main_job_patch0004", "overhead_patch0004", "peers_a6aa353", "peers_edf08c0",
                 "peers_1ad7a8a", "peers_cycle20", "peers_gpt", "paths_5523cb6", "elastic",
                 "gpt_compare",
                 "suite_times", "task_api_ab", "wake_ab")


def test_the_benchmark_tables_are_the_ones_their_raw_records_render():
    """docs/benchmarks.md says every table is ``python -m bench.render`` of its raw records:
    each row rendered from those files is a line of the document, word for word."""
    from bench.render import main as render

    doc = set((REPO / "docs" / "benchmarks.md").read_text().splitlines())
    files = {p.stem for p in (REPO / "docs" / "bench-data").glob("*.jsonl")}
    assert files == set(QUOTED_RECORDS) | set(NOT_TABULATED), \
        "a raw-record file to add to QUOTED_RECORDS or NOT_TABULATED: " + \
        ", ".join(sorted(files ^ (set(QUOTED_RECORDS) | set(NOT_TABULATED))))
    missing = []
    for name in QUOTED_RECORDS:
        rows = [line for line in render([str(REPO / "docs" / "bench-data" / f"{name}.jsonl")])
                .splitlines() if line.startswith("| ")]
        assert rows, name
        missing += [f"{name}.jsonl: {row}" for row in rows if row not in doc]
    assert not missing, "\n".join(missing)
