"""lintrunner adapter for Pyrefly: one project-mode `pyrefly check`, JSON mapped to LintMessages.

Stdlib only and self-contained, as lintrunner adapters are. It always exits 0; a failure of the
tool itself (a crash, an exit code other than 0 or 1, output that is not JSON, a configuration
problem Pyrefly only warns about) becomes a message with `path: null`, which lintrunner shows as
a linter failure: a broken checker is never a clean run.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

LINTER_CODE = "PYREFLY"

# Pyrefly reports these configuration mistakes on stderr but still exits 0 (or falls back to a
# weaker auto configuration, as the editor does): kvstack treats each as a failed check.
CONFIG_PROBLEM_MARKERS = (
    "Extra keys found",
    "failed to parse",
    "Failed to query interpreter",
    "Fatal configuration error",
)


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


SEVERITY_MAP = {
    "error": LintSeverity.ERROR,
    "warn": LintSeverity.WARNING,
    "info": LintSeverity.ADVICE,
    "hint": LintSeverity.ADVICE,
}

logger = logging.getLogger("pyrefly_linter")


def general_failure(name: str, description: str) -> LintMessage:
    return LintMessage(
        path=None,
        line=None,
        char=None,
        code=LINTER_CODE,
        severity=LintSeverity.ERROR,
        name=name,
        original=None,
        replacement=None,
        description=description,
    )


def config_problems(stderr: str) -> list[str]:
    """The stderr lines that report a configuration mistake (see CONFIG_PROBLEM_MARKERS)."""
    return [line for line in stderr.splitlines() if any(m in line for m in CONFIG_PROBLEM_MARKERS)]


def run_pyrefly(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    logger.debug("running %s", " ".join(argv))
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    logger.debug("took %.2f s, exit code %d", time.monotonic() - started, proc.returncode)
    return proc


def check(
    *,
    pyrefly: str,
    config: Path,
    min_severity: str,
    filenames: list[str],
) -> list[LintMessage]:
    """Run Pyrefly in project mode; return messages for `filenames` (all files when empty)."""
    root = config.resolve().parent
    argv = [
        pyrefly,
        "check",
        "--config",
        str(config.resolve()),
        "--output-format",
        "json",
        "--min-severity",
        min_severity,
        "--summary=none",
    ]
    try:
        proc = run_pyrefly(argv, root)
    except OSError as exc:
        return [general_failure("command-failed", f"could not run {' '.join(argv)}: {exc}")]

    context = f"command: {' '.join(argv)}\nexit code: {proc.returncode}\nstderr:\n{proc.stderr}"
    if proc.returncode not in (0, 1):
        return [general_failure("command-failed", f"pyrefly crashed\n{context}")]
    problems = config_problems(proc.stderr)
    if problems:
        return [general_failure("config-problem", "\n".join(problems) + f"\n\n{context}")]
    try:
        # raw_decode: tolerate anything a CI environment appends after the JSON document.
        report, _ = json.JSONDecoder().raw_decode(proc.stdout.lstrip())
        errors = report["errors"]
    except (ValueError, KeyError, TypeError) as exc:
        return [
            general_failure(
                "json-parse-error",
                f"pyrefly output is not the expected JSON ({exc}): "
                f"{proc.stdout[:500]!r}\n{context}",
            )
        ]
    if proc.returncode == 1 and not any(e.get("severity") == "error" for e in errors):
        # Exit 1 without an error in the report: a user error (bad config, no files matched).
        return [general_failure("command-failed", f"pyrefly failed without a report\n{context}")]

    wanted = {Path(f).resolve() for f in filenames}
    messages = []
    for error in errors:
        path = (root / error["path"]).resolve()
        if wanted and path not in wanted:
            continue
        messages.append(
            LintMessage(
                path=str(path),
                line=error["line"],
                char=error["column"],
                code=LINTER_CODE,
                severity=SEVERITY_MAP.get(error["severity"], LintSeverity.ERROR),
                name=error["name"],
                original=None,
                replacement=None,
                description=error.get("description") or error.get("concise_description"),
            )
        )
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], fromfile_prefix_chars="@")
    parser.add_argument(
        "--pyrefly",
        default=str(Path(sys.executable).parent / "pyrefly"),
        help="pyrefly executable (default: the one beside this Python, i.e. the project venv's)",
    )
    parser.add_argument(
        "--config", default="pyrefly.toml", type=Path, help="the project's pyrefly.toml"
    )
    parser.add_argument(
        "--min-severity",
        default="warn",
        choices=["error", "warn", "info", "hint"],
        help="lowest Pyrefly severity to report",
    )
    parser.add_argument("--verbose", action="store_true", help="log commands on stderr")
    parser.add_argument("filenames", nargs="*", help="files to report on (all files when none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr)
    for message in check(
        pyrefly=args.pyrefly,
        config=args.config,
        min_severity=args.min_severity,
        filenames=args.filenames,
    ):
        print(json.dumps(message._asdict()), flush=True)


if __name__ == "__main__":
    main()
