"""The package's shape as promises: one tuner registry, torch-free validation (plugins included), no import
cycles, a small top level, the controlled variables, and the failure messages that used to mislead."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from petlbench.backbone import build_backbone
from petlbench.errors import ConfigError, TunerError
from petlbench.run.worker import execute
from petlbench.spec import controls
from petlbench.spec.models import GROUP_COLUMNS, PAIR_COLUMNS, BackboneSpec, RunSpec
from petlbench.tuners import TUNERS, Tuner
from petlbench.tuners.base import build_tuned_model
from tests.conftest import TinyVitFactory
from tests.test_worker import spec

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "petlbench"


def _imports(path: Path, module: str) -> set[str]:
    """petlbench modules imported anywhere in a file (inside functions too)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] == "petlbench"}


def test_no_import_cycles_and_a_small_top_level() -> None:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: {r for n in _imports(p, m) if (r := resolve(n)) and r != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*stack[stack.index(nxt) :], node, nxt])
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


# The layers, lowest first: a module imports only from its own layer or below (imports inside functions counted).
# Packages sit in one layer each, except `run`: its model builder sits below the estimator (which builds models with
# it) and the rest of it above (the sweep plans with estimates and runs the executors).
LAYERS = (
    ("petlbench", "petlbench.errors", "petlbench.fmt", "petlbench.system"),
    ("petlbench.spec.base", "petlbench.data.specs", "petlbench.data.vtab_tasks"),
    ("petlbench.tuners",),
    ("petlbench.spec",),
    ("petlbench.columns", "petlbench.why", "petlbench.data", "petlbench.backbone"),
    ("petlbench.results",),
    ("petlbench.measure", "petlbench.run.model", "petlbench.report", "petlbench.budget"),
    ("petlbench.executors",),
    ("petlbench.estimate",),
    ("petlbench.run",),
    ("petlbench.cli", "petlbench.__main__"),
)


def _layer(module: str) -> int:
    """The layer of a module: its longest matching prefix in LAYERS ('petlbench' alone matches only itself)."""
    best: tuple[int, int] | None = None
    for index, group in enumerate(LAYERS):
        for prefix in group:
            matches = module == prefix or (prefix != "petlbench" and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module}: in no layer; add it to LAYERS in tests/test_layout.py"
    return best[0]


def test_no_module_imports_from_a_higher_layer() -> None:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    upward = sorted(
        f"{module} -> {target}"
        for module, path in modules.items()
        for name in _imports(path, module)
        if (target := resolve(name)) and target != module and _layer(target) > _layer(module)
    )
    assert not upward, upward


def test_every_package_has_an_init_and_module_names_are_unique() -> None:
    packages = {p.parent for p in PACKAGE.rglob("*.py")}
    assert not [p for p in packages if not (p / "__init__.py").exists()]
    outside_tuners = [
        p.stem for p in PACKAGE.rglob("*.py") if p.stem != "__init__" and "tuners" not in p.relative_to(PACKAGE).parts
    ]
    assert sorted(n for n in set(outside_tuners) if outside_tuners.count(n) > 1) == []


def test_commands_are_short() -> None:
    """cli/ parses, calls one core function and renders: no function there runs over 60 lines."""
    long = []
    for path in (PACKAGE / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            length = (node.end_lineno or node.lineno) - node.lineno + 1 if isinstance(node, ast.FunctionDef) else 0
            if length > 60:
                long.append(f"{path.name}:{getattr(node, 'name', '?')} ({length} lines)")
    assert not long, long


def test_plugin_validation_imports_no_torch(tmp_path: Path) -> None:
    suite = tmp_path / "plugin.yaml"
    suite.write_text(
        "device: cpu\ndata: {name: synthetic}\nbackbone: {model: test_vit}\ntuners:\n  - tuner: test_crash\n"
    )
    code = (
        "import sys\n"
        "from petlbench.cli.app import main\n"
        "sys.argv = ['petlbench', 'validate', sys.argv[1], '--no-preflight']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PETLBENCH_PLUGINS": "tests.plugins.fault_tuners"}
    done = subprocess.run([sys.executable, "-c", code, str(suite)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "valid, 1 runs" in done.stdout


def test_every_run_spec_field_has_a_role() -> None:
    fields = controls.spec_fields(RunSpec)
    assert {controls.role(f) for f in fields} <= {"execution", "method", "recipe", "axis", "condition"}
    # the optimizer's implementation changes the peak: rows differing in it never share a figure or a ratio
    for column in ("optimizer.name", "optimizer.foreach", "optimizer.fused", "precision", "backbone.fused_attn"):
        assert column in GROUP_COLUMNS and column in PAIR_COLUMNS
    # a method's own hyperparameters do not split a figure, and execution details are not in the run_id
    assert "optimizer.lr" not in GROUP_COLUMNS and "train.epochs" not in GROUP_COLUMNS
    assert {"batch_size", "seed"} <= set(PAIR_COLUMNS) - set(GROUP_COLUMNS)
    base = spec()
    assert base.model_copy(update={"timeout_s": 5.0, "suite": "other"}).run_id == base.run_id
    foreach = base.model_copy(update={"optimizer": base.optimizer.model_copy(update={"foreach": True})})
    assert foreach.run_id != base.run_id


def test_a_tuner_must_declare_whether_it_adds_parameters(tiny_vit: TinyVitFactory) -> None:
    class Quiet(Tuner):
        name = "quiet"
        adds_parameters = False  # a lie: it adds one

        def attach(self, model):  # type: ignore[no-untyped-def]
            import torch

            model.extra = torch.nn.Linear(2, 2)
            return model

    with pytest.raises(TunerError, match="declares that it adds no parameter, but attach"):
        build_tuned_model(tiny_vit(), Quiet())


def test_registry_names_are_the_class_names_suites_use() -> None:
    assert {"full", "linear", "lora", "vpt", "fact", "sqt"} <= set(TUNERS)
    for name, cls in TUNERS.items():
        assert cls.name == name
        assert cls.knob is None or cls.knob in cls.model_fields


def test_knob_field_is_validated_by_pydantic() -> None:
    class Ranked(Tuner):
        name = "ranked"
        knob = "rank"
        rank: int = Field(4, gt=0)

        def attach(self, model):  # type: ignore[no-untyped-def]
            return model

    assert Ranked(rank=3).knob_value() == 3.0
    with pytest.raises(ValueError):
        Ranked(rank=0)


def test_a_message_less_memory_error_is_an_oom_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETLBENCH_PLUGINS", "tests.plugins.fault_tuners")
    result = execute(spec(tuners=[{"tuner": "test_memory_error"}]))
    assert result.status == "oom"
    assert result.error == "out of memory at batch size 8: MemoryError"


def test_a_non_vit_is_named_as_such_and_a_bad_kwarg_by_its_key() -> None:
    with pytest.raises(ConfigError, match=r"^backbone.model: 'resnet18' does not take img_size \(not a timm ViT\)"):
        build_backbone(BackboneSpec(model="resnet18", img_size=64), 10)
    with pytest.raises(ConfigError, match=r"^backbone.model: 'resnet18' is not a ViT with `blocks`"):
        build_backbone(BackboneSpec(model="resnet18"), 10)
    with pytest.raises(ConfigError, match=r"^backbone.kwargs.wobble: 'test_vit' does not take 'wobble'"):
        build_backbone(BackboneSpec(model="test_vit", kwargs={"wobble": 3}), 10)
