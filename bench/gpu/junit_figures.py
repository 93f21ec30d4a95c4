"""tests/gpu's junit report as JSON lines, appended to results.jsonl by run.sh: the totals, each
failure with its message, each skip reason, and the values the tests measured (record_property:
compiled vs eager differences, the out-of-memory split's attempts).

    python bench/gpu/junit_figures.py JUNIT_XML >> "$OUT/results.jsonl"
"""

from __future__ import annotations

import ast
import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any


def value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def figures(report: Path) -> list[dict[str, Any]]:
    if not report.exists():
        return [{"stage": "tests", "error": f"no junit report at {report}: pytest did not finish"}]
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {k: sum(int(s.get(k, "0")) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    lines: list[dict[str, Any]] = [{"stage": "tests", "passed": passed, **totals,
                                    "seconds": round(sum(float(s.get("time", "0")) for s in suites), 1)}]
    skips: Counter[str] = Counter()
    for case in root.iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        for prop in case.iter("property"):
            lines.append({"stage": "test_property", "test": test, "name": prop.get("name"),
                          "value": value(prop.get("value", ""))})
        for tag in ("failure", "error"):
            if (found := case.find(tag)) is not None:
                lines.append({"stage": f"test_{tag}", "test": test, "seconds": float(case.get("time", "0")),
                              "message": (found.get("message") or "")[:800]})
        if (skipped := case.find("skipped")) is not None:
            skips[skipped.get("message") or ""] += 1
    lines += [{"stage": "tests_skipped", "count": n, "reason": reason} for reason, n in skips.items()]
    return lines


def main() -> int:
    for line in figures(Path(sys.argv[1])):
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
