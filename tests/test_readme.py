"""Every ```python snippet of README.md runs as written, in order; the snippets of one
`##` section share a namespace (a later one continues an earlier one), so the
documented usage cannot drift from the library. Under the test suite's 8 fake
devices the library section's shard_map snippet runs data-parallel on 8."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def sections() -> list:
  """`[(first line, [(line, code), ...])]` per `##` section that holds snippets."""
  with open(README) as f:
    text = f.read()
  out = {}
  for m in re.finditer(r"```python\n(.*?)```", text, re.S):
    line = text[: m.start()].count("\n") + 2
    heads = [h.start() for h in re.finditer(r"^## ", text[: m.start()], re.M)]
    head_line = text[: heads[-1]].count("\n") + 1 if heads else 1
    out.setdefault(head_line, []).append((line, m.group(1)))
  return sorted(out.items())


def test_the_readme_has_snippets():
  assert sections(), "README.md has no ```python snippet left to test"


@pytest.mark.parametrize(
  "head,snippets", sections(), ids=lambda x: f"section{x}" if isinstance(x, int) else ""
)
def test_readme_snippets_run(head, snippets):
  namespace = {"__name__": "readme"}
  for line, code in snippets:
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
