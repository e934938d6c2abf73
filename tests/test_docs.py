"""Every ```python snippet of README.md and of docs/ runs as written, in order; the snippets
of one `##` section of one page share a namespace (a later one continues an earlier one),
so the documented usage cannot drift from the library. Under the test suite's 8 fake
devices docs/library.md's shard_map snippet runs data-parallel on 8."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Pages whose snippets need files a test makes first run there instead.
OWN_RUNNER = {"docs/search.md": "tests/inference/test_docs.py"}


def pages() -> list:
  """README.md and every page under docs/, as paths relative to the repository."""
  found = ["README.md"]
  for folder, _, names in sorted(os.walk(os.path.join(ROOT, "docs"))):
    found += sorted(
      os.path.relpath(os.path.join(folder, n), ROOT) for n in names if n.endswith(".md")
    )
  return [p for p in found if p not in OWN_RUNNER]


def sections() -> list:
  """`[("page:first line", [(line, code), ...])]` per `##` section that holds snippets."""
  out = {}
  for page in pages():
    with open(os.path.join(ROOT, page)) as f:
      text = f.read()
    for head, snippets in _page_sections(text):
      out[f"{page}:{head}"] = snippets
  return sorted(out.items())


def _page_sections(text: str) -> list:
  out = {}
  for m in re.finditer(r"```python\n(.*?)```", text, re.S):
    line = text[: m.start()].count("\n") + 2
    heads = [h.start() for h in re.finditer(r"^## ", text[: m.start()], re.M)]
    head_line = text[: heads[-1]].count("\n") + 1 if heads else 1
    out.setdefault(head_line, []).append((line, m.group(1)))
  return sorted(out.items())


def test_the_readme_and_the_library_page_have_snippets():
  pages = {head.split(":")[0] for head, _ in sections()}
  assert {"README.md", "docs/library.md"} <= pages, pages


@pytest.mark.parametrize("head,snippets", sections(), ids=lambda x: x if isinstance(x, str) else "")
def test_doc_snippets_run(head, snippets):
  namespace = {"__name__": "readme"}
  for line, code in snippets:
    exec(compile(code, f"{head.split(':')[0]}:{line}", "exec"), namespace)
