"""The one definition of the benchmark JSON (`kvstack-bench/1`, described in SCHEMA.md).

`validate(document)` lists every way a document departs from the schema; `load(path)` reads a
file and raises SchemaError naming the file and each problem. `meets_targets(result)` decides the
"met / missed" column of the report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA_ID = "kvstack-bench/1"
LIMIT_OPS = ("<=", ">=")


class SchemaError(ValueError):
    """A benchmark file that does not follow kvstack-bench/1."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path} is not a valid {SCHEMA_ID} document: " + "; ".join(problems))

    def __reduce__(self) -> tuple[type[SchemaError], tuple[Path, list[str]]]:
        return type(self), (self.path, self.problems)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _expect(problems: list[str], where: str, obj: Mapping[str, Any], key: str, kind: str) -> Any:
    """Record a problem unless obj[key] is of `kind`: str, int, number, bool, dict, list."""
    if key not in obj:
        problems.append(f"{where}: missing {key!r}")
        return None
    value = obj[key]
    ok = {
        "str": isinstance(value, str) and value != "",
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": _is_number(value),
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        problems.append(f"{where}: {key!r} must be a {kind}, got {value!r}")
        return None
    return value


def _validate_result(problems: list[str], where: str, result: object) -> None:
    if not isinstance(result, dict):
        problems.append(f"{where}: a result must be an object, got {result!r}")
        return
    for key, kind in (
        ("name", "str"),
        ("metric", "str"),
        ("unit", "str"),
        ("value", "number"),
        ("ratio", "number"),
        ("higher_is_better", "bool"),
        ("params", "dict"),
    ):
        _expect(problems, where, result, key, kind)
    baseline = _expect(problems, where, result, "baseline", "dict")
    if baseline is not None:
        _expect(problems, f"{where}.baseline", baseline, "name", "str")
        _expect(problems, f"{where}.baseline", baseline, "value", "number")
    if "target" not in result:
        problems.append(f"{where}: missing 'target' (null when the issue sets none)")
    elif result["target"] is not None and not _is_number(result["target"]):
        problems.append(f"{where}: 'target' must be a number or null, got {result['target']!r}")
    limit = result.get("limit")
    if limit is not None:
        if not isinstance(limit, dict) or limit.get("op") not in LIMIT_OPS:
            problems.append(f"{where}: 'limit' must be null or {{op: <= or >=, value}}: {limit!r}")
        else:
            _expect(problems, f"{where}.limit", limit, "value", "number")


def validate(document: object) -> list[str]:
    """Every way `document` departs from kvstack-bench/1 (empty when valid)."""
    if not isinstance(document, dict):
        return [f"the document must be an object, got {type(document).__name__}"]
    problems: list[str] = []
    if document.get("schema") != SCHEMA_ID:
        problems.append(f"'schema' must be {SCHEMA_ID!r}, got {document.get('schema')!r}")
    _expect(problems, "document", document, "suite", "str")
    _expect(problems, "document", document, "created", "str")
    if "git_commit" not in document or not isinstance(document["git_commit"], (str, type(None))):
        problems.append("document: 'git_commit' must be a string or null")
    machine = _expect(problems, "document", document, "machine", "dict")
    if machine is not None:
        _expect(problems, "machine", machine, "cpu_model", "str")
        _expect(problems, "machine", machine, "cpu_count", "int")
        if "gpu" not in machine or not isinstance(machine["gpu"], (str, type(None))):
            problems.append("machine: 'gpu' must be the card's name or null")
    versions = _expect(problems, "document", document, "versions", "dict")
    if versions is not None and not all(isinstance(v, str) for v in versions.values()):
        problems.append("versions: every version must be a string")
    results = _expect(problems, "document", document, "results", "list")
    if results is not None:
        names = [r.get("name") for r in results if isinstance(r, dict)]
        duplicates = sorted({str(n) for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"results: duplicate names {duplicates}")
        for i, result in enumerate(results):
            _validate_result(problems, f"results[{i}]", result)
    return problems


def load(path: Path) -> dict[str, Any]:
    """Read and validate one benchmark file; SchemaError names every problem."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SchemaError(path, [f"unreadable JSON: {exc}"]) from exc
    problems = validate(document)
    if problems:
        raise SchemaError(path, problems)
    return document


def meets_targets(result: Mapping[str, Any]) -> bool | None:
    """True/False when the result has a target or limit, None when it has neither."""
    checks = []
    if result.get("target") is not None:
        checks.append(result["ratio"] >= result["target"])
    limit = result.get("limit")
    if limit is not None:
        value, bound = result["value"], limit["value"]
        checks.append(value <= bound if limit["op"] == "<=" else value >= bound)
    return all(checks) if checks else None


def machine_info(gpu: str | None = None) -> dict[str, Any]:
    """The `machine` object for this host: CPU model and count, and the GPU that was used."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu_model, "cpu_count": os.cpu_count() or 1, "gpu": gpu}


def git_commit(root: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return proc.stdout.strip() or None


def make_document(
    suite: str,
    results: list[dict[str, Any]],
    *,
    versions: Mapping[str, str],
    root: Path,
    gpu: str | None = None,
) -> dict[str, Any]:
    """A complete, validated kvstack-bench/1 document."""
    document = {
        "schema": SCHEMA_ID,
        "suite": suite,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(root),
        "machine": machine_info(gpu),
        "versions": {"python": platform.python_version(), **versions},
        "results": results,
    }
    problems = validate(document)
    if problems:
        raise ValueError(f"benchmark suite {suite!r} built an invalid document: {problems}")
    return document
