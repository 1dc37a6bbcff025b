"""The layout: each folder is one kind of thing, imports only go down, and there are no import cycles.

Layers, from the bottom: the library ``sega`` (models and math), the demo model ``sega.demo`` (may use the
library), the app's server side ``server`` (may use both), then ``app.py`` and ``benchmarks`` on top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"sega": 0, "sega.demo": 1, "server": 2, "app": 3, "benchmarks": 3}
OURS = ("sega", "server", "app", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    return "sega.demo" if module.startswith("sega.demo") else module.split(".")[0]


def imports_of(path: Path) -> set[str]:
    """Our modules that ``path`` imports (relative imports resolved), at any depth of the file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in OURS}
    return found


def graph() -> dict[str, set[str]]:
    files = [ROOT / "app.py", *ROOT.glob("sega/**/*.py"), *ROOT.glob("server/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]
    modules = {module_name(f): f for f in files}
    return {m: {i for i in imports_of(f) if i in modules and i != m} for m, f in modules.items()}


def test_imports_only_go_down_or_sideways_within_a_layer():
    wrong = [(m, i) for m, deps in graph().items() for i in deps if LAYERS[layer(i)] > LAYERS[layer(m)]]
    assert not wrong, wrong


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for dep in sorted(g[m]):
            if state.get(dep) == 1:
                return [*path, m, dep]
            if dep not in state and (cycle := visit(dep, [*path, m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state:
            assert visit(m, []) is None


def test_the_library_imports_without_gradio_or_spaces():
    # A finder that refuses gradio and spaces, as on a machine where they are not installed.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('gradio', 'spaces', 'gradio_client'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sega, sega.guidance, sega.pipeline, sega.demo.shapes, sega.demo.evaluate, sega.demo.train\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'spaces')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_guidance_math_imports_no_models():
    assert imports_of(ROOT / "sega" / "guidance.py") == set()


def test_nothing_refers_to_files_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = "../" + "shared"  # spelled apart so that this file does not match itself
    texts = [ROOT / f for f in tracked if f.endswith((".py", ".md", ".json", ".toml", ".txt"))]
    assert not [p for p in texts if outside in p.read_text(errors="ignore")]
