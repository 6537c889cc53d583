"""The package layout: imports inside emu/ run one way, from how the parts are put together down to
the layers, and no two modules import each other, directly or round a circle."""
import ast
import os

EMU = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emu")

# Lower layers first; a module may import its own package and the layers below its own.
LAYERS = [
    {"emu"},                                # EmuError
    {"emu.checkpoint", "emu.web"},          # atomic checkpoints, safetensors files; the local web pages' plumbing
    {"emu.models"},                         # the networks
    {"emu.text", "emu.datasets"},           # the frozen towers; the data
    {"emu.diffusion", "emu.evaluation"},    # the DDPM maths; judges, statistics, the rating study
    {"emu.variants", "emu.training", "emu.curation"},
    {"emu.arch"},                           # how the parts are put together: what differs by --arch,
    {"emu.pipeline"},                       # then text to image from a checkpoint
    {"emu.demo"},                           # the demo's editor, which sample.py serves
]


def part(module):
    """The layer entry a module belongs to: its subpackage, or itself for a top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer(module):
    return next(i for i, names in enumerate(LAYERS) if part(module) in names)


def emu_modules():
    """{module name: the emu modules it imports, at the top or inside functions}."""
    modules = {}
    for folder, _, files in os.walk(EMU):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, os.path.dirname(EMU))[:-3].replace(os.sep, ".")
            module = rel.removesuffix(".__init__")
            imported = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "emu":
                    for alias in node.names:  # `from emu.models import attention` imports a module
                        sub = f"{node.module}.{alias.name}"
                        imported.add(sub if os.path.exists(os.path.join(EMU, *sub.split(".")[1:]) + ".py") else node.module)
                elif isinstance(node, ast.Import):
                    imported |= {a.name for a in node.names if a.name.split(".")[0] == "emu"}
            modules[module] = imported - {module}
    return modules


def test_every_module_imports_only_its_own_package_and_lower_layers():
    wrong = [f"{m} imports {i}" for m, imports in emu_modules().items() for i in imports
             if part(i) != part(m) and layer(i) >= layer(m)]
    assert not wrong, wrong


def test_no_modules_import_each_other_round_a_circle():
    graph = emu_modules()
    state = {}

    def visit(module, path):
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                raise AssertionError("circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_layers_name_every_package():
    parts = {part(m) for m in emu_modules()}
    assert parts == set().union(*LAYERS), parts ^ set().union(*LAYERS)
