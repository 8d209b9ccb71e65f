"""The package's structure as a contract: imports go one way (no cycle, counting imports inside functions), no
private name crosses a package boundary, files stay readable, and heavy optional dependencies stay lazy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "distreward"
LAZY_ONLY = ("diffusers", "torch.utils.tensorboard", "tensorboard", "matplotlib", "PIL", "scipy")
MAX_LINES = 600


def modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, str, bool, ast.AST]]:
    """(imported module, imported name or '', inside a function?, node) for every import of ours in the file."""
    tree = ast.parse(path.read_text())
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}

    def in_function(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return True
        return False

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                out.append((full if full in known else mod, alias.name, in_function(node), node))
        elif isinstance(node, ast.Import):
            out += [(a.name, "", in_function(node), node) for a in node.names]
    return out


def edges() -> dict[str, set[str]]:
    known = modules()
    graph = {m: set() for m in known}
    for m, p in known.items():
        for target, _, _, _ in imports(m, p, known):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != m and target.startswith("distreward"):
                graph[m].add(target)
    return graph


def test_no_import_cycle():
    graph, state, stack = edges(), {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(w):] + [w]))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_private_name_crosses_a_package():
    known = modules()
    bad = [f"{m} imports {name} from {target}" for m, p in known.items()
           for target, name, _, _ in imports(m, p, known)
           if target.startswith("distreward") and name.startswith("_") and not name.startswith("__")
           and top_package(target) != top_package(m)]
    assert not bad, bad


def test_imports_sit_at_module_top_except_heavy_optional_ones():
    known = modules()
    bad = [f"{p.relative_to(SRC.parent)}:{node.lineno} imports {target}" for m, p in known.items()
           for target, _, inside, node in imports(m, p, known)
           if inside and not target.startswith(LAZY_ONLY) and target != "importlib"]
    assert not bad, bad


def test_source_files_stay_readable():
    long = {str(p.relative_to(SRC.parent)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
    assert len((SRC / "rl" / "grpo.py").read_text().splitlines()) <= 350, "the GRPO loop must stay readable (<= 350 lines)"


def test_merge_does_not_depend_on_rl():
    graph = edges()
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("distreward.merge") for t in ts
                 if t.startswith("distreward.rl"))
    assert not bad, bad


# --------------------------------------------------------------------------------------------- the RL frame

RL = SRC / "rl"
PG_EQUATIONS = ("group_advantages", "ppo_clip_loss", "gaussian_kl", "kl_estimate", "clip_masks", "clip_binds")
REWARD_INTERFACE = {"features", "score_features", "push_features", "keeps_state"}


def rl_trees() -> dict[str, ast.AST]:
    return {p.name: ast.parse(p.read_text()) for p in sorted(RL.glob("*.py"))}


def test_every_registered_trainer_is_an_algorithm_with_its_own_iteration():
    from distreward.rl import ALGORITHMS
    from distreward.rl.context import Algorithm

    for name, algorithm in ALGORITHMS.items():
        assert issubclass(algorithm, Algorithm) and algorithm.name == name, name
        assert algorithm.iteration is not Algorithm.iteration, f"{name} does not define iteration(ctx, it)"


def test_each_policy_gradient_equation_is_defined_once_in_pg():
    where = {}
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in PG_EQUATIONS:
                where.setdefault(node.name, []).append(str(p.relative_to(SRC)))
    assert where == {name: ["pg.py"] for name in PG_EQUATIONS}, where


def test_rl_reads_no_schema_default_again():
    """The validated config holds every key with its default: rl/ reads it, never `.get(key, default)`."""
    bad = [f"rl/{f}:{n.lineno}" for f, tree in rl_trees().items() for n in ast.walk(tree)
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get"
           and len(n.args) + len(n.keywords) > 1]
    assert not bad, bad


def test_only_the_shared_update_steps_an_optimizer():
    bad = [f"rl/{f}:{n.lineno}" for f, tree in rl_trees().items() if f != "step.py" for n in ast.walk(tree)
           if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "step"
           and "optim" in ast.unparse(n.func.value)]
    assert not bad, bad


def test_parallel_uses_the_reward_only_through_its_interface():
    tree = rl_trees()["parallel.py"]
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "reward"}
    introspect = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                  and n.func.id in ("hasattr", "getattr", "type", "isinstance")]
    assert read <= REWARD_INTERFACE and not introspect, (read - REWARD_INTERFACE, introspect)
