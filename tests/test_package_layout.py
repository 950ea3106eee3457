"""The package's wiring stays one obvious path (README, "Anatomy of an op"):

- no import cycle between the package's modules, and no import below the top of a module (module level);
- every backend is registered by ``imbreg_fast.ops`` (each family's ``register_backends``), nowhere else;
- the extension is loaded at one point (``imbreg_fast._extension.load``, called by ``imbreg_fast.ops``);
- reduction codes are defined once per language.
"""
import ast
import os
import re

import imbreg_fast
from imbreg_fast import _dispatch, _reduction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"imbreg_fast": os.path.join(ROOT, "imbreg_fast"),
            "imbreg_fast.triton_kernels": os.path.join(ROOT, "triton_kernels")}


def _modules():
    """{dotted module name: path} of every module of the package (triton_kernels under its installed name)."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), folder)[:-3].replace(os.sep, ".")
                mod = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
                out[mod] = os.path.join(dirpath, name)
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    is_pkg = MODULES[module].endswith("__init__.py")
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    targets = []
    for alias in node.names:
        candidate = f"{prefix}.{alias.name}"
        targets.append(candidate if candidate in MODULES else prefix)
    return [t for t in targets if t in MODULES]


def _top_level_imports(module: str) -> list[str]:
    tree = ast.parse(open(MODULES[module]).read())
    deps = []
    for node in tree.body:   # module level only: imports inside functions are lazy on purpose (triton)
        if isinstance(node, ast.ImportFrom):
            deps += _resolve(module, node)
        elif isinstance(node, ast.Import):
            deps += [a.name for a in node.names if a.name in MODULES]
    return deps


def test_no_import_cycle():
    graph = {m: set(_top_level_imports(m)) - {m} for m in MODULES}
    # a package's __init__ importing its own submodules is the normal order; a submodule importing its parent
    # package's __init__ (which imports it back) is a cycle, and so is any other loop
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in graph[m]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_mid_file_imports():
    for module, path in MODULES.items():
        tree = ast.parse(open(path).read())
        seen_code = False
        for node in tree.body:
            is_import = isinstance(node, (ast.Import, ast.ImportFrom))
            is_docstring = isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant)
            if is_import and seen_code:
                raise AssertionError(f"{module}: import below the top of the module (line {node.lineno})")
            if not is_import and not is_docstring:
                seen_code = True


def test_backends_are_registered_from_one_place():
    register_calls = {}
    for module, path in MODULES.items():
        text = open(path).read()
        register_calls[module] = len(re.findall(r"\bregister\(\s*(OP|\"[a-z_]+\")", text))
        assert "@register(" not in text, f"{module} registers a backend with a decorator at import"
    with_calls = {m for m, n in register_calls.items() if n}
    assert with_calls <= {"imbreg_fast.ops.balanced_mse", "imbreg_fast.ops.weighted_losses", "imbreg_fast.ops.fds",
                          "imbreg_fast.ops.conr", "imbreg_fast.ops.ranksim", "imbreg_fast.ops.rnc"}
    ops_init = open(MODULES["imbreg_fast.ops"]).read()
    assert "register_backends" in ops_init and "_extension.load()" in ops_init
    # every public op has the torch backend, and the order is torch, cpp, triton
    for op, impls in _dispatch._IMPLS.items():
        names = list(impls)
        assert names[0] == "torch", (op, names)
        assert names == [b for b in _dispatch.BACKENDS if b in names], (op, names)


def test_extension_is_loaded_at_one_point():
    for module, path in MODULES.items():
        text = open(path).read()
        if module in ("imbreg_fast._extension", "imbreg_fast.ops"):
            continue
        assert "_extension.load(" not in text and "import_module(\"imbreg_fast._C" not in text, module


def test_reduction_codes_are_defined_once():
    assert (_reduction.NONE, _reduction.MEAN, _reduction.SUM) == (0, 1, 2)   # torch's own numbering
    assert _reduction.WEIGHTED_MEAN == 3
    literal = re.compile(r"(REDUCTION|reduction)\s*(==|!=|in)\s*(\(?\s*\d|range\()")
    for module, path in MODULES.items():
        for lineno, line in enumerate(open(path), 1):
            assert not literal.search(line), f"{module}:{lineno}: literal reduction code: {line.strip()}"
    header = open(os.path.join(ROOT, "csrc", "cpu", "common.h")).read()
    assert "at::Reduction::END" in header
    for dirpath, _dirs, files in os.walk(os.path.join(ROOT, "csrc")):
        for name in files:
            text = open(os.path.join(dirpath, name)).read()
            assert not re.search(r"kReduction(None|Mean|Sum)\b", text), name


def test_public_api_imports():
    for name in ("functional", "nn", "lds", "metrics", "FDS", "fit_gmm", "bin_prior", "available_backends",
                 "selected_backend", "backend_info", "cpu_capability", "distributed", "rrt"):
        assert hasattr(imbreg_fast, name), name
