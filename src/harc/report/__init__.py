"""results.json -> one self-contained HTML page and a Markdown file with PNG plots beside it."""

from harc.report.document import write_report

__all__ = ["write_report"]
