"""Check that `bsr`'s imports go downward only: no import cycle between modules or between packages, no import from
a lower layer into a higher one (docs/ARCHITECTURE.md), and no PyTorch in `bsr_device` (the torch-free device side).

Every module under bsr/ and bsr_device/ is parsed with `ast`; every import counts, including those inside functions (a lazy import is
still a dependency). Relative imports are resolved against the importing module's package; `from pkg import name`
counts as an import of the module `pkg.name` when that module exists, else of `pkg`. Only explicit imports count,
not the implicit import of a module's parent packages.

    python scripts/check_imports.py [--root DIR] [--verbose]

Prints the two graphs' sizes and every violation; exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# Layers, bottom to top; a module may import its own layer and the ones below. `device` is the torch-free package
# bsr_device (the on-device trainer, under everything); `base` holds bsr's top-level modules (errors, files, version);
# `api` is the package's own __init__ (the public names) and `python -m bsr`.
LAYERS = ("device", "base", "core", "data", "weights", "deploy", "train", "measure", "study", "cli", "api")
PACKAGES = ("bsr", "bsr_device")
TORCH_FREE = {"device": ("torch", "torchvision", "timm", "safetensors", "bsr")}  # what the device layer never imports


def module_name(path: Path, root: Path) -> str:
    """`bsr/train/loop.py` -> `bsr.train.loop`, `bsr/train/__init__.py` -> `bsr.train` (paths below `root`)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(path: Path, root: Path) -> str:
    """The layer of the module at `path`: its sub-package of bsr, `base` for bsr's own modules, `api` for bsr's
    `__init__` and `__main__`."""
    if path.is_relative_to(root / "bsr_device"):
        return "device"
    parts = path.relative_to(root / "bsr").parts
    if len(parts) > 1:
        return parts[0]
    return "api" if parts[0] in ("__init__.py", "__main__.py") else "base"


def imports_of(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The bsr modules that `tree` (the source of `module`) imports anywhere, lazily or not."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != module}


def top_level_imports(tree: ast.AST) -> set[str]:
    """The top-level package of every absolute import in `tree` (`import torch.nn` -> torch)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def scan(root: Path) -> tuple[dict[str, set[str]], dict[str, str], dict[str, set[str]]]:
    """(module -> the bsr modules it imports, module -> its layer, module -> top-level packages it imports), for
    every module under `root / "bsr"` and `root / "bsr_device"`."""
    files = [p for package in PACKAGES if (root / package).is_dir() for p in sorted((root / package).rglob("*.py"))]
    paths = {module_name(p, root): p for p in files}
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in paths.items()}
    graph = {m: imports_of(trees[m], m, p.name == "__init__.py", set(paths)) for m, p in paths.items()}
    return graph, {m: layer_of(p, root) for m, p in paths.items()}, {m: top_level_imports(t) for m, t in trees.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(graph: dict[str, set[str]], layers: dict[str, str],
               externals: dict[str, set[str]] | None = None) -> list[str]:
    """Every problem: unknown layers, upward imports, module cycles, package cycles, torch in the device layer."""
    problems = []
    for module, packages in sorted((externals or {}).items()):
        for package in sorted(packages & set(TORCH_FREE.get(layers[module], ()))):
            problems.append(f"forbidden import: {module} ({layers[module]}) imports {package}; the device side runs "
                            f"without PyTorch")
    for module, layer in sorted(layers.items()):
        if layer not in LAYERS:
            problems.append(f"{module}: package {layer!r} has no layer; add it to LAYERS in scripts/check_imports.py "
                            f"and docs/ARCHITECTURE.md")
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            src, dst = layers[module], layers[target]
            if src in LAYERS and dst in LAYERS and LAYERS.index(dst) > LAYERS.index(src):
                problems.append(f"upward import: {module} ({src}) imports {target} ({dst})")
    problems += [f"module cycle: {' -> '.join(c)}" for c in cycles(graph)]
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(layers[module], set()).update(layers[t] for t in targets if layers[t] != layers[module])
    problems += [f"package cycle: {' -> '.join(c)}" for c in cycles(packages)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="repository root (holding bsr/)")
    parser.add_argument("--verbose", action="store_true", help="print the package-level graph")
    args = parser.parse_args(argv)
    graph, layers, externals = scan(args.root)
    package_edges = {(layers[m], layers[t]) for m, ts in graph.items() for t in ts if layers[m] != layers[t]}
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports between them; "
          f"{len(set(layers.values()))} layers, {len(package_edges)} imports between layers")
    if args.verbose:
        for src in LAYERS:
            below = sorted({dst for s, dst in package_edges if s == src}, key=LAYERS.index)
            print(f"  {src:<8} -> {', '.join(below) or '(nothing)'}")
    problems = violations(graph, layers, externals)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} violations" if problems else
          f"no cycles, no upward imports ({' < '.join(LAYERS)})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
