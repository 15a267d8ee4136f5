"""The runtime never imports the converter: rwkv_lite.quantize (readers, names, convert, calibrate, GPTQ, LoRA
merging) depends on the runtime (model, state, arch, kernels, schemes, format, tokenizer, generation, engine,
server), never the reverse, not even through an import inside a function. Only the layers above both may import
the converter: the CLI package and the package root (rwkv_lite/__init__.py, which installs the converter's reader
of state tuners' files into State.load)."""
from __future__ import annotations

import ast
from pathlib import Path

import rwkv_lite

PACKAGE_ROOT = Path(rwkv_lite.__file__).parent
CONVERTER = "rwkv_lite.quantize"
ABOVE_BOTH = ("rwkv_lite", "rwkv_lite.__main__", "rwkv_lite.cli")     # may import the converter


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source` (module-level or inside functions), relative
    imports resolved against `module`; `from X import y` counts as both X and X.y (y may be a submodule); a
    string argument of importlib.import_module / __import__ counts too."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return found


def is_converter(name: str) -> bool:
    return name == CONVERTER or name.startswith(CONVERTER + ".")


def is_runtime(module: str) -> bool:
    if is_converter(module) or module in ABOVE_BOTH:
        return False
    return not any(module.startswith(m + ".") for m in ABOVE_BOTH if m != "rwkv_lite")


def converter_imports(path: Path) -> list[str]:
    module = module_name(path)
    return [f"{path.relative_to(PACKAGE_ROOT.parent)}:{line} imports {name}"
            for line, name in imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
            if is_converter(name)]


def test_no_runtime_module_imports_the_converter():
    runtime = [p for p in sorted(PACKAGE_ROOT.rglob("*.py")) if is_runtime(module_name(p))]
    assert len(runtime) > 20 and any(module_name(p) == "rwkv_lite.model" for p in runtime)
    offenders = [line for p in runtime for line in converter_imports(p)]
    assert offenders == []


def test_kernels_sit_below_the_schemes_and_the_file_format():
    """Kernels take arrays and raise nothing format-related: they import neither the scheme objects, the model
    file format, nor the error classes of files (a scheme translates bad arrays into a SchemeError)."""
    kernels = sorted((PACKAGE_ROOT / "kernels").glob("*.py"))
    assert len(kernels) > 5
    above = ("rwkv_lite.schemes", "rwkv_lite.format", "rwkv_lite.model", "rwkv_lite.errors", "rwkv_lite.arch")
    offenders = [f"{p.name}:{line} imports {name}" for p in kernels
                 for line, name in imported_modules(p.read_text(encoding="utf-8"), module_name(p), False)
                 if any(name == a or name.startswith(a + ".") for a in above)]
    assert offenders == []


def test_the_check_sees_every_form_of_import():
    """The detector itself: each of these snippets, placed in rwkv_lite/arch/x.py, imports the converter."""
    snippets = [
        "import rwkv_lite.quantize.readers",
        "from rwkv_lite.quantize import convert",
        "from rwkv_lite import quantize",
        "def f():\n    from ..quantize.state_file import read_time_state",
        "def f():\n    from .. import quantize",
        "import importlib\nimportlib.import_module('rwkv_lite.quantize.lora')",
    ]
    for snippet in snippets:
        names = [name for _, name in imported_modules(snippet, "rwkv_lite.arch.x", False)]
        assert any(is_converter(n) for n in names), snippet
    clean = "from ..schemes import get_scheme\nfrom . import common\nimport numpy as np"
    assert not any(is_converter(n) for _, n in imported_modules(clean, "rwkv_lite.arch.x", False))


def test_the_layers_above_both_are_not_checked_as_runtime():
    assert not is_runtime("rwkv_lite") and not is_runtime("rwkv_lite.cli.convert")
    assert not is_runtime("rwkv_lite.quantize.convert")
    assert is_runtime("rwkv_lite.model") and is_runtime("rwkv_lite.schemes.int4") and is_runtime("rwkv_lite.state")
