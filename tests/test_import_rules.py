"""The house rules of docs/architecture.md ("Which package may import which"), checked on the source.

Every ``import`` in node/, engines/ and storage/ counts, function-local ones included: a late import may keep
torch out of a light process's start-up, but it never makes a forbidden dependency or a cycle acceptable.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "engines", "storage")

# The composition roots: they start the roles, so they may import any of them; nothing else imports them.
COMPOSITION_ROOTS = ("node.__main__", "node.cli", "node.runtime.service", "node.runtime.supervisor", "node.demo")

# The model-family packages of engines/ (one per published system).
FAMILIES = ("engines.mae", "engines.dinov3", "engines.vit_classifier", "engines.orthodiffusion")

# (importer prefix, forbidden prefixes, why)
FORBIDDEN: list[tuple[str, tuple[str, ...], str]] = [
    ("engines", ("node", "storage"), "model code knows nothing of networking or the database"),
    ("storage", ("node", "engines", "torch"), "the database and spool layer serves every role"),
    ("node.settings", ("node", "storage", "engines", "torch"), "the settings object is read by every process"),
    ("node.dicom", ("torch", "engines", "node.pipeline", "node.results", "node.delivery", "node.web", "node.dicomweb"),
     "the DIMSE edge never runs the model (it stores through node.intake, as STOW-RS does)"),
    ("node.intake", ("torch", "engines", "pynetdicom", "starlette", "uvicorn", "httpx", "node.pipeline", "node.results",
                     "node.delivery", "node.web", "node.dicomweb", "node.dicom.receiver", "node.dicom.scu",
                     "node.dicom.pynetdicom_patches", "node.dicom.policy", "node.dicom.tls"),
     "the intake path C-STORE and STOW-RS share speaks no protocol"),
    ("node.dicomweb", ("torch", "engines", "pynetdicom", "node.pipeline", "node.results", "node.delivery", "node.web",
                       "node.dicom.receiver", "node.dicom.scu", "node.dicom.pynetdicom_patches", "node.dicom.policy"),
     "the DICOMweb (HTTP) edge stores through node.intake and never runs the model"),
    ("node.results", ("torch", "engines", "storage", "node.pipeline", "node.dicom", "node.delivery", "node.web"),
     "result builders turn values into DICOM objects, nothing more"),
    ("node.delivery", ("torch", "engines", "node.pipeline", "node.results", "node.web", "node.dicomweb", "node.intake"),
     "delivery moves finished objects"),
    ("node.web", ("torch", "engines", "node.pipeline", "node.delivery", "node.dicom.receiver", "node.dicomweb",
                  "node.intake"),
     "the dashboard reads the database and spool"),
    ("node.pipeline", ("node.web", "node.dicom.receiver", "node.delivery.sender", "node.dicomweb", "node.intake"),
     "pipeline roles meet the other roles only through the database and the spool"),
    ("engines.family", FAMILIES + ("engines.training",), "the protocol every family implements names none of them"),
    ("engines.backends", FAMILIES + ("engines.training",), "backends take tensors (or graphs), never a family"),
    ("engines.imaging", FAMILIES + ("engines.training",), "the shared image path serves every family"),
    ("engines.heads", FAMILIES + ("engines.training",), "heads sit on any family's embedding"),
    ("engines.calibration", FAMILIES + ("engines.training",), "calibration is family-neutral"),
    ("engines.mae", ("engines.training",), "inference never needs the training code"),
    ("node.runtime.faults", ("node", "storage", "engines"), "fault points are importable from anywhere"),
    ("node.runtime.logs", ("node", "storage", "engines"), "logging set-up is importable from anywhere"),
]
ALLOWED_INSIDE = {"node.settings": ("node.settings", "node.pipeline.triage_rules")}

# Where a function-local import of a project module is allowed: composition roots pick the role to import
# (so the receiver's process never loads torch), and engines/__init__ exports lazily for the same reason.
LAZY_IMPORTS_ALLOWED = COMPOSITION_ROOTS + ("engines",)

# Processes that must start without torch: the receiver, the sender, the scheduler, the web role.
TORCH_FREE = ("node.dicom.receiver", "node.dicomweb.app", "node.intake", "node.delivery.sender", "node.pipeline.scheduler",
              "node.web.app", "node.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str, modules: Iterable[str]) -> set[str]:
    """The modules ``path`` imports (absolute names, relative imports resolved), at any nesting.

    ``from pkg import sub`` counts as an import of ``pkg.sub`` when that is a module (not of ``pkg``: a package
    initialising its own submodules is how packages work); ``from pkg.mod import Symbol`` counts as ``pkg.mod``.
    Third-party names are kept whole (``torch.nn``), so a rule can name their top package.
    """
    known = set(modules)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {target})
    resolved = set()
    for name in found:
        if name.split(".")[0] in PACKAGES:
            while name and name not in known:
                name = name.rpartition(".")[0]
        if name and name != "__future__":
            resolved.add(name)
    return resolved - {module}


def project_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "migrations" not in p.parts]
    modules = {module_name(p): p for p in files}
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    found = []
    for importer, targets in sorted(graph.items()):
        for prefix, forbidden, why in FORBIDDEN:
            if not under(importer, prefix):
                continue
            allowed = ALLOWED_INSIDE.get(prefix, ())
            for target in sorted(targets):
                if any(under(target, f) for f in forbidden) and not any(under(target, a) for a in allowed):
                    found.append(f"{importer} imports {target} ({prefix}: {why})")
        for target in targets:
            if any(under(target, root) for root in COMPOSITION_ROOTS) and not any(
                under(importer, root) for root in COMPOSITION_ROOTS
            ):
                found.append(f"{importer} imports the composition root {target}")
    return found


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def function_local_project_imports(path: Path) -> list[str]:
    """Imports of node/engines/storage inside a function (``if TYPE_CHECKING:`` blocks are types, not imports)."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [f"{function.name}: {name}" for name in names if name.split(".")[0] in PACKAGES]
    return found


