"""The package's layers, as ctfgen's docstring draws them, checked against the import graph: every
import of a ctfgen module sits at module top, goes to its own layer or a lower one, and no modules
import each other in a cycle. Also: the library raises only its own errors, and nothing in the
repository points outside the checkout."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

import ctfgen

SRC = Path(ctfgen.__file__).parent
ROOT = SRC.parents[1]
# Imported where they are used, not at module top: extras a user may not have installed (gradio,
# torch-fidelity, LPIPS and its torchvision VGG, Playwright) and heavy ones that only some calls need
# (matplotlib for figures, scikit-learn for k-means, SciPy for the Fréchet distance's matrix root).
LAZY_EXTRAS = ("gradio", "torch_fidelity", "lpips", "torchvision", "playwright", "torchao", "matplotlib", "sklearn",
               "scipy")
# ctfgen.utils.threads sets OpenMP's environment, which only counts before torch (and OpenMP) load.
LAZY_BY_DESIGN = {("ctfgen.utils.threads", "torch")}


def layers() -> dict[str, int]:
    """Package or module prefix -> layer number, read from the table in ctfgen's docstring."""
    table = {}
    for line in ctfgen.__doc__.splitlines():
        words = line.split()
        if words and words[0].isdigit():
            table.update({w: int(words[0]) for w in words if w.startswith("ctfgen.")})
    return table


def layer_of(module: str, table: dict[str, int]) -> int:
    if module == "ctfgen":
        return 0  # the package itself: public names resolved lazily, nothing imported at import time
    prefix = max((p for p in table if module == p or module.startswith(p + ".")), key=len, default=None)
    assert prefix is not None, f"{module} is in no layer of ctfgen's docstring"
    return table[prefix]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path):
    """(target module, line, at module top) for every import in `module`, ctfgen's and others'."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from ctfgen.x import y` names module ctfgen.x.y when there is one
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), node.lineno, id(node) in top


MODULES = modules()
EDGES = {m: [(t, line) for t, line, _ in imports(m, p) if t.split(".")[0] == "ctfgen"] for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    table = layers()
    assert len(set(table.values())) >= 6, "the layer table in ctfgen's docstring is missing"
    for module in MODULES:
        layer_of(module, table)


def test_no_module_imports_a_higher_layer():
    table = layers()
    upward = [f"{m}:{line} (layer {layer_of(m, table)}) imports {t} (layer {layer_of(t, table)})"
              for m, edges in EDGES.items() for t, line in edges if layer_of(t, table) > layer_of(m, table)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in EDGES.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in MODULES:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_imports_are_at_module_top():
    inner = [f"{m}:{line} imports {t} inside a function" for m, p in MODULES.items() for t, line, top in imports(m, p)
             if not top and not t.startswith(LAZY_EXTRAS) and (m, t) not in LAZY_BY_DESIGN]
    assert not inner, "\n".join(inner)


BUILTIN = {"ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "FileNotFoundError", "FileExistsError",
           "OSError", "Exception", "AssertionError"}


def test_the_library_raises_only_its_own_errors():
    """A user's mistake anywhere in the library is a CtfgenError (the CLI's one `error:` line)."""
    bare = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and getattr(node.exc.func, "id", None) in BUILTIN:
                bare.append(f"{m}:{node.lineno} raises {node.exc.func.id}")
    assert not bare, "\n".join(bare)


def test_nothing_points_outside_the_checkout():
    """Tests and code read only the repository (and the dataset's system folder), never its neighbours."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|/work/|~/study\b")
    here = Path(__file__).resolve()
    found = []
    for name in files:
        path = ROOT / name
        if path.resolve() == here or not path.is_file() or path.suffix in (".png", ".safetensors", ".npz", ".pt"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}:{i + 1}: {line.strip()}" for i, line in enumerate(text.splitlines()) if pattern.search(line)]
    assert not found, "\n".join(found)
