"""The shape of the package: imports point down (no cycle), imports sit at the top of modules,
and no file or function grows past what a reader holds in mind. Each exception is named here
with its reason; a new offender fails with its name."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "preftune"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60

# each import of a preftune module inside a function, and why: each defers torch (or
# matplotlib) past `import preftune` and `preftune --help`
STARTUP = "`import preftune` and `preftune --help` must not wait for torch"
INLINE_IMPORTS = {
    ("preftune.api", "preftune.train.entry"): STARTUP,
    ("preftune.config", "preftune.validation"): STARTUP + " (the loss registry)",
    ("preftune.cli", "preftune.claims"): STARTUP,
    ("preftune.cli", "preftune.data.build"): STARTUP,
    ("preftune.cli", "preftune.data.build_rso"): STARTUP,
    ("preftune.cli", "preftune.losses"): STARTUP,
    ("preftune.cli", "preftune.report"): STARTUP + " or matplotlib",
}
# third-party packages a module may import inside a function, and why: optional extras, or a
# dependency only some sources need
OPTIONAL = {
    "datasets": "Parquet, saved folders and the hub only: with pandas and pyarrow it holds "
    "0.08 GiB resident that a run on a JSONL file or a bundled set does not need",
    "vllm": "generation on a GPU when installed (preftune[vllm])",
    "deepspeed": "ZeRO when installed (preftune[deepspeed])",
    "gguf": "read once, to convert the embedded default model; its absence gets an install hint",
}

FILE_EXCEPTIONS: dict[str, str] = {}
FUNCTION_EXCEPTIONS: dict[str, str] = {
    "preftune.validation._value_checks": "a table of one-line (holds, message) checks",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _targets(node, here: str, is_pkg: bool, mods: dict) -> list[str]:
    """The preftune modules an import statement loads (a `from pkg import sub` loads sub)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = here.split(".") if is_pkg else here.split(".")[:-1]
        base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
    return subs if len(subs) == len(node.names) else [base, *subs]


def imports(mods: dict) -> tuple[dict[str, set], list[tuple[str, str, int]]]:
    """(module -> preftune modules it imports, [(module, imported, line) inside functions])."""
    graph, inline = {m: set() for m in mods}, []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        in_function = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(node, name, path.name == "__init__.py", mods):
                if id(node) in in_function:
                    inline.append((name, target, node.lineno))
                if target in mods and target != name:
                    graph[name].add(target)
    return graph, inline


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(imports(modules())[0]) == []


def test_imports_inside_functions_are_the_named_exceptions():
    mods = modules()
    bad = [
        f"{m}:{line} imports {t}"
        for m, t, line in imports(mods)[1]
        if (t.startswith("preftune") and (m, t) not in INLINE_IMPORTS)
        or (not t.startswith("preftune") and t.split(".")[0] not in OPTIONAL and t not in OPTIONAL)
    ]
    assert bad == []


def too_long(name: str, text: str) -> tuple[list[str], list[str]]:
    """(the file if over MAX_FILE_LINES, [each function over MAX_FUNCTION_LINES]), by name."""
    files = [f"{name}: {len(text.splitlines())} lines"]
    if len(text.splitlines()) <= MAX_FILE_LINES or name in FILE_EXCEPTIONS:
        files = []
    functions = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n, qual = node.end_lineno - node.lineno + 1, f"{name}.{node.name}"
            if n > MAX_FUNCTION_LINES and qual not in FUNCTION_EXCEPTIONS:
                functions.append(f"{qual}: {n} lines")
    return files, functions


def test_no_file_or_function_too_long():
    long_files, long_functions = [], []
    for name, path in modules().items():
        files, functions = too_long(name, path.read_text())
        long_files += files
        long_functions += functions
    assert long_files == [] and long_functions == []


def test_the_checks_see_a_cycle_an_inline_import_and_a_long_function():
    """The graph and the measures work: a two-module cycle is found, an inline import seen, a
    function one line too long and a file one line too long named."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]
    mods = modules()
    graph, inline = imports(mods)
    assert "preftune.train.loop" in graph["preftune.train.entry"]
    assert any(m == "preftune.api" and t == "preftune.train.entry" for m, t, _ in inline)
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    files, functions = too_long("m", f"def f():\n{body}\n\ndef g():\n    pass\n")
    assert files == [] and functions == [f"m.f: {MAX_FUNCTION_LINES + 1} lines"]
    assert too_long("m", "x = 1\n" * (MAX_FILE_LINES + 1))[0] == [f"m: {MAX_FILE_LINES + 1} lines"]