# -- the checks on the project ------------------------------------------------------------------------
def test_no_package_imports_what_the_layout_forbids() -> None:
    assert violations(project_graph()) == []


def test_no_import_cycles_even_through_function_local_imports() -> None:
    assert cycles(project_graph()) == []


def test_function_local_imports_only_where_a_role_is_chosen() -> None:
    offenders = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = module_name(path)
            if "migrations" in path.parts or name in LAZY_IMPORTS_ALLOWED or any(
                under(name, root) for root in COMPOSITION_ROOTS
            ):
                continue
            found = function_local_project_imports(path)
            if found:
                offenders[name] = found
    assert offenders == {}


@pytest.mark.parametrize("module", TORCH_FREE)
def test_light_roles_start_without_torch(module: str) -> None:
    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 3, f"importing {module} loads torch"
    assert result.returncode == 0, result.stderr


PRIVATE_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import\s+(.+)|import\s+([\w.]+))", re.MULTILINE)
PATCH_MODULE = "node/dicom/pynetdicom_patches.py"


def private_third_party_imports(text: str) -> list[str]:
    """``from pkg._private import x``, ``from pkg import _private``, ``import pkg._private`` of non-project code."""
    found = []
    for match in PRIVATE_IMPORT.finditer(text):
        module = match.group(1) or match.group(3)
        if module.split(".")[0] in PACKAGES or module.startswith("."):
            continue
        names = [n.strip().split(" as ")[0].strip("() ") for n in (match.group(2) or "").split(",")]
        if any(part.startswith("_") and part != "__future__" for part in module.split(".")) or any(
            n.startswith("_") for n in names if n
        ):
            found.append(match.group(0).strip())
    return found


def test_no_private_api_of_a_third_party_package_outside_the_patch_module() -> None:
    offenders = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if relative == PATCH_MODULE:
                continue
            found = private_third_party_imports(path.read_text())
            if found:
                offenders[relative] = found
    assert offenders == {}


# -- the checkers themselves can fail -----------------------------------------------------------------
def test_the_checks_catch_what_they_are_for() -> None:
    graph = {
        "engines.mae.model": {"storage.db"},
        "node.dicom.receiver": {"torch", "node.settings"},
        "node.settings": {"node.pipeline.triage_rules"},
        "node.pipeline.a": {"node.pipeline.b"},
        "node.pipeline.b": {"node.pipeline.a"},
        "node.web.views": {"node.runtime.service"},
        "engines.backends.base": {"engines.mae.network"},
    }
    found = violations(graph)
    assert any(v.startswith("engines.mae.model imports storage.db") for v in found)
    assert any(v.startswith("node.dicom.receiver imports torch") for v in found)
    assert not any(v.startswith("node.settings") for v in found)
    assert any("composition root node.runtime.service" in v for v in found)
    assert any(v.startswith("engines.backends.base imports engines.mae.network") for v in found)
    assert cycles(graph) == [["node.pipeline.a", "node.pipeline.b"]]
    assert private_third_party_imports("from highdicom._standard_utils import x\nfrom pynetdicom import _config\n"
                                       "import torch\nfrom pynetdicom.sop_class import Verification\n") == [
        "from highdicom._standard_utils import x", "from pynetdicom import _config"]


def test_a_function_local_import_is_found(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nimport storage.db\nif TYPE_CHECKING:\n    import engines.heads\n"
                      "def f():\n    import os\n    from node.settings import Settings\n    return Settings\n")
    assert function_local_project_imports(source) == ["f: node.settings"]
