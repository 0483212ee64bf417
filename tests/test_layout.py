"""The shape of the code, checked: the top level holds the three scripts, the engine is the
package udpxfer/, its socket-free core does no I/O, imports only go down, no module is too long.

Reads the sources with `ast`; runs none of them. Run: python3 -m tests test_layout
"""

import ast
import os
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "udpxfer")

# The socket-free core: it takes datagrams and `now`, and gives back datagrams and deadlines.
CORE = {"wire", "rtt", "netpath", "server_transfer", "limits", "dispatcher", "client_transfer",
        "planner", "ranges", "display", "errors", "ratelimit", "servelog", "download", "lanes"}
# What the core may not import: the I/O and the clock come in from the loops around it.
IO_MODULES = {"socket", "select", "selectors", "threading", "subprocess", "time", "asyncio"}
SCRIPTS = {"server", "client"}
MAX_LINES = 800


def modules():
    """{name: parsed tree} of the package's modules."""
    out = {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            with open(os.path.join(PACKAGE, name), encoding="utf-8") as f:
                out[name[:-3]] = (ast.parse(f.read(), name), os.path.join(PACKAGE, name))
    return out


def imported(tree):
    """The top-level names of every module a tree imports (anywhere in it): 'udpxfer.wire' for
    the package's own, the first component for the rest."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.add(_name(alias.name))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "udpxfer":
                names.update("udpxfer." + alias.name for alias in node.names)
            else:
                names.add(_name(node.module))
    return names


def _name(module):
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "udpxfer" else parts[0]


class LayoutTest(unittest.TestCase):

    def test_the_top_level_holds_the_three_scripts(self):
        top = {n for n in os.listdir(ROOT) if n.endswith(".py")}
        self.assertEqual(top, {"server.py", "client.py", "config.py"})
        for script in ("server.py", "client.py"):
            with open(os.path.join(ROOT, script), encoding="utf-8") as f:
                uses = imported(ast.parse(f.read()))
            self.assertTrue(any(u.startswith("udpxfer.") for u in uses), script)

    def test_every_module_opens_with_a_docstring_and_fits_one_sitting(self):
        for name, (tree, path) in modules().items():
            with self.subTest(module=name):
                doc = ast.get_docstring(tree)
                self.assertTrue(doc and len(doc.split()) >= 5, "%s needs a docstring" % name)
                with open(path, encoding="utf-8") as f:
                    self.assertLessEqual(len(f.read().splitlines()), MAX_LINES)
        for script in ("server.py", "client.py", "config.py"):
            with open(os.path.join(ROOT, script), encoding="utf-8") as f:
                self.assertLessEqual(len(f.read().splitlines()), MAX_LINES, script)

    def test_the_core_does_no_io(self):
        found = modules()
        self.assertLessEqual(CORE, set(found), "a core module is missing")
        for name in sorted(CORE):
            tree = found[name][0]
            with self.subTest(module=name):
                self.assertFalse(imported(tree) & IO_MODULES, "the core imports I/O")
                opens = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
                         and isinstance(n.func, ast.Name) and n.func.id == "open"]
                self.assertEqual(opens, [], "the core opens no file")
                io_pkg = {"udpxfer." + m for m in set(found) - CORE - {"__init__"}}
                self.assertFalse(imported(tree) & io_pkg, "the core imports an I/O module")

    def test_imports_only_go_down_and_never_in_a_circle(self):
        found = modules()
        graph = {}
        for name, (tree, _) in found.items():
            uses = imported(tree)
            with self.subTest(module=name):
                self.assertFalse(uses & SCRIPTS, "the package imports a script")
            graph[name] = {u.split(".", 1)[1] for u in uses if u.startswith("udpxfer.")}
        with open(os.path.join(ROOT, "config.py"), encoding="utf-8") as f:
            self.assertFalse(imported(ast.parse(f.read())) & (SCRIPTS | {"udpxfer"}),
                             "config.py is data: it imports neither scripts nor the package")
        state = {}

        def visit(node, trail):
            if state.get(node) == "done":
                return
            self.assertNotEqual(state.get(node), "open", "circle: %s" % " -> ".join(trail))
            state[node] = "open"
            for nxt in sorted(graph.get(node, ())):
                visit(nxt, trail + [nxt])
            state[node] = "done"

        for name in sorted(graph):
            visit(name, [name])


if __name__ == "__main__":
    unittest.main()
