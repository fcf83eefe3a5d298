"""Turn a folder of kvstack-bench/1 files into one markdown summary and PNG plots.

    python -m tools.bench.report RESULTS_DIR [--not-run SUITE=REASON ...]

Writes RESULTS_DIR/summary.md and RESULTS_DIR/<suite>.png (ratio per case against its target).
Every file is validated first; an invalid one fails the report, naming the file and the problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench.schema import SchemaError, load, meets_targets


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _target_text(result: dict[str, Any]) -> str:
    parts = []
    if result.get("target") is not None:
        parts.append(f"ratio >= {result['target']:g}")
    limit = result.get("limit")
    if limit is not None:
        parts.append(f"{limit['op']} {_fmt(limit['value'])} {result['unit']}")
    return ", ".join(parts) or "-"


def markdown(documents: list[dict[str, Any]], not_run: dict[str, str]) -> str:
    lines = ["# kvstack benchmarks", ""]
    for doc in documents:
        machine = doc["machine"]
        lines += [
            f"## {doc['suite']}",
            "",
            f"Machine: {machine['cpu_model']} ({machine['cpu_count']} CPUs), "
            f"GPU: {machine['gpu'] or 'none'}; commit {(doc['git_commit'] or 'unknown')[:12]}; "
            f"{doc['created']}; "
            + ", ".join(f"{k} {v}" for k, v in sorted(doc["versions"].items())),
            "",
            "| case | metric | ours | baseline | ratio (higher is better) | target | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in doc["results"]:
            met = meets_targets(r)
            lines.append(
                f"| {r['name']} | {r['metric']} | {_fmt(r['value'])} {r['unit']} "
                f"| {r['baseline']['name']}: {_fmt(r['baseline']['value'])} {r['unit']} "
                f"| {r['ratio']:.3f} | {_target_text(r)} "
                f"| {'-' if met is None else ('yes' if met else '**no**')} |"
            )
        lines.append("")
    if not_run:
        lines += ["## Not run", ""]
        lines += [f"- {suite}: {reason}" for suite, reason in sorted(not_run.items())]
        lines.append("")
    return "\n".join(lines)


def plot(document: dict[str, Any], path: Path) -> None:
    """A horizontal bar per case: its ratio, with the target marked."""
    import matplotlib  # noqa: PLC0415 -- heavy, and only the plotting step needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 -- after choosing the headless backend

    results = document["results"]
    names = [r["name"] for r in results]
    ratios = [r["ratio"] for r in results]
    colors = ["tab:gray" if meets_targets(r) is None else "tab:green" for r in results]
    colors = [
        "tab:red" if meets_targets(r) is False else color
        for r, color in zip(results, colors, strict=True)
    ]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(results) + 1.5))
    y = list(range(len(results)))
    ax.barh(y, ratios, color=colors)
    for yi, r in zip(y, results, strict=True):
        if r.get("target") is not None:
            ax.plot([r["target"], r["target"]], [yi - 0.4, yi + 0.4], color="black", lw=2)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.axvline(1.0, color="tab:blue", lw=0.8, ls="--")
    ax.set_xlabel("ratio to the baseline measured in the same run (higher is better; | = target)")
    gpu = document["machine"]["gpu"]
    ax.set_title(f"{document['suite']} on {gpu or document['machine']['cpu_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="folder holding the suites' JSON files")
    parser.add_argument(
        "--not-run",
        action="append",
        default=[],
        metavar="SUITE=REASON",
        help="a suite that could not run here, and why (shown in the summary)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write only summary.md")
    args = parser.parse_args(argv)
    not_run = dict(item.split("=", 1) for item in args.not_run)
    files = sorted(args.results_dir.glob("*.json"))
    try:
        documents = [load(path) for path in files]
    except SchemaError as exc:
        print(f"bench report: {exc}", file=sys.stderr)
        return 1
    if not documents and not not_run:
        print(f"bench report: no benchmark files in {args.results_dir}", file=sys.stderr)
        return 1
    summary = args.results_dir / "summary.md"
    summary.write_text(markdown(documents, not_run))
    if not args.no_plots:
        for doc in documents:
            plot(doc, args.results_dir / f"{doc['suite']}.png")
    print(summary.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
