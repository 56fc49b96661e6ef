"""The names of the source formats, per kind of source: the format registry's names
(:mod:`hmn.formats.registry` maps each to its parser). This module imports nothing, so that
configuration checks (:mod:`hmn.config`) can use the names without loading pyarrow.

"auto" (first) detects a file's format from its first lines
(:func:`hmn.formats.registry.detect_format`).
"""

from __future__ import annotations

__all__ = ["AUTO", "FACT_FORMATS", "NAME_FORMATS", "QUESTION_FORMATS", "FORMATS_BY_KIND"]

AUTO = "auto"
FACT_FORMATS = (AUTO, "grouped", "triples", "rdf")
NAME_FORMATS = (AUTO, "names", "rdf")
QUESTION_FORMATS = (AUTO, "simplequestions")
# kind of source (IngestSources' fields) -> its formats
FORMATS_BY_KIND = {"facts": FACT_FORMATS, "names": NAME_FORMATS, "questions": QUESTION_FORMATS}
