"""Every fenced command of README.md and docs/*.md that runs one of our tools works as written
(issue #22): it starts with the virtualenv's Python (``.venv/bin/python``, or ``.venv/bin/torchrun``
/ ``srun ... .venv/bin/python``; a bare ``python`` ends in "No module named 'resnext_det'"), the
tool's own parser accepts its flags, and the configs it names exist in the repository (or are
written by a run: ``output/...``). The README's own runs are exercised end to end in
tests/test_first_hour.py; this file covers every document.
"""
import glob
import os
import re
import shlex

import pytest

from test_first_hour import expand_smoke, parse_with_the_tools_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
TOOL = re.compile(r"(?<![\w/.])((?:tools|datasets)/[\w-]+\.py)\b")
LAUNCHERS = (".venv/bin/python", ".venv/bin/torchrun")


def _blocks(path):
    text = open(path).read()
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def _commands(path):
    """(line, launcher words, script, argv) of every line of a bash or plain fenced block that
    runs ``tools/X.py`` or ``datasets/X.py`` (continuation lines joined; comments dropped)."""
    out = []
    for lang, body in _blocks(path):
        if lang not in ("", "bash"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = TOOL.search(line)
            if not m or not re.match(r"^(\S+/)?(python\S*|torchrun|srun|make)\b|^\.venv/", line.split("#")[0].strip() or "#"):
                continue
            out.append((line, line[: m.start()].split(), m.group(1), shlex.split(line[m.end():], comments=True)))
    return out


ALL = [(os.path.relpath(p, ROOT), c) for p in DOCS for c in _commands(p)]


def test_the_documents_have_tool_commands():
    names = {doc for doc, _ in ALL}
    assert len(ALL) >= 40 and {"README.md", "docs/cluster.md", "docs/deploy.md", "docs/appendix_b.md"} <= names


@pytest.mark.parametrize("doc, command", ALL, ids=[f"{d}:{c[2]}:{i}" for i, (d, c) in enumerate(ALL)])
def test_a_documented_command_runs_as_written(doc, command):
    line, launcher, script, argv = command
    assert any(w.endswith(LAUNCHERS) for w in launcher), (
        f"{doc}: `{line}` runs {script} with {' '.join(launcher) or 'nothing'}: use .venv/bin/python "
        "(a bare python has no resnext_det)"
    )
    assert not any(w in ("python", "python3") for w in launcher), f"{doc}: `{line}` uses a bare python"
    assert os.path.isfile(os.path.join(ROOT, script)), f"{doc}: {script} does not exist"
    if re.search(r"\s\[-", line):
        return  # a synopsis (`[--flag ...]`), not a command to paste
    try:
        args = parse_with_the_tools_parser(script, expand_smoke(argv) if doc == "README.md" else argv)
    except ModuleNotFoundError as e:
        if e.name != "mutmut":
            raise
        pytest.skip(f"{script} needs mutmut, which `make mutants` installs on first use")
    config = getattr(args, "config_file", None)
    written = re.findall(r"--config-out\s+(\S+)", open(os.path.join(ROOT, doc)).read())  # made by a command there
    if config and "..." not in config and not config.startswith(("output/", "$")) and config not in written:
        assert os.path.isfile(os.path.join(ROOT, config)), f"{doc}: `{line}` names {config}, which does not exist"


# The troubleshooting table quotes messages: each quoted phrase is said by the code today.
TROUBLESHOOTING_PHRASES = [
    "cannot download", "its annotation file", "is not a config key: did you mean", "image files its json",
    "CUDA device(s)", "their random initialisation", "does not match the config", "resume with another solver",
    "file system all nodes share", "a collective failed because", "was written but not verified",
    "Stopped at a safe point",
]  # fmt: skip


@pytest.mark.parametrize("phrase", TROUBLESHOOTING_PHRASES)
def test_the_troubleshooting_table_quotes_what_the_code_says(phrase):
    table = " ".join(open(os.path.join(ROOT, "docs", "troubleshooting.md")).read().split())
    assert phrase in table
    sources = [p for folder in ("resnext_det", "tools") for p in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)]
    assert any(phrase in re.sub(r'"\s*\n\s*f?"', "", open(p).read()) for p in sources), phrase
