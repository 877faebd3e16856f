"""Every code block of the documentation (docs/*.md and README.md) runs or is checked:

* ``python`` blocks are executed, a page's blocks in order in one namespace (as a reader pastes them);
* ``bash`` blocks: each command line is checked: a ``make`` target exists in the Makefile, a ``train.py`` /
  ``python -m align.train`` line parses with its overrides (``--print_config``), a ``scripts/`` script exists and
  takes the options given, ``pip install`` names extras that exist; any other command fails the test;
* ``yaml`` and ``json`` blocks parse; ``text`` blocks are output or file trees and are not run.

The site itself builds with ``mkdocs build --strict`` (``make docs``, in CI); a slow test runs it here too.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from align.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI.s args parameter")

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SHELL = {"bash", "sh", "shell", "console"}
LANGUAGES = {"python", "yaml", "json", "text", *SHELL}
#: commands the docs may show that are not ours to run here (they need a login, a cluster, a browser or files of
#: the reader's own)
OTHER_TOOLS = {"wandb", "tensorboard", "mkdocs", "git", "cd", "export", "ls", "cat", "mkdir", "chromium", "xdg-open",
               "open", "nvidia-smi", "apt-get"}
LAUNCHERS = {"srun", "torchrun"}


def blocks(page: Path) -> list[tuple[str, str]]:
    found = []
    for match in FENCE.finditer(page.read_text()):
        indent = match["indent"]
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line
                         for line in match["body"].splitlines())
        found.append((match["lang"], body))
    return found


def commands(body: str) -> list[str]:
    """Logical command lines of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_block_names_a_language_this_test_knows(page):
    unknown = [lang for lang, _ in blocks(page) if lang not in LANGUAGES]
    assert not unknown, f"{page_id(page)}: code blocks in {unknown}; use one of {sorted(LANGUAGES)}"


def _fake_atlases(folder: Path) -> None:
    """``atlas/`` and ``compare/`` in the atlas format (the atlas tests' fake atlases), for the re-rendering example."""
    sys.path.insert(0, str(ROOT / "tests" / "explain" / "atlas"))
    try:
        from fake_atlas import write_fake_atlas, write_fake_comparison
    finally:
        sys.path.pop(0)
    write_fake_atlas(folder / "atlas")
    write_fake_atlas(folder / "atlas_b", seed=1)
    write_fake_comparison(folder / "compare", folder / "atlas", folder / "atlas_b")


#: what a page's python blocks expect on disk before they run (in the test's working folder)
SETUP = {"docs/atlas-site.md": _fake_atlases}

PYTHON_PAGES = [page for page in PAGES if any(lang == "python" for lang, _ in blocks(page))]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__"}
    if page_id(page) in SETUP:
        SETUP[page_id(page)](tmp_path)
    for index, (lang, body) in enumerate(blocks(page)):
        if lang == "python":
            exec(compile(body, f"{page_id(page)}:python block {index}", "exec"), namespace)


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def _extras() -> set[str]:
    """The extras of pyproject.toml (read by hand: tomllib is Python >= 3.11, the project supports 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def _cli_args(words: list[str]) -> list[str] | None:
    """The CLI arguments of a train.py / align.train / align-train command, else None."""
    while words and words[0] in LAUNCHERS:  # srun ... / torchrun --nproc-per-node=8 ... train.py ...
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[1:]
    for start, word in enumerate(words):
        if word in ("train.py", "align-train"):
            return words[start + 1:]
        if word == "align.train" and start > 0 and words[start - 1] == "-m":
            return words[start + 1:]
    return None


def check_command(line: str, cli_lines: list[list[str]]) -> None:
    words = shlex.split(line)
    args = _cli_args(words)
    if args is not None:
        cli_lines.append(args)
    elif words[0] == "make":
        assert set(words[1:]) <= _makefile_targets(), f"{line}: no such Makefile target"
    elif words[:2] == ["python", "-m"] and len(words) > 2 and words[2].split(".")[0] in ("align", "explain",
                                                                                       "datamodules"):
        assert importlib.util.find_spec(words[2]) is not None, f"{line}: no module {words[2]}"
    elif words[0] == "python" and len(words) > 1 and words[1].split("/")[0] in ("scripts", "benchmarks", "docs"):
        script = ROOT / words[1]
        assert script.is_file(), f"{line}: no {words[1]}"
        source = script.read_text()
        for option in (word.split("=")[0] for word in words[2:] if word.startswith("--")):
            if option == "--":
                break
            assert f'"{option}"' in source, f"{line}: {words[1]} has no option {option}"
    elif words[:2] == ["pip", "install"]:
        for extra in re.findall(r"\[([\w,-]+)\]", line):
            assert set(extra.split(",")) <= _extras(), f"{line}: no such extra"
    elif words[:3] == ["python", "-m", "pytest"]:
        pass
    else:
        assert words[0] in OTHER_TOOLS, f"{line}: a command this test cannot check; add a rule for it"


BASH_PAGES = [page for page in PAGES if any(lang in SHELL for lang, _ in blocks(page))]


@pytest.mark.parametrize("page", BASH_PAGES, ids=page_id)
def test_command_lines_exist_and_the_cli_lines_parse(page, tmp_path, capsys):
    cli_lines: list[list[str]] = []
    for lang, body in blocks(page):
        if lang in SHELL:
            lines = commands(body)
            if lang == "console":  # a session: the commands are the lines after a "$ " prompt, the rest is output
                lines = [line.removeprefix("$ ") for line in lines if line.startswith("$ ")]
            for line in lines:
                check_command(line, cli_lines)
    for args in cli_lines:
        args = [arg for index, arg in enumerate(args)  # a checkpoint path is checked at run time, not here
                if arg != "--ckpt_path" and (index == 0 or args[index - 1] != "--ckpt_path")]
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--print_config"])
        assert exit_info.value.code in (0, None), f"{page_id(page)}: {shlex.join(args)} does not parse"
    capsys.readouterr()


@pytest.mark.parametrize("page", [page for page in PAGES if any(lang in ("yaml", "json") for lang, _ in blocks(page))],
                         ids=page_id)
def test_yaml_and_json_blocks_parse(page):
    for lang, body in blocks(page):
        if lang == "yaml":
            assert yaml.safe_load(body) is not None
        elif lang == "json":
            json.loads(body)


def test_the_readme_is_a_landing_page_whose_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    first_command = next(line for lang, body in blocks(ROOT / "README.md") if lang == "bash"
                         for line in commands(body))
    assert first_command == "make demo"
    assert re.search(r"deviation", text, re.I)
    for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "api" / "explain" / "index.html").is_file()
