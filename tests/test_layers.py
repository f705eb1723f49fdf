"""clipgen's imports run one way: every `import` of clipgen (at the top of a file or inside a
function) goes down the layer order, and no chain of imports comes back to where it began."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "clipgen"

# Lowest first. A module may import its own layer and the layers listed after its name.
LAYERS = {
    "base": (),  # models, diffusion, data: nothing of clipgen above them
    "weights": ("base",),
    "core": ("base", "weights"),  # config, parallel, checkpoint, build, stages, sampling
    "train": ("base", "weights", "core"),
    "pipelines": ("base", "weights", "core"),
    "eval": ("base", "weights", "core", "pipelines"),
    "top": ("base", "weights", "core", "train", "pipelines", "eval"),  # demo, cli
}
PACKAGES = {
    "models": "base",
    "diffusion": "base",
    "data": "base",
    "weights": "weights",
    "train": "train",
    "pipelines": "pipelines",
    "eval": "eval",
}
TOP = {"demo", "cli"}
BASE = {"errors"}  # imported by every layer, imports nothing


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str | None:
    """The layer of a clipgen module; None for the package itself."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    if parts[0] in PACKAGES:
        return PACKAGES[parts[0]]
    if parts[0] in BASE:
        return "base"
    return "top" if parts[0] in TOP else "core"


def imports(module: str) -> list[tuple[int, str]]:
    """(line, clipgen module) for every import of clipgen in `module`, wherever it stands,
    and for importlib.import_module calls with a literal clipgen name."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.append((node.lineno, child if child in MODULES else base))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name.split(".")[0] == "clipgen"]


def graph() -> dict[str, list[tuple[int, str]]]:
    return {module: [(n, t) for n, t in imports(module) if t in MODULES] for module in MODULES}


def test_every_import_of_clipgen_runs_down_the_layers():
    wrong = []
    for module, edges in graph().items():
        mine = layer(module)
        for line, target in edges:
            theirs = layer(target)
            if mine is None or theirs is None or theirs == mine:
                continue
            if theirs not in LAYERS[mine]:
                wrong.append(
                    f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {target} "
                    f"({mine} may import only {', '.join(LAYERS[mine]) or 'its own layer'})"
                )
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_there_is_no_import_cycle():
    edges = graph()
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for line, target in edges[module]:
            if state.get(target) == "open":
                start = next(i for i, (m, _) in enumerate(path) if m == target)
                chain = [*path[start:], (module, line)]
                cycles.append(
                    " -> ".join(f"{MODULES[m].relative_to(PACKAGE.parent)}:{n}" for m, n in chain)
                    + f" -> {target}"
                )
            elif target not in state:
                visit(target, [*path, (module, line)])
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module, [(module, 0)])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_test_sees_imports_inside_functions():
    """The cycle the old house had lived inside function bodies; make sure those count."""
    lines = {name for _, name in imports("clipgen.cli.training")}
    assert "clipgen.eval.registry" in lines and "clipgen.pipelines.embed" in lines


def test_no_file_is_over_600_lines():
    long = {
        str(path.relative_to(PACKAGE.parent)): length
        for path in MODULES.values()
        if (length := len(path.read_text().splitlines())) > 600
    }
    assert not long, f"files over 600 lines: {long}"
