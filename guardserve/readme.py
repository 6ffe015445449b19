"""Generated sections of README.md: text between two marker lines, rewritten in place.

``guardserve bench`` writes the performance section between ``<!-- bench:begin -->`` and
``<!-- bench:end -->``; ``guardserve demo build --readme`` writes the demo models' figures
between ``<!-- demo:begin -->`` and ``<!-- demo:end -->``. Standard library only.
"""

from __future__ import annotations

from pathlib import Path


def replace_between_markers(text: str, body: str, begin: str, end: str) -> str:
    """``text`` with everything between the marker lines replaced by ``body``; the markers
    and everything outside them stay byte-identical. Raises ValueError without both markers."""
    i = text.find(begin)
    j = text.find(end, i + len(begin)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise ValueError(f"the markers {begin} and {end} were not found (in that order)")
    if text.find(begin, i + len(begin)) >= 0 or text.find(end, j + len(end)) >= 0:
        raise ValueError(f"the markers {begin} / {end} occur more than once")
    head, tail = text[:i + len(begin)], text[j:]
    return head + "\n" + body.strip("\n") + "\n" + tail


def update_between_markers(readme: Path, body: str, begin: str, end: str) -> bool:
    """Splice ``body`` into ``readme`` between the markers, reading the file right before
    writing it (others edit other sections). Returns whether the file changed."""
    text = readme.read_bytes().decode("utf-8")  # bytes: line endings stay as they are
    new = replace_between_markers(text, body, begin, end)
    if new != text:
        readme.write_bytes(new.encode("utf-8"))
    return new != text
