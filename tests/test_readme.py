"""Every ```python snippet of README.md runs as written (in order, one namespace per
snippet), so the documented usage cannot drift from the library."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def snippets() -> list:
  with open(README) as f:
    text = f.read()
  return [
    (text[: m.start()].count("\n") + 2, m.group(1))
    for m in re.finditer(r"```python\n(.*?)```", text, re.S)
  ]


def test_the_readme_has_snippets():
  assert snippets(), "README.md has no ```python snippet left to test"


@pytest.mark.parametrize(
  "line,code", snippets(), ids=lambda x: f"line{x}" if isinstance(x, int) else ""
)
def test_readme_snippet_runs(line, code):
  exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
