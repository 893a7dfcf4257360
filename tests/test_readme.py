"""The README's commands as a user copies them: every ``python jobs/<stage>.py …`` line (continued
lines joined, its comment cut) composes with Hydra, and the config check finds nothing wrong with it
but what a fresh clone lacks (a checkpoint not trained yet, a placeholder's input or model): a key
renamed or a value refused since the README was written fails here, not in a user's terminal."""

import os
import re
import shlex

import pytest

from cerbero_ray.config import check, compose
from conftest import REPO_DIR

# what a fresh clone or a placeholder (s3://BUCKET, corpus/, my_task.yaml) lacks: a missing file
MISSING = re.compile(r"no HF model at|no such file or folder|no such GGUF file|no such file")
OPTIONS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd"}


def readme_commands() -> list[tuple[int, str, list[str]]]:
    """(line number, stage, overrides) of each ``python jobs/<stage>.py`` command in a code block."""
    lines = open(os.path.join(REPO_DIR, "README.md"), encoding="utf-8").read().splitlines()
    out, inside, held, start = [], False, "", 0
    for n, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            inside, held = not inside, ""
            continue
        if not inside:
            continue
        if not held:
            start = n
        if line.rstrip().endswith("\\"):
            held += line.rstrip()[:-1] + " "
            continue
        line, held = held + line, ""
        m = re.search(r"(?:^|\s)python jobs/(\w+)\.py(.*)$", line)
        if not m:
            continue
        words = shlex.split(m.group(2), comments=True)
        overrides, skip = [], False
        for w in words:
            if skip or w in OPTIONS_WITH_VALUE:
                skip = not skip
                continue
            if not w.startswith("-"):
                overrides.append(w)
        out.append((start, m.group(1), overrides))
    return out


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_it_shows():
    stages = {s for _, s, _ in COMMANDS}
    assert len(COMMANDS) >= 35
    assert {"recipe", "data", "train", "label", "generate", "serve", "evaluate", "export"} <= stages
    assert ("recipe", []) in [(s, o) for _, s, o in COMMANDS]  # the main command as the quick start writes it


@pytest.mark.parametrize("line,stage,overrides", COMMANDS, ids=[f"README.md:{n}" for n, _, _ in COMMANDS])
def test_a_readme_command_composes_and_passes_the_config_check(line, stage, overrides):
    cfg = compose(stage, overrides)
    try:
        check(stage, cfg)
    except (ValueError, FileNotFoundError) as e:
        assert MISSING.search(str(e)), f"README.md:{line}: python jobs/{stage}.py {' '.join(overrides)}: {e}"
