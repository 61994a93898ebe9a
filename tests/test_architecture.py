"""The house rules of ``docs/architecture.md``, checked on the source (every import, also inside functions) and in a
fresh interpreter:

* no import cycle among the modules of ``ptv2_plugin`` and ``exporters``;
* ``ptv2_plugin`` never imports ``exporters``, ``onnx`` or ``onnxruntime`` (one lazy, deprecated alias excepted);
* the serving package never reaches the tracer, directly or through another module;
* project modules are imported at the top of files, never inside functions.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.child_process import run_python

pytestmark = pytest.mark.lane_independent  # no transformers-version dependence: one lane runs it

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ptv2_plugin", "exporters")
FORBIDDEN_IN_PLUGIN = ("exporters", "onnx", "onnxruntime")
SERVING = "exporters.onnx.serving"
# What serving may use besides itself: names, caches, providers and tolerances; everything else in exporters.onnx
# is the tracer (export, plan, trace, model_patcher, seq2seq, fused_attention, postprocess, folder, validate, ...).
SERVING_MAY_USE = ("exporters.onnx.layout", "exporters.onnx.caches", "exporters.onnx.providers",
                   "exporters.onnx.tolerances")
# The one lazy reference from the plugin to the exporter: ``ptv2_plugin.ExportOnnxCallback``, deprecated.
PLUGIN_SHIM = ("ptv2_plugin", "__getattr__", "exporters.onnx")


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the module imported (a submodule where ``from package import name`` names one)
    line: int
    function: str | None  # the enclosing function, None at module level
    dynamic: bool = False  # importlib.import_module("...") with a constant name


def module_files(root: Path = ROOT) -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _resolve(importer: str, is_package: bool, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, modules: set[str]) -> list[Import]:
    """Every import statement of one file (and constant ``import_module`` calls), with its enclosing function."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, child.lineno, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(name, is_package, child.module, child.level)
                for alias in child.names:
                    submodule = f"{target}.{alias.name}"
                    found.append(Import(name, submodule if submodule in modules else target, child.lineno, function))
            elif (isinstance(child, ast.Call) and getattr(child.func, "id", getattr(child.func, "attr", None))
                  == "import_module" and child.args and isinstance(child.args[0], ast.Constant)):
                found.append(Import(name, str(child.args[0].value), child.lineno, function, dynamic=True))
            visit(child, inner)

    visit(tree, None)
    return found


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], list[Import]]:
    """Project module -> project modules it imports, and every import found."""
    files = module_files(root)
    names = set(files)
    everything = [imp for name, path in files.items() for imp in imports_of(name, path, names)]
    graph: dict[str, set[str]] = {name: set() for name in names}
    for imp in everything:
        if imp.target in names and imp.target != imp.importer and not imp.dynamic:
            graph[imp.importer].add(imp.target)
    return graph, everything


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def reachable(graph: dict[str, set[str]], start: list[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def _is_under(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def violations(root: Path = ROOT) -> list[str]:
    """Every broken rule, as readable lines (empty: the house stands)."""
    graph, everything = import_graph(root)
    problems = []
    cycle = find_cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    for imp in everything:
        where = f"{imp.importer}:{imp.line}"
        if _is_under(imp.importer, ("ptv2_plugin",)) and _is_under(imp.target, FORBIDDEN_IN_PLUGIN):
            if (imp.importer, imp.function, imp.target) != PLUGIN_SHIM or not imp.dynamic:
                problems.append(f"{where} imports {imp.target}: ptv2_plugin must not know the exporter")
        if imp.function is not None and not imp.dynamic and _is_under(imp.target, PACKAGES):
            problems.append(f"{where} imports {imp.target} inside {imp.function}(): import project modules at the top")
    serving = [name for name in graph if _is_under(name, (SERVING,))]
    reached = reachable(graph, serving)
    for name in sorted(reached):
        if _is_under(name, ("exporters",)) and name not in ("exporters", "exporters.onnx") \
                and not _is_under(name, (SERVING, *SERVING_MAY_USE)):
            via = sorted(m for m in reached if name in graph[m])
            problems.append(f"serving reaches the tracer module {name} (imported by {', '.join(via)})")
    return problems


# ------------------------------------------------------------------------------------------------------ tests
def test_the_house_rules_hold():
    assert violations() == []


def test_the_checker_sees_every_kind_of_violation(tmp_path):
    """The rules above catch what they name: a copy of the sources with four bad imports fails on each."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())

    def add(relative: str, code: str) -> None:
        path = tmp_path / relative
        path.write_text(path.read_text() + "\n" + code + "\n")

    assert violations(tmp_path) == []
    add("ptv2_plugin/training.py", "def _late():\n    import onnxruntime\n")
    add("exporters/onnx/serving/generation.py", "from ..validate import ParityReport")
    add("exporters/onnx/layout.py", "from .serving import load")  # layout -> serving -> ... -> layout
    add("exporters/onnx/plan.py", "def _late():\n    from .export import export\n")
    found = "\n".join(violations(tmp_path))
    assert "ptv2_plugin.training" in found and "onnxruntime" in found
    assert "serving reaches the tracer module exporters.onnx.validate" in found
    assert "import cycle:" in found and "exporters.onnx.layout" in found
    assert "exporters.onnx.plan" in found and "inside _late()" in found


def _loaded(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; the project and ONNX modules it left in ``sys.modules``."""
    output = run_python(
        "import json, sys, warnings\n" + code + "\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('exporters', 'onnx', 'onnxruntime'))))",
        timeout=180,
    )
    return json.loads(output.strip().splitlines()[-1])


def test_importing_the_plugin_loads_no_exporter():
    assert _loaded("import ptv2_plugin") == []


def test_importing_serving_loads_no_tracer():
    """``exporters.onnx``'s serving names come from the serving package alone (the export side loads on demand)."""
    loaded = _loaded("from exporters.onnx import ORTModelForCausalLM, load")
    assert "exporters.onnx.serving.session" in loaded and "onnx" not in loaded  # onnxruntime only, no onnx
    assert [m for m in loaded if m.startswith("exporters.onnx.") and not _is_under(m, (SERVING, *SERVING_MAY_USE))] \
        == []


def test_deprecated_callback_alias_warns_and_is_the_exporter_class():
    import ptv2_plugin
    from exporters.onnx import ExportOnnxCallback

    with pytest.warns(DeprecationWarning, match=r"from exporters\.onnx import ExportOnnxCallback"):
        alias = ptv2_plugin.ExportOnnxCallback
    assert alias is ExportOnnxCallback
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        ptv2_plugin.NoSuchName  # noqa: B018


# -------------------------------------------------------------------------------------- the plugin's export seam
def test_prefix_source_seam_replaces_the_prefix_and_export_leaves_none_behind(tmp_path):
    """``PTuningV2Layer.prefix_source`` is where the exporter supplies the prefix: set, the layers use what it gives
    (here the same prefix doubled, which changes the output); reset, the model is bit for bit what it was. An export
    goes through it and leaves every layer as it found it."""
    from peft import get_peft_model

    from exporters.onnx import export
    from ptv2_plugin import PTuningV2Config, PTuningV2Layer
    from ptv2_plugin.attention import ActivePrefix
    from tests.tiny_models import sample_inputs, tiny_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("bert", "SEQ_CLS"),
                           PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=3, prefix_init_std=1.0)).eval()
    inputs = sample_inputs("bert")
    layers = [m for m in model.modules() if isinstance(m, PTuningV2Layer)]
    with torch.no_grad():
        reference = model(**inputs).logits
        for layer in layers:
            own = layer.prefix(["default"])
            layer.prefix_source = lambda names, own=own: ActivePrefix(own.key * 2, own.value * 2)
        doubled = model(**inputs).logits
        for layer in layers:
            layer.prefix_source = None
        again = model(**inputs).logits
    assert (doubled - reference).abs().max() > 1e-3
    assert torch.equal(again, reference)
    export(model, tmp_path / "onnx", validate=False)
    assert all(layer.prefix_source is None and "prefix" not in layer.__dict__ for layer in layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
