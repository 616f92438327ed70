#!/usr/bin/env python
"""Run the Triton kernel tests where only torch and triton are installed (a GPU machine).

The project need not be installed: `attentionpack_vllm.kernels` is loaded from the
checkout's `kernels/` (see `_kernels.register_installed_name`). tests/conftest.py is
not loaded (it builds vLLM-side test models); the kernel test files need only torch,
triton and the helpers beside them. With pytest installed the files run under pytest;
without it, a small built-in runner runs them (parametrize, skipif, raises, skip and
the monkeypatch fixture are all these files use).

    python benchmarks/run_kernel_tests.py [--json PATH] [-k SUBSTRING] [files ...]

Exit status 0 when nothing failed. Without CUDA, tests run on CPU under
TRITON_INTERPRET=1 (set here before triton is imported).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import sys
import time
import traceback
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TESTS = REPO / "tests"
DEFAULT_FILES = ["tests/test_triton_kernel.py", "tests/test_dense_paged_kernel.py"]


# --------------------------------------------------------------------------- a minimal pytest

class Skipped(Exception):
    pass


class _SkipIf:
    def __init__(self, condition, reason=""):
        self.condition, self.reason = bool(condition), reason

    def __call__(self, func):
        func.__dict__.setdefault("_skips", []).append(self)
        return func


class _Param:
    def __init__(self, *values, marks=(), id=None):  # noqa: A002 - pytest's name
        self.values = values
        self.marks = marks if isinstance(marks, (list, tuple)) else (marks,)
        self.id = id


class _Named:
    """pytest.mark.<name>: a no-op decorator (markers only select tests under pytest)."""

    def __call__(self, func):
        return func


def _parametrize(argnames, argvalues, ids=None):
    names = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else list(argnames)

    def decorate(func):
        func.__dict__.setdefault("_params", []).insert(0, (names, list(argvalues), ids))
        return func
    return decorate


class _Mark:
    parametrize = staticmethod(_parametrize)
    skipif = _SkipIf

    def __getattr__(self, name):
        return _Named()


class _Raises:
    def __init__(self, expected, match=None):
        self.expected, self.match = expected, match

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            raise AssertionError(f"DID NOT RAISE {self.expected}")
        if not issubclass(kind, self.expected):
            return False
        if self.match is not None and not re.search(self.match, str(value)):
            raise AssertionError(f"{value!r} does not match {self.match!r}")
        return True


class MonkeyPatch:
    def __init__(self):
        self._undo = []

    def setattr(self, target, name, value):
        self._undo.append((target, name, getattr(target, name)))
        setattr(target, name, value)

    def undo(self):
        for target, name, old in reversed(self._undo):
            setattr(target, name, old)
        self._undo.clear()


def fake_pytest() -> types.ModuleType:
    module = types.ModuleType("pytest")
    module.mark = _Mark()
    module.param = _Param
    module.raises = _Raises
    module.MonkeyPatch = MonkeyPatch

    def skip(reason=""):
        raise Skipped(reason)
    module.skip = skip
    module.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
    return module


def _cases(func):
    """(id, kwargs, skip reason or None) for every parameter combination of a test."""
    params = func.__dict__.get("_params", [])
    axes = []
    for names, values, ids in params:
        axis = []
        for i, value in enumerate(values):
            marks, ident = (), None
            if isinstance(value, _Param):
                marks, ident, value = value.marks, value.id, value.values
                value = value[0] if len(names) == 1 else value
            if ident is None:
                ident = ids[i] if ids else (str(value) if len(names) == 1 else "-".join(map(str, value)))
            kwargs = {names[0]: value} if len(names) == 1 else dict(zip(names, value))
            reason = next((m.reason or "skipif" for m in marks if isinstance(m, _SkipIf) and m.condition), None)
            axis.append((ident, kwargs, reason))
        axes.append(axis)
    for combo in itertools.product(*axes):
        ident = "-".join(c[0] for c in combo)
        kwargs = {}
        for c in combo:
            kwargs.update(c[1])
        reason = next((c[2] for c in combo if c[2]), None)
        yield ident, kwargs, reason


def run_builtin(files: list[Path], keyword: str | None, results: list, saved) -> list[dict]:
    sys.modules["pytest"] = fake_pytest()
    for path in files:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        for name, func in list(vars(module).items()):
            if not (name.startswith("test_") and inspect.isfunction(func)):
                continue
            skips = [s for s in func.__dict__.get("_skips", []) if s.condition]
            for ident, kwargs, reason in _cases(func):
                test_id = f"{path.name}::{name}" + (f"[{ident}]" if ident else "")
                if keyword and keyword not in test_id:
                    continue
                reason = reason or (skips[0].reason if skips else None)
                start = time.perf_counter()
                outcome, message = "passed", ""
                patch = MonkeyPatch()
                try:
                    if reason:
                        raise Skipped(reason)
                    for fixture in inspect.signature(func).parameters:
                        if fixture == "monkeypatch":
                            kwargs["monkeypatch"] = patch
                        elif fixture not in kwargs:
                            raise RuntimeError(f"fixture {fixture!r} is not provided by this runner")
                    func(**kwargs)
                except Skipped as skipped:
                    outcome, message = "skipped", str(skipped)
                except Exception:  # noqa: BLE001 - a test failure of any kind
                    outcome, message = "failed", traceback.format_exc(limit=6)
                finally:
                    patch.undo()
                seconds = time.perf_counter() - start
                results.append(dict(test=test_id, outcome=outcome, seconds=round(seconds, 3), message=message))
                saved()
                print(f"{outcome.upper():8s} {test_id} ({seconds:.2f}s)" + (f": {message.splitlines()[-1]}"
                                                                          if outcome == "failed" else ""),
                      flush=True)
    return results


# --------------------------------------------------------------------------- under pytest

def run_pytest(pytest, files: list[Path], keyword: str | None, results: list, saved) -> list[dict]:
    class Collect:
        def pytest_collectreport(self, report):
            if report.failed:  # an import or collection error counts as a failure
                results.append(dict(test=report.nodeid or "collection", outcome="failed", seconds=0.0,
                                    message=str(report.longrepr)[-3000:]))
                saved()

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                message = ""
                if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                    message = report.longrepr[2]
                elif report.outcome == "failed":
                    message = str(report.longrepr)[-3000:]
                results.append(dict(test=report.nodeid, outcome=report.outcome,
                                    seconds=round(report.duration, 3), message=message))
                saved()

    argv = ["-q", "-rs", "--noconftest", "-p", "no:cacheprovider", "-o", "addopts=",
            "--rootdir", str(REPO), *map(str, files)]
    if keyword:
        argv += ["-k", keyword]
    pytest.main(argv, plugins=[Collect()])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=DEFAULT_FILES)
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    parser.add_argument("-k", dest="keyword", help="only tests whose id contains this (built-in runner: a substring)")
    parser.add_argument("--without-pytest", action="store_true",
                        help="use the built-in runner even if pytest is installed")
    parser.add_argument("--without-install", action="store_true",
                        help="ignore an editable install of the project (checks the no-install route)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    import _kernels
    if args.without_install:
        _kernels.drop_editable_install()
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    source = _kernels.register_installed_name()
    sys.path.insert(0, str(TESTS))
    files = [(REPO / f).resolve() for f in args.files]

    pytest = None
    if not args.without_pytest:
        with contextlib.suppress(ImportError):
            import pytest
    start = time.perf_counter()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (Triton interpreter)"
    runner = f"pytest {pytest.__version__}" if pytest else "built-in"
    print(f"kernel tests: runner {runner}; kernels: {source}; device: {device}", flush=True)
    results: list[dict] = []

    def counts() -> dict:
        return {k: sum(r["outcome"] == k for r in results) for k in ("passed", "failed", "skipped")}

    def saved(complete: bool = False) -> None:
        """Written after every test: a run cut short by a timeout still leaves its outcomes."""
        if not args.json:
            return
        import triton
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            runner=runner, kernels=source, device=device, torch=torch.__version__, triton=triton.__version__,
            seconds=round(time.perf_counter() - start, 1), complete=complete, files=args.files,
            keyword=args.keyword, **counts(), results=results), indent=1))

    if pytest:
        run_pytest(pytest, files, args.keyword, results, saved)
    else:
        run_builtin(files, args.keyword, results, saved)
    saved(complete=True)
    c = counts()
    print(f"kernel tests: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped "
          f"in {time.perf_counter() - start:.1f}s", flush=True)
    ok = c["failed"] == 0 and c["passed"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
