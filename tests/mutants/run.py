"""Mutation testing: apply each planted mutation of tests/mutants/mutants.py to a temporary copy
of the repository, one at a time, run a fast test subset against it, and report which mutants
the tests kill. The working tree is never modified.

    python tests/mutants/run.py                 # every mutant (``make mutants``)
    python tests/mutants/run.py cb-argmax ...   # only these
    python tests/mutants/run.py --list          # the mutants and their subsets

A mutant is *killed* when the subset fails (or errors, or times out) with the mutation in place,
*survived* when it passes, and ERROR when its snippet does not occur exactly once in the file
(the code moved: update the snippet). The run first checks that the subset passes on the
unmutated copy and that the copy's ``memopt_func`` is the one imported. Hypothesis runs with a
fixed seed and no example database, so a run is reproducible.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutants import MUTANTS, SUBSETS, Mutant  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# Never copied: environments, caches, build outputs.
SKIP_DIRS = {".git", ".venv", "__pycache__", ".hypothesis", ".pytest_cache", ".benchmarks", "build", "dist", "out"}


def _tracked_files() -> list[str] | None:
    """Tracked and untracked-but-not-ignored files, when this is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [f for f in out.decode().split("\0") if f]


def copy_repository(dest: Path) -> None:
    """The working tree's source files (not the venv or caches) under dest."""
    files = _tracked_files()
    if files is None:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*SKIP_DIRS, "*.egg-info"), dirs_exist_ok=True)
        return
    for rel in files:
        src = ROOT / rel
        if not src.is_file() or any(part in SKIP_DIRS for part in Path(rel).parts):
            continue  # deleted in the working tree, or a cache
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + os.pathsep + env.get("PYTHONPATH", "")  # the copy's memopt_func wins
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale bytecode of a mutated module
    env.pop("HYPOTHESIS_PROFILE", None)
    return env


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout' | 'no tests', seconds, last output line) of pytest over
    tests in copy."""
    shutil.rmtree(copy / ".hypothesis", ignore_errors=True)
    cmd = [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0",
        "-o", "addopts=", "--benchmark-disable", *tests,
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=copy, env=_env(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - start, f"no result within {timeout:.0f} s"
    took = time.monotonic() - start
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    summary = _summary(lines)
    if proc.returncode == 0:
        return "passed", took, summary
    if proc.returncode == 5:
        return "no tests", took, summary
    return "failed", took, summary


def _summary(lines: list[str]) -> str:
    """The first failing test's id (or the last line pytest printed)."""
    for ln in lines:
        if ln.startswith(("FAILED ", "ERROR ")):
            return ln.split(" - ")[0]
    return lines[-1] if lines else ""


def _collects(copy: Path, entries: list[str]) -> bool:
    probe = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *entries],
        cwd=copy, env=_env(copy), capture_output=True, text=True,
    )
    return probe.returncode == 0


def existing_tests(copy: Path, tests: list[str]) -> list[str]:
    """The entries of a subset that pytest can collect in copy (missing ones are reported)."""
    if _collects(copy, tests):
        return list(tests)
    out = []
    for entry in tests:
        if _collects(copy, [entry]):
            out.append(entry)
        else:
            print(f"WARNING: dropped from the subset, pytest cannot collect it: {entry}", flush=True)
    return out


def check_copy_imports_itself(copy: Path) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import memopt_func, sys; sys.stdout.write(memopt_func.__file__)"],
        cwd=copy, env=_env(copy), capture_output=True, text=True,
    )
    where = Path(probe.stdout.strip() or "?").resolve()
    if probe.returncode != 0 or copy.resolve() not in where.parents:
        sys.exit(f"the copy does not import its own memopt_func (got {where}; stderr: {probe.stderr[-500:]})")


def mutate(copy: Path, mutant: Mutant) -> str | None:
    """Apply the mutation in copy; an error message if its snippet is not there exactly once."""
    path = copy / mutant.file
    if not path.is_file():
        return f"file {mutant.file} not found"
    text = path.read_text()
    found = text.count(mutant.original)
    if found != 1:
        return f"snippet found {found} times in {mutant.file} (want exactly 1)"
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per mutant (default 420)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        sys.exit("duplicate mutant ids in tests/mutants/mutants.py")
    unknown = sorted(set(args.ids) - set(ids))
    if unknown:
        sys.exit(f"unknown mutant ids: {unknown}")
    chosen = [m for m in MUTANTS if not args.ids or m.id in args.ids]
    if args.list:
        for m in chosen:
            print(f"{m.id:28} {m.file:32} [{m.tests}] {m.description}")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="memopt-mutants-"))
    copy = tmp / "repo"
    try:
        copy_repository(copy)
        check_copy_imports_itself(copy)
        print(f"mutating a copy of {ROOT} in {copy}", flush=True)
        subsets = {name: existing_tests(copy, SUBSETS[name]) for name in sorted({m.tests for m in chosen})}
        for name, tests in subsets.items():
            status, took, summary = run_tests(copy, tests, args.timeout)
            print(f"baseline [{name}]: {status} in {took:.0f} s", flush=True)
            if status != "passed":
                print(f"  {summary}\nthe unmutated copy must pass its subsets; fix that first", flush=True)
                return 2
        results = []
        for k, m in enumerate(chosen, 1):
            path = copy / m.file
            original_text = path.read_text() if path.is_file() else None
            error = mutate(copy, m)
            if error:
                status, took, summary = "ERROR", 0.0, error
            else:
                try:
                    status, took, summary = run_tests(copy, subsets[m.tests], args.timeout)
                finally:
                    path.write_text(original_text)
                status = {"passed": "survived", "failed": "killed", "timeout": "killed", "no tests": "ERROR"}[status]
            results.append((m, status, took, summary))
            print(f"[{k:2}/{len(chosen)}] {m.id:28} {status:8} {took:5.0f} s  {summary}", flush=True)
        return report(results)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report(results: list[tuple[Mutant, str, float, str]]) -> int:
    print()
    print(f"{'mutant':28} {'file':32} {'result':8} description")
    print("-" * 110)
    for m, status, _, _ in results:
        print(f"{m.id:28} {m.file:32} {status:8} {m.description}")
    killed = sum(s == "killed" for _, s, _, _ in results)
    survived = [(m, summary) for m, s, _, summary in results if s == "survived"]
    errors = [(m, summary) for m, s, _, summary in results if s == "ERROR"]
    ran = killed + len(survived)
    equivalent = sum(m.judgement.startswith("equivalent") for m, _ in survived)
    print()
    if ran:
        print(f"killed {killed} of {ran} ({100 * killed / ran:.0f}%)", end="")
        if ran - equivalent:
            print(f"; {100 * killed / (ran - equivalent):.0f}% of the {ran - equivalent} not judged equivalent", end="")
        print(f"; total {sum(t for _, _, t, _ in results) / 60:.1f} min")
    if survived:
        print("\nsurvivors:")
        for m, _ in survived:
            print(f"  {m.id}: {m.judgement}")
    if errors:
        print("\nERRORS (mutation not applied, update tests/mutants/mutants.py):")
        for m, why in errors:
            print(f"  {m.id}: {why}")
    gaps = [m for m, _ in survived if not m.judgement.startswith("equivalent")]
    return 1 if gaps or errors else 0


if __name__ == "__main__":
    sys.exit(main())
