"""Every kind of .tex the harness writes compiles with pdflatex: Table 2 (compare), the ablation,
the sensitivity grid, Table 3 (robustness), tuning.tex and each study's top_trials.tex, from one
tiny `harness paper` run (all stages) on a synthetic file whose name has an underscore, so the
study names, captions and row labels carry LaTeX specials. Each table goes into a minimal
document with booktabs as its only package: the tables need no other. Skips without pdflatex
(Debian: texlive-latex-recommended; .ci/run installs it)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli

pytestmark = pytest.mark.skipif(shutil.which("pdflatex") is None,
                                reason="pdflatex not installed (Debian texlive-latex-recommended)")

# test_paper.py's tiny budget: 2 models, 2 trials of at most 2 epochs, a 1-cell sensitivity grid
TINY = ["--models", "sasrec,igr-sr", "--trials", "2", "--epochs", "2", "--min-epochs", "1", "--lr-trials", "1",
        "--seeds", "1", "--final-epochs", "2", "--patience", "1", "--k", "2", "--m", "1",
        "--robustness-models", "sasrec", "--lid-epochs", "1", "--device", "cpu", "--no-bench"]
STEM = "tiny_set"  # an underscore in every study name, caption and dataset label

# each kind of .tex, relative to the paper's output folder
KINDS = {
    "compare": f"paper-compare-{STEM}.tex",
    "ablate": f"paper-ablate-{STEM}.tex",
    "sensitivity": f"paper-sensitivity-{STEM}.tex",
    "robustness": f"paper-robustness-{STEM}.tex",
    "tuning": "tuning.tex",
    "top_trials": f"tune/paper-igr-sr-{STEM}/top_trials.tex",  # parameters d_l, cross_dropout, ...
    "top_trials-sasrec": f"tune/paper-sasrec-{STEM}/top_trials.tex",
}


@pytest.fixture(scope="module")
def paper_out(tmp_path_factory) -> Path:
    """One `harness paper` run through every stage; its output folder."""
    from harness.data.sequences import write_sequences
    from harness.data.synthetic import SyntheticSpec, generate

    root = tmp_path_factory.mktemp("latex")
    data = root / f"{STEM}.txt"
    write_sequences(data, generate(SyntheticSpec(users=60, items=40, intents=4, mean_length=10, seed=1)))
    # --cache-dir explicitly: a module-scoped run starts before conftest's per-test cache is set
    r = CliRunner().invoke(cli, ["--results-dir", str(root / "res"), "--cache-dir", str(root / "cache"), "paper",
                                 "--dataset", str(data), "--storage", str(root / "s.journal"), *TINY],
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    return root / "res" / "paper" / STEM


def compile_tex(table: str, where: Path) -> subprocess.CompletedProcess:
    where.mkdir(parents=True, exist_ok=True)
    (where / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                   + table + "\n\\end{document}\n")
    return subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=where,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_table_compiles(paper_out, kind, tmp_path):
    tex = (paper_out / KINDS[kind]).read_text()
    assert "\\begin{tabular}" in tex and "\\bottomrule" in tex, kind
    assert not re.search(r"\\midrule\s*\\midrule|\\cline|\\midrule\s*\\bottomrule", tex), tex
    proc = compile_tex(tex, tmp_path)
    assert proc.returncode == 0, f"{kind}:\n{proc.stdout[-3000:]}"
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_top_trials_escape_the_parameter_names(paper_out):
    tex = (paper_out / KINDS["top_trials"]).read_text()
    header = next(line for line in tex.splitlines() if line.startswith("trial & "))
    assert r"d\_l" in header and r"cross\_dropout" in header and "_" not in header.replace(r"\_", "")
    body = tex[tex.index("\\midrule"):tex.index("\\bottomrule")]
    assert body.count("\\midrule") == 1  # under the header only: one row per trial, no group rules
    assert f"paper-igr-sr-{STEM.replace('_', chr(92) + '_')}" in tex  # the study name in the caption


def test_every_tex_the_pipeline_writes_is_compiled_here(paper_out, tmp_path):
    """A new .tex (a new kind, a new report file) is compiled too: the lr studies' top trials
    here, and anything not in KINDS."""
    known = {paper_out / p for p in KINDS.values()}
    others = sorted(p for p in paper_out.rglob("*.tex") if p not in known)
    assert others, "the ablation's lr studies write top_trials.tex too"
    failed = {}
    for i, path in enumerate(others):
        proc = compile_tex(path.read_text(), tmp_path / str(i))
        if proc.returncode != 0:
            failed[str(path.relative_to(paper_out))] = proc.stdout[-1500:]
    assert not failed, failed
