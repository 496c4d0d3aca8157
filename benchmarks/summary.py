"""BENCHMARKS.md's generated table: one row per headline figure of every ``benchmarks/results/*.json``.

Convention for a benchmark script (any script, whatever else it writes): its results JSON may carry a ``"summary"``
list at the top level (or, for scripts that only pass ``figures``, under ``figures["summary"]`` when that is a list),
each row a dict with

- ``benchmark``: the script or configuration name (defaults to the file's ``"benchmark"`` field);
- ``what``: what was measured, in a few words (``"step time, per-example GNS every step"``);
- ``ours``: our figure with its unit (``"4.41 ms"``), or the configuration measured;
- ``anchor``: what it is compared with and its figure (``"no callback, 3.02 ms"``, ``"PyHessian, 1.41 s"``);
- ``ratio``: a number (rendered with 3 significant digits and ``×``) or a string, or null; ``what`` says which way
  it points ("time ratio ours / anchor" for an overhead, "speed-up (anchor time / ours)" for a speed-up);
- ``target``: the target from the issue or design card (``"≤ 1.6×"``), or ``""``;
- optional ``spread``: ``[min, max]`` of the per-round ratios, shown next to the ratio.

``benchmarks/_harness.py``'s ``save_results(..., summary=[summary_row(...)])`` writes it. Each file's provenance
(``date``, ``git_sha``, ``git_dirty``, ``command``) goes into the row's last column. Files without rows are skipped.

    python benchmarks/summary.py            # rewrite the block between the markers in BENCHMARKS.md
    python benchmarks/summary.py --print    # print the table, write nothing
    python benchmarks/summary.py --check    # exit 1 if the block differs from what the results give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"
COLUMNS = ("benchmark", "what", "ours", "anchor", "ratio", "target", "run")


def load_rows(results: Path) -> list[dict[str, Any]]:
    """Every summary row of every ``*.json`` under ``results`` (files in name order, rows in file order), each
    with its file's provenance."""
    rows = []
    for path in sorted(results.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}: not valid JSON ({error}); rerun the benchmark that writes it") from error
        summary = payload.get("summary")
        if not isinstance(summary, list):
            figures = payload.get("figures")
            summary = figures.get("summary") if isinstance(figures, dict) else None
        if not isinstance(summary, list):
            continue
        for i, row in enumerate(summary):
            if not isinstance(row, dict) or "what" not in row:
                raise SystemExit(f"{path}: summary row {i} is not a dict with at least 'what': {row!r}")
            rows.append({"benchmark": payload.get("benchmark", path.stem), **row, "_file": path.name,
                         "_date": payload.get("date", ""), "_sha": payload.get("git_sha", ""),
                         "_dirty": payload.get("git_dirty", False), "_command": payload.get("command", "")})
    return rows


def _ratio(row: dict[str, Any]) -> str:
    ratio = row.get("ratio")
    if ratio is None:
        return "–"
    text = f"{ratio:.3g}×" if isinstance(ratio, (int, float)) else str(ratio)
    spread = row.get("spread")
    if isinstance(spread, (list, tuple)) and len(spread) == 2:
        text += f" ({spread[0]:.3g}–{spread[1]:.3g})"
    return text


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ") if value not in (None, "") else "–"


def render(rows: list[dict[str, Any]]) -> str:
    """The Markdown table (header, rule, one line per row); a sentence when there are no rows."""
    if not rows:
        return "No results with summary rows under benchmarks/results yet: run the benchmark scripts."
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        sha = (row["_sha"] or "")[:7] + ("+" if row["_dirty"] else "")
        run = f"{row['_date'][:16].replace('T', ' ')} `{sha}` ([json](benchmarks/results/{row['_file']}))"
        cells = [row.get("benchmark"), row.get("what"), row.get("ours"), row.get("anchor"), _ratio(row),
                 row.get("target"), run]
        lines.append("| " + " | ".join(_cell(c) if i != 4 else c for i, c in enumerate(cells)) + " |")
    return "\n".join(lines)


def rewrite(text: str, table: str, path: Path | str = "BENCHMARKS.md") -> str:
    """``text`` with the block between the markers replaced by ``table``; SystemExit naming the markers when either
    is missing or they are out of order."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < 0 or end < begin:
        raise SystemExit(f"{path}: needs the two lines {BEGIN} and {END} (in that order) around the generated "
                         "table; add them where the table should go")
    return text[: begin + len(BEGIN)] + "\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the table, write nothing")
    mode.add_argument("--check", action="store_true", help="exit 1 if the generated block is stale")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--file", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    table = render(load_rows(args.results))
    if args.print:
        print(table)
        return 0
    text = args.file.read_text()
    new = rewrite(text, table, args.file)
    if args.check:
        if new != text:
            print(f"{args.file}: the generated table is stale; run python benchmarks/summary.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.file.write_text(new)
    print(f"{args.file}: {len(table.splitlines())} lines between the markers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
