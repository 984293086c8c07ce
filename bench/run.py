"""``python -m bench.run``: the bounded benchmark suite (``make bench``), one table, one JSON.

Each benchmark module ``bench/bench_<name>.py`` exposes ``run() -> dict`` (optionally
``run(budget_s=...)``). It runs in its own child process with a hard time limit, so that a
slow or crashing benchmark cannot hold up the suite or inflate another one's memory; a
module that does not exist yet is recorded as "not available".

A benchmark's dict may carry ``"figures"``: a list of rows with the keys ``figure``,
``value``, ``unit``, ``reference`` (and ``reference_name``), ``ratio``, ``target`` and
``met`` (True / False / None when there is no target). Without ``"figures"``, every
number in the dict (nested keys joined with dots) becomes a row without a target.
Everything each benchmark returned, plus the machine it ran on, goes to
``bench/results.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_PATH = Path(__file__).resolve().with_name("results.json")
#: (module, time budget in s): ~10 minutes in all on a 2-core machine
BENCHMARKS: tuple[tuple[str, float], ...] = (
    ("bench_ingest", 200.0),
    ("bench_e2e", 140.0),
    ("bench_inference", 75.0),
    ("bench_encode", 75.0),
    ("bench_memory", 90.0),
    ("bench_phantom", 60.0),
    ("bench_load", 90.0),
)
#: extra seconds a child gets beyond its budget (start-up, imports) before it is killed
GRACE_S = 30.0
VERSIONED_PACKAGES = ("pynetdicom", "pydicom", "highdicom", "numpy", "torch", "scipy", "prometheus-client")


# -- machine ---------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _tool_version(args: Sequence[str]) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, load, and the versions of what the figures depend on."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory_gb: float | None = round(mem_kb / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        memory_gb = None
    cuda = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": memory_gb,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": versions,
        "dcmtk": _tool_version(["/usr/bin/storescp", "--version"]),
        "orthanc": _tool_version(["Orthanc", "--version"]),
        "cuda_device": cuda,
    }


# -- running one benchmark -----------------------------------------------------------------------


def _call_run(module_name: str, budget_s: float) -> dict[str, Any]:
    """Import ``bench.<module_name>`` and call its ``run`` (with the budget when it takes one)."""
    module = importlib.import_module(f"bench.{module_name}")
    run = module.run
    if "budget_s" in inspect.signature(run).parameters:
        result = run(budget_s=budget_s)
    else:
        result = run()
    if not isinstance(result, dict):
        raise TypeError(f"bench.{module_name}.run() returned {type(result).__name__}, not dict")
    return result


def run_one(module_name: str, budget_s: float) -> dict[str, Any]:
    """Run one benchmark in a child process with a hard limit; its dict plus status fields."""
    if importlib.util.find_spec(f"bench.{module_name}") is None:
        return {"status": "not available", "figures": []}
    with tempfile.TemporaryDirectory(prefix="lumbar-bench-") as tmp:
        out = Path(tmp) / "result.json"
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.run", "--child", module_name, "--budget", str(budget_s), "--out", str(out)],
                capture_output=True,
                text=True,
                timeout=budget_s + GRACE_S,
                check=False,
                cwd=Path(__file__).resolve().parents[1],
            )
        except subprocess.TimeoutExpired:
            return {"status": f"timed out after {budget_s + GRACE_S:.0f} s", "figures": []}
        elapsed = round(time.monotonic() - started, 1)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout or "")[-1500:]
            return {"status": f"failed (exit {proc.returncode})", "error": tail, "figures": [], "elapsed_s": elapsed}
        result: dict[str, Any] = json.loads(out.read_text())
    result.setdefault("status", "ok")
    result["elapsed_s"] = elapsed
    return result


def _child(module_name: str, budget_s: float, out: Path) -> int:
    result = _call_run(module_name, budget_s)
    out.write_text(json.dumps(result, default=str))
    return 0


# -- the table ---------------------------------------------------------------------------------------


def _flatten(prefix: str, value: Any, rows: list[dict[str, Any]]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        rows.append({"figure": prefix, "value": value, "unit": "", "met": None})
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in ("status", "elapsed_s", "figures", "notes", "error"):
                continue
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, rows)


def rows_of(name: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows for one benchmark's result (its ``figures`` or its flattened numbers)."""
    figures = result.get("figures")
    if isinstance(figures, list) and figures:
        return [dict(row) for row in figures if isinstance(row, dict)]
    if result.get("status", "ok") != "ok":
        return [{"figure": name, "value": None, "unit": "", "note": result["status"], "met": None}]
    rows: list[dict[str, Any]] = []
    _flatten("", {k: v for k, v in result.items() if k != "details"}, rows)
    for row in rows:
        row["figure"] = f"{name}: {row['figure']}"
    return rows or [{"figure": name, "value": None, "unit": "", "note": "no figures", "met": None}]


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def print_table(results: dict[str, dict[str, Any]], machine: dict[str, Any]) -> None:
    """The one table (rich), with the machine in its title."""
    from rich.console import Console
    from rich.table import Table

    title = f"lumbar-node benchmarks - {machine['cpu_model']}, {machine['usable_cores']} cores, load {machine['load_average_at_start']}"
    table = Table(title=title, show_lines=False)
    for column in ("figure", "value", "reference", "ratio", "target", "met?"):
        table.add_column(column, justify="left" if column in ("figure", "target") else "right")
    for name, result in results.items():
        for row in rows_of(name.removeprefix("bench_"), result):
            met = row.get("met")
            mark = "[green]yes[/]" if met is True else "[red]NO[/]" if met is False else ""
            reference = _fmt(row.get("reference"), row.get("unit", ""))
            if row.get("reference") is not None and row.get("reference_name"):
                reference += f" ({row['reference_name']})"
            value = _fmt(row.get("value"), row.get("unit", "")) if row.get("value") is not None else row.get("note", "-")
            table.add_row(str(row.get("figure")), value, reference, _fmt(row.get("ratio")), str(row.get("target") or ""), mark)
    Console(width=160).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite (or, with ``--child``, one benchmark inside the child process)."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="benchmark modules to run (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.budget, args.out)
    machine = machine_info()
    selected = [(n, b) for n, b in BENCHMARKS if not args.only or n in args.only or n.removeprefix("bench_") in args.only]
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for name, budget in selected:
        print(f"running {name} (budget {budget:.0f} s) ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, budget)
        print(f"  {name}: {results[name].get('status')} in {results[name].get('elapsed_s', '-')} s", file=sys.stderr, flush=True)
    document = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "total_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "results": results,
    }
    args.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print_table(results, machine)
    print(f"wrote {args.out} ({document['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
