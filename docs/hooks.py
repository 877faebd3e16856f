"""MkDocs hook: the docstrings use Sphinx roles (:func:`name`, :class:`~pkg.Name`); mkdocstrings renders them as
text followed by code. Drop the role, and with ``~`` keep only the last part of the dotted name, as Sphinx does."""

import re

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    name = match[2].rsplit(".", 1)[-1] if match[1] else match[2]
    return f"<code>{name}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(_code, html)
