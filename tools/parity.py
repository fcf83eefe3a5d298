"""Editor = command line = CI: proves that Pyrefly gives the same answer everywhere.

Three checks, each returning a list of problems (empty = pass):
1. pins: the installed pyrefly, ruff and lintrunner (and every other locked package) are exactly
   the versions in requirements.txt;
2. config: `pyrefly dump-config` on one file of each package (and tools/, noxfile.py) resolves to
   the root pyrefly.toml, and no pyproject.toml carries a [tool.pyrefly] table;
3. lsp: `pyrefly lsp` (what the editor runs) opens every checked file; the diagnostics it publishes
   equal those of `pyrefly check --output-format json --min-severity hint`, item by item.

    python -m tools.parity [--only pins|config|lsp]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tools.linters.pyrefly_linter import config_problems

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# One file of each part of the workspace whose config resolution must be the root pyrefly.toml.
CONFIG_SAMPLES = (
    "packages/transfer/src/kvstack/transfer/__init__.py",
    "packages/store/src/kvstack/store/__init__.py",
    "packages/kernels/src/kvstack/kernels/__init__.py",
    "packages/serve/src/kvstack/serve/__init__.py",
    "tools/parity.py",
    "noxfile.py",
)
# Deliberately bad inputs of the linter tests (a nested [tool.pyrefly] among them).
LINTER_FIXTURES = Path("tools/tests/fixtures")
# LSP severities (DiagnosticSeverity) in the CLI's words.
LSP_SEVERITY = {1: "error", 2: "warn", 3: "info", 4: "hint"}


@dataclass(frozen=True, slots=True, order=True)
class Diagnostic:
    """One Pyrefly diagnostic; line and column are 1-based, as the CLI prints them."""

    path: str
    line: int
    column: int
    name: str
    severity: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column} {self.severity} [{self.name}]"


# 1. pins -------------------------------------------------------------------------------------


def read_lock(lock: Path) -> dict[str, str]:
    """Normalized package name -> pinned version, from a requirements file of `name==version`."""
    pins = {}
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).strip().lower()


def tool_version(executable: Path) -> str:
    """The version a tool prints for `--version` ("ruff 0.17.6" -> "0.17.6")."""
    out = subprocess.run(
        [str(executable), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[-1]


def check_pins(
    lock: Path, *, bin_dir: Path = BIN, tools: Sequence[str] = ("pyrefly", "ruff", "lintrunner")
) -> list[str]:
    pins = read_lock(lock)
    problems = []
    for tool in tools:
        pinned = pins.get(tool)
        if pinned is None:
            problems.append(f"{tool} is not pinned in {lock}")
            continue
        executable = bin_dir / tool
        try:
            installed = tool_version(executable)
        except (OSError, subprocess.CalledProcessError) as exc:
            problems.append(f"{executable} --version failed: {exc}")
            continue
        if installed != pinned:
            problems.append(f"{tool}: {executable} is {installed}, {lock.name} pins {pinned}")
    for dist in importlib.metadata.distributions():
        name = normalize(dist.metadata["Name"])
        pinned = pins.get(name)
        # A local label ("+cpu") names the build of the pinned release; the lock drops it.
        installed = dist.version.split("+")[0]
        if pinned is not None and installed != pinned:
            problems.append(f"{name}: installed {dist.version}, {lock.name} pins {pinned}")
    return problems


# 2. config resolution ------------------------------------------------------------------------


def resolved_config(root: Path, file: Path, *, pyrefly: Path) -> tuple[str | None, list[str]]:
    """(config file Pyrefly uses for `file`, configuration problems it reported)."""
    proc = subprocess.run(
        [str(pyrefly), "dump-config", str(file)],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Configuration at `([^`]+)`", proc.stdout + proc.stderr)
    return (found.group(1) if found else None), config_problems(proc.stderr)


def check_config(
    root: Path, samples: Iterable[str] = CONFIG_SAMPLES, *, pyrefly: Path = BIN / "pyrefly"
) -> list[str]:
    expected = str((root / "pyrefly.toml").resolve())
    problems = []
    for sample in samples:
        config, warnings = resolved_config(root, root / sample, pyrefly=pyrefly)
        problems.extend(f"{sample}: {w}" for w in warnings)
        if config != expected:
            problems.append(f"{sample} is checked with {config or 'no config'}, not {expected}")
    for pyproject in project_files(root, "pyproject.toml"):
        relative = pyproject.relative_to(root)
        if relative.is_relative_to(LINTER_FIXTURES):
            continue
        if re.search(r"^\s*\[tool\.pyrefly", pyproject.read_text(), re.MULTILINE):
            problems.append(f"{relative} has a [tool.pyrefly] table")
    return problems


def project_files(root: Path, name: str) -> list[Path]:
    """Files called `name` that belong to the project: what git tracks or would track (ignored
    folders such as .venv or build outputs excluded); every match outside a git checkout."""
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", f"*{name}"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return sorted(p for p in root.glob(f"**/{name}") if ".venv" not in p.parts)
    return sorted(root / line for line in proc.stdout.splitlines() if line.endswith(name))


# 3. LSP = CLI --------------------------------------------------------------------------------


def covered_files(root: Path, *, pyrefly: Path) -> list[Path]:
    """The files `pyrefly check` covers in project mode, as dump-config lists them."""
    proc = subprocess.run(
        [str(pyrefly), "dump-config", "--max-files", "all"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    files, listing = [], False
    for line in proc.stdout.splitlines():
        if line.strip() == "Covered files:":
            listing = True
        elif listing and line.startswith("    ") and line.strip().endswith((".py", ".pyi")):
            files.append(Path(line.strip()))
        elif listing:
            listing = False
    return files


def cli_diagnostics(root: Path, *, pyrefly: Path) -> tuple[set[Diagnostic], list[str]]:
    proc = subprocess.run(
        [str(pyrefly), "check", "--output-format", "json", "--min-severity", "hint"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode not in (0, 1):
        return set(), [f"pyrefly check exited {proc.returncode}: {proc.stderr.strip()}"]
    report = json.loads(proc.stdout)
    found = {
        Diagnostic(
            str((root / e["path"]).resolve()), e["line"], e["column"], e["name"], e["severity"]
        )
        for e in report["errors"]
    }
    return found, config_problems(proc.stderr)


class LspClient:
    """A minimal JSON-RPC client over a language server's stdin/stdout (LSP base protocol)."""

    def __init__(self, argv: Sequence[str], cwd: Path) -> None:
        self._proc = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        reader = threading.Thread(target=self._read_loop, name="lsp-reader", daemon=True)
        reader.start()

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        stdin = self._proc.stdin
        if stdin is None:
            raise RuntimeError("language server stdin is closed")
        stdin.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        stdin.flush()

    def _read_loop(self) -> None:
        stdout: IO[bytes] | None = self._proc.stdout
        if stdout is None:
            return
        while True:
            length = None
            while True:
                line = stdout.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
                key, _, value = line.decode("ascii").partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value)
            if length is None:
                return
            self.messages.put(json.loads(stdout.read(length)))

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()


