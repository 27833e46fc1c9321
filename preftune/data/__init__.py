"""Canonical records, readers, validation, tokenization and the bundled arithmetic task."""

from preftune.data.records import DataError, LoadReport, load_records, unpair
from preftune.data.tokenize import tokenize_records

__all__ = ["DataError", "LoadReport", "load_records", "tokenize_records", "unpair"]
