"""lintrunner adapter IMPORTS: the layering rule between the kvstack packages.

A file under `packages/<name>/` may import `kvstack.<name>` and the siblings that ALLOWED lists,
nothing else of kvstack. Stdlib only and self-contained; always exits 0, reporting problems
(a violation, an unreadable or unparsable file) as LintMessages on stdout.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

LINTER_CODE = "IMPORTS"

# Which sibling packages each package may import. The data plane (transfer) and the kernels stand
# alone; the store builds on transfer; the server composes everything.
ALLOWED: dict[str, frozenset[str]] = {
    "transfer": frozenset(),
    "kernels": frozenset(),
    "store": frozenset({"transfer"}),
    "serve": frozenset({"transfer", "store", "kernels"}),
}


class LintSeverity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    ADVICE = "advice"
    DISABLED = "disabled"


class LintMessage(NamedTuple):
    path: str | None
    line: int | None
    char: int | None
    code: str
    severity: LintSeverity
    name: str
    original: str | None
    replacement: str | None
    description: str | None


def owning_package(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """(package name, module parts) for a file under packages/<name>/, else None.

    Module parts are filled in for files under `src/` (needed to resolve relative imports).
    """
    parts = path.resolve().parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "packages" and parts[i + 1] in ALLOWED:
            rest = parts[i + 2 :]
            module: tuple[str, ...] = ()
            if rest[:1] == ("src",):
                module = (*tuple(rest[1:-1]), Path(rest[-1]).stem)
            return parts[i + 1], module
    return None


def imported_modules(tree: ast.Module, module: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """(line, column, absolute dotted name) for every import in the tree."""
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, node.col_offset + 1, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `from ..x import y` in kvstack/store/a.py: drop `level` trailing module parts.
                base = module[: len(module) - node.level] if len(module) >= node.level else ()
                prefix = ".".join(base)
            else:
                prefix = ""
            target = ".".join(p for p in (prefix, node.module or "") if p)
            # `from kvstack import store` names the subpackage in the alias.
            for alias in node.names:
                name = f"{target}.{alias.name}" if target else alias.name
                found.append((node.lineno, node.col_offset + 1, name))
    return found


def lint_file(filename: str) -> list[LintMessage]:
    path = Path(filename)
    owner = owning_package(path)
    if owner is None:
        return []
    package, module = owner
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=filename)
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        return [
            LintMessage(
                path=filename,
                line=getattr(exc, "lineno", None),
                char=None,
                code=LINTER_CODE,
                severity=LintSeverity.ERROR,
                name="unreadable-file",
                original=None,
                replacement=None,
                description=f"cannot check the imports of {filename}: {exc}",
            )
        ]
    allowed = ALLOWED[package]
    allowed_text = ", ".join(f"kvstack.{n}" for n in sorted(allowed)) or "no other kvstack package"
    messages = []
    for line, column, name in imported_modules(tree, module):
        parts = name.split(".")
        if len(parts) < 2 or parts[0] != "kvstack":
            continue
        sibling = parts[1]
        if sibling == package or sibling in allowed:
            continue
        messages.append(
            LintMessage(
                path=filename,
                line=line,
                char=column,
                code=LINTER_CODE,
                severity=LintSeverity.ERROR,
                name="layering-violation",
                original=None,
                replacement=None,
                description=(
                    f"{filename} imports {name}, but kvstack.{package} may import only "
                    f"{allowed_text} (layering rule in tools/linters/imports_linter.py)"
                ),
            )
        )
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], fromfile_prefix_chars="@")
    parser.add_argument("filenames", nargs="+", help="Python files to check")
    args = parser.parse_args()
    for filename in args.filenames:
        for message in lint_file(filename):
            print(json.dumps(message._asdict()), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