def lsp_diagnostics(
    root: Path,
    files: Sequence[Path],
    *,
    pyrefly: Path,
    timeout_s: float = 120.0,
    quiet_s: float = 1.5,
) -> tuple[set[Diagnostic], list[str]]:
    """Open every file in `pyrefly lsp`; return the last diagnostics it published for each.

    Done when every file has been published at least once and nothing new came for `quiet_s`.
    """
    client = LspClient([str(pyrefly), "lsp"], root)
    root_uri = root.resolve().as_uri()
    latest: dict[str, list[dict[str, Any]]] = {}
    try:
        client.send(
            {
                "id": 1,
                "method": "initialize",
                "params": {
                    "processId": os.getpid(),
                    "rootUri": root_uri,
                    "workspaceFolders": [{"uri": root_uri, "name": root.name}],
                    "capabilities": {},
                },
            }
        )
        client.send({"method": "initialized", "params": {}})
        for file in files:
            item = {
                "uri": file.resolve().as_uri(),
                "languageId": "python",
                "version": 1,
                "text": file.read_text(encoding="utf-8"),
            }
            client.send({"method": "textDocument/didOpen", "params": {"textDocument": item}})
        wanted = {file.resolve().as_uri() for file in files}
        deadline = time.monotonic() + timeout_s
        last_news = time.monotonic()
        while time.monotonic() < deadline:
            if wanted <= latest.keys() and time.monotonic() - last_news >= quiet_s:
                break
            try:
                message = client.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if message.get("method") == "textDocument/publishDiagnostics":
                params = message["params"]
                latest[params["uri"]] = params["diagnostics"]
                last_news = time.monotonic()
        missing = sorted(wanted - latest.keys())
    finally:
        client.close()
    problems = [f"pyrefly lsp published nothing for {uri} in {timeout_s:.0f} s" for uri in missing]
    found = set()
    for uri, diagnostics in latest.items():
        path = str(Path(uri.removeprefix("file://")).resolve())
        for d in diagnostics:
            start = d["range"]["start"]
            found.add(
                Diagnostic(
                    path,
                    start["line"] + 1,
                    start["character"] + 1,
                    str(d.get("code")),
                    LSP_SEVERITY.get(d.get("severity", 1), "error"),
                )
            )
    return found, problems


def diff(cli: set[Diagnostic], lsp: set[Diagnostic]) -> list[str]:
    return [f"only in `pyrefly check`: {d}" for d in sorted(cli - lsp)] + [
        f"only in the editor (pyrefly lsp): {d}" for d in sorted(lsp - cli)
    ]


def check_lsp(root: Path, *, pyrefly: Path = BIN / "pyrefly") -> tuple[list[str], int]:
    """(problems, number of diagnostics both sides agreed on)."""
    files = covered_files(root, pyrefly=pyrefly)
    if not files:
        return [f"pyrefly covers no files under {root}"], 0
    cli, cli_problems = cli_diagnostics(root, pyrefly=pyrefly)
    lsp, lsp_problems = lsp_diagnostics(root, files, pyrefly=pyrefly)
    return cli_problems + lsp_problems + diff(cli, lsp), len(cli & lsp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=["pins", "config", "lsp"], action="append", help="run only these checks"
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="workspace root")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    checks = args.only or ["pins", "config", "lsp"]
    failed = False
    for name in checks:
        started = time.monotonic()
        if name == "pins":
            problems, detail = check_pins(root / "requirements.txt"), "tool versions equal the lock"
        elif name == "config":
            problems, detail = check_config(root), "every sample resolves to the root pyrefly.toml"
        else:
            problems, agreed = check_lsp(root)
            detail = f"editor and CLI report the same {agreed} diagnostics"
        took = time.monotonic() - started
        if problems:
            failed = True
            print(f"parity {name}: FAILED ({took:.1f} s)")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(f"parity {name}: ok, {detail} ({took:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
