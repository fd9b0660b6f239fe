"""Imports run one way, floor by floor, and no two files import each other (directly or around a
circle): ``datamodules`` and ``analysis`` at the bottom, the model and callbacks above them, the
CLI, the study runner and the stages (``lightning_modules/stages/``) on top. Read from the source with ``ast``, so a function-level import
counts as much as one at the top of a file."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("datamodules", "analysis", "callbacks", "lightning_modules")
TOP = {"lightning_modules.main", "lightning_modules.cli", "lightning_modules.study", "lightning_modules.explain"}


def floor(module: str) -> int:
    if module in TOP or module.startswith("lightning_modules.stages"):  # each stage's start: top floor
        return 2
    return 0 if module.split(".")[0] in ("datamodules", "analysis") else 1


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports (``from .x import y`` resolved; a package counts as its __init__)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]  # what a relative import starts from
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def third_party_of(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_no_file_imports_a_higher_floor_and_the_bottom_floors_import_neither_other():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            up = floor(target) > floor(name)
            across = floor(name) == 0 and target.split(".")[0] != name.split(".")[0]
            if up or across:
                wrong.append(f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})")
    assert not wrong, "\n".join(wrong)


def test_analysis_is_free_of_lightning():
    modules = project_modules()
    banned = {"pytorch_lightning", "lightning"}
    wrong = [n for n, p in modules.items() if n.startswith("analysis") and third_party_of(p) & banned]
    assert not wrong, wrong


def test_no_circle_between_files():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not circles, "\n".join(circles)


def test_the_floor_check_sees_what_it_must():
    """The checker itself: a relative import, a function-level import and a package import are found."""
    modules = project_modules()
    assert "analysis.masks" in imports_of("callbacks.sketching", modules["callbacks.sketching"], set(modules))
    assert "lightning_modules.backbones" in imports_of("callbacks.sketching", modules["callbacks.sketching"], set(modules))
    stage = "lightning_modules.stages.report"
    assert "lightning_modules.explain" in imports_of(stage, modules[stage], set(modules))  # from ..explain
    assert floor(stage) == 2 and floor("lightning_modules.stages") == 2


def test_datamodules_get_backbone_tokenizers_from_the_model_floor_without_importing_it():
    import subprocess
    import sys

    probe = (
        "import sys, datamodules\n"
        "from datamodules.tokenizers import load_tokenizer_for\n"
        "assert not any(m.startswith(('lightning_modules', 'callbacks')) for m in sys.modules), 'imported a higher floor'\n"
        "try:\n"
        "    load_tokenizer_for('tiny-random')\n"
        "except datamodules.DataError as err:\n"
        "    print('refused:', err)\n"
        "import lightning_modules\n"
        "print('vocab', load_tokenizer_for('tiny-random').vocab_size)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: no tokenizer for backbone 'tiny-random'" in out.stdout
    assert "vocab " in out.stdout and int(out.stdout.split("vocab ")[1]) > 100


def test_a_runs_analysis_never_reads_the_study_level():
    """``analysis.study`` reads a whole study from its runs; the run-level analysis (everything else in
    ``analysis``) imports nothing from it, so run → study reads one way."""
    wrong = [f"{name} imports {target}" for name, targets in graph().items()
             if name.startswith("analysis.") and not name.startswith("analysis.study")
             for target in targets if target.startswith("analysis.study")]
    assert not wrong, "\n".join(wrong)
