"""Readers of the docs' sections and code blocks, for the tests that run them as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def doc_section(page: str, title: str) -> str:
  """The `## title` section of `page` (a path relative to the repository)."""
  with open(os.path.join(ROOT, page)) as f:
    text = f.read()
  start = text.index(f"\n## {title}\n")
  end = text.find("\n## ", start + 1)
  return text[start : end if end > 0 else None]


def section_block(page: str, title: str, lang: str = "bash") -> str:
  """The first unindented ```lang block of `page`'s `## title` section."""
  return re.search(rf"^```{lang}\n(.*?)^```", doc_section(page, title), re.S | re.M).group(1)


def section_commands(page: str, title: str) -> list[str]:
  """The `python ...` lines of the first bash block of `page`'s `## title` section."""
  return [line for line in section_block(page, title).splitlines() if line.startswith("python ")]
