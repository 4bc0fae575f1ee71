"""The package's import map (docs/architecture.md, "The import map"): no import circle, counting
imports inside functions too, and no arrow from a module below recipes/ up into it. Read from the
source (an AST walk), so a new circle fails here in a second, before it is papered over with a
function-local import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gemma_hf"
# Modules allowed to import gemma_hf.recipes: the commands that run recipes.
RECIPE_CALLERS = ("gemma_hf.commands", "gemma_hf.cli", "gemma_hf.demo", "gemma_hf.recipes")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_graph() -> dict[str, set[str]]:
    """module -> the gemma_hf modules it imports (module level and inside functions; not under
    TYPE_CHECKING). ``from PKG import sub`` depends on the submodule only (PKG, its parent, is
    initialised first by Python whatever the order)."""
    modules = _modules()

    def known(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        stack = [ast.parse(path.read_text(encoding="utf-8"))]
        while stack:
            node = stack.pop()
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                stack.append(child)
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = package.split(".")
                    if child.level:
                        base = base[:len(base) - (child.level - 1)]
                        source = ".".join(base + ([child.module] if child.module else []))
                    else:
                        source = child.module or ""
                    subs = [f"{source}.{a.name}" for a in child.names if f"{source}.{a.name}" in modules]
                    targets = subs if len(subs) == len(child.names) else [source, *subs]
                for target in targets:
                    if target.startswith("gemma_hf"):
                        target = known(target)
                        if target != name:
                            graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_circle():
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_below_recipes_imports_recipes():
    up = sorted((name, target) for name, targets in import_graph().items() for target in targets
                if target.startswith("gemma_hf.recipes") and not name.startswith(RECIPE_CALLERS))
    assert up == []


def test_the_model_imports_nothing_else_from_gemma_hf():
    # Remote code: a checkpoint carries gemma_hf/model/*.py and nothing else (docs/architecture.md).
    bad = sorted((name, target) for name, targets in import_graph().items() if name.startswith("gemma_hf.model")
                 for target in targets if not target.startswith("gemma_hf.model"))
    assert bad == []


def test_methods_never_import_the_engine_that_calls_them():
    graph = import_graph()
    for name in ("sft", "reward", "distill", "rlhf", "methods", "schema", "validation", "config", "runtime", "publish"):
        assert "gemma_hf.recipes.engine" not in graph[f"gemma_hf.recipes.{name}"], name
