"""The error every data reader raises for a file that exists but is not what its format says it should be."""

from __future__ import annotations

from pathlib import Path


class DataFileError(ValueError):
    """A data file that cannot be read as its format (truncated, corrupt, wrong header, wrong shape or labels).

    The message names the file, what is wrong with it, the format expected and the fix (download it again, or
    delete a cache file so that it is rebuilt). Build one with :func:`bad_file`.
    """


def bad_file(path: str | Path, problem: str, expected: str, fix: str) -> DataFileError:
    """``DataFileError("<path>: <problem>. Expected <expected>. <fix>")``."""
    return DataFileError(f"{path}: {problem}. Expected {expected}. {fix}")


def redownload(source: str) -> str:
    """The fix for a damaged distribution file."""
    return f"The file is damaged or not the original: download it again from {source}."


def delete_cache(path: str | Path) -> str:
    """The fix for a damaged cache file."""
    return f"It is a cache file: delete {path} and it will be rebuilt on the next run."
