"""The layers of docs/architecture.md, read off the source with ast (nothing is imported): which room may import
which, what stays out of models/ and data/, and no import cycle among cmae_ds modules."""

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# room -> the rooms it may import (besides itself); a room is a folder of cmae_ds/ or one of its top-level modules
MAY_IMPORT = {
    'config': set(),
    'storage': set(),
    'seeds': set(),
    'kernels': set(),
    'models': {'config', 'kernels'},
    'data': {'config', 'seeds'},
    'modelfiles': {'config', 'models', 'storage'},
    'errors': {'config', 'data', 'modelfiles', 'storage'},
    'engine': {'config', 'data', 'errors', 'kernels', 'modelfiles', 'models', 'seeds', 'storage'},
    'tasks': {'config', 'data', 'engine', 'errors', 'kernels', 'modelfiles', 'models', 'seeds', 'storage'},
    'cli': {'config', 'engine', 'errors', 'tasks'},
    'checkpoint': {'modelfiles'},  # the public import path of the model-file API, re-exported
}
# third-party packages a room must not import, with the one module allowed an exception
KEEP_OUT = {
    'models': {'deepspeed': None, 'nvidia': None, 'torch.distributed': 'cmae_ds.models.collectives'},
    'data': {'deepspeed': None, 'torch.distributed': None},
    'modelfiles': {'deepspeed': None, 'nvidia': None},
}


def module_files() -> dict:
    """'cmae_ds.x.y' -> path, kernels/ under its installed name cmae_ds.kernels."""
    found = {}
    trees = [(p, ('cmae_ds',) + p.relative_to(ROOT / 'cmae_ds').parts) for p in (ROOT / 'cmae_ds').rglob('*.py')]
    trees += [
        (p, ('cmae_ds', 'kernels') + p.relative_to(ROOT / 'kernels').parts) for p in (ROOT / 'kernels').rglob('*.py')
    ]
    for path, parts in trees:
        if 'kernels' in parts[1:2] and path.is_relative_to(ROOT / 'cmae_ds' / 'kernels'):
            continue  # the symlink to kernels/ in a development checkout
        parts = parts[:-1] if parts[-1] == '__init__.py' else parts[:-1] + (parts[-1][:-3],)
        found['.'.join(parts)] = path
    return found


MODULES = module_files()


def resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition('.')[0]
    return name


@functools.lru_cache(maxsize=None)
def imports(module: str) -> list:
    """(imported name, at module level) for every import statement of the module, relative ones resolved."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module.split('.') if path.name == '__init__.py' else module.split('.')[:-1]
    found = []
    for node in ast.walk(tree):
        top = node in tree.body
        if isinstance(node, ast.Import):
            found += [(a.name, top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                base = '.'.join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            found += [(f'{base}.{a.name}' if f'{base}.{a.name}' in MODULES else base, top) for a in node.names]
    return found


@functools.lru_cache(maxsize=None)
def edges(module_level_only: bool) -> dict:
    graph = {}
    for module in MODULES:
        targets = {
            resolve(name)
            for name, top in imports(module)
            if name.startswith('cmae_ds') and (top or not module_level_only)
        }
        graph[module] = targets - {module, ''}
    return graph


def room(module: str) -> str:
    return module.split('.')[1] if '.' in module else ''


def test_the_map_finds_every_room():
    assert {room(m) for m in MODULES} - {''} == set(MAY_IMPORT), sorted({room(m) for m in MODULES})
    assert len(MODULES) > 80 and 'cmae_ds.engine.checkpoints.store' in MODULES and 'cmae_ds.kernels' in MODULES


def test_rooms_import_only_the_layers_below():
    wrong = [
        f'{m} imports {t}'
        for m, targets in edges(module_level_only=False).items()
        for t in sorted(targets)
        if room(t) != room(m) and room(t) not in MAY_IMPORT[room(m)]
    ]
    assert not wrong, wrong


@pytest.mark.parametrize('the_room', sorted(KEEP_OUT))
def test_rooms_keep_third_party_out(the_room):
    wrong = [
        f'{m} imports {name}'
        for m in MODULES
        if room(m) == the_room
        for name, _ in imports(m)
        for banned, allowed in KEEP_OUT[the_room].items()
        if (name == banned or name.startswith(banned + '.')) and m != allowed
    ]
    assert not wrong, wrong


def test_inside_engine_the_loop_is_on_top():
    """Checkpoints and guards are parts the loop uses; they never reach back into the loop, its logger or metrics."""
    graph = edges(module_level_only=False)
    wrong = [
        f'{m} imports {t}'
        for m, ts in graph.items()
        if m.startswith('cmae_ds.engine.')
        for t in ts
        if t == 'cmae_ds.engine.loop'
    ]
    parts = ('cmae_ds.engine.checkpoints', 'cmae_ds.engine.guards')
    upper = ('cmae_ds.engine.loop', 'cmae_ds.engine.logger', 'cmae_ds.engine.metrics')
    wrong += [f'{m} imports {t}' for m, ts in graph.items() if m.startswith(parts) for t in ts if t.startswith(upper)]
    wrong += [
        f'{m} imports {t}'
        for m, ts in graph.items()
        if m.startswith('cmae_ds.engine.checkpoints')
        for t in ts
        if t.startswith('cmae_ds.engine.guards')
    ]
    assert not wrong, wrong


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_at_module_level():
    assert cycles(edges(module_level_only=True)) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    """A function-level import only delays a circle: the modules still cannot be read, tested or moved apart."""
    assert cycles(edges(module_level_only=False)) == []


# data/'s rooms, lowest first: a room imports only the rooms before it (tools on top; sources and views apart)
DATA_MAY_IMPORT = {
    'errors': set(),
    'sources': {'errors'},
    'views': {'errors'},
    'pipelines': {'errors', 'sources', 'views'},
    'tools': {'errors', 'sources', 'views', 'pipelines'},
}


def data_room(module: str) -> str:
    parts = module.split('.')
    return parts[2] if len(parts) > 2 and parts[1] == 'data' else ''


def test_data_rooms_import_only_the_rooms_below():
    graph = edges(module_level_only=False)
    wrong = [
        f'{m} imports {t}'
        for m, ts in graph.items()
        if data_room(m) in DATA_MAY_IMPORT
        for t in ts
        if data_room(t) and data_room(t) != data_room(m) and data_room(t) not in DATA_MAY_IMPORT[data_room(m)]
    ]
    assert not wrong, wrong


def test_data_rooms_stay_small():
    """About eight modules per folder (issue 34): a folder a reader can take in at once."""
    folders = {}
    for path in (ROOT / 'cmae_ds' / 'data').rglob('*.py'):
        if path.name != '__init__.py':
            folders.setdefault(path.parent.relative_to(ROOT), []).append(path.name)
    assert set(DATA_MAY_IMPORT) - {'errors'} <= {f.name for f in folders}, folders
    assert all(len(names) <= 9 for names in folders.values()), folders


def test_the_cycle_finder_finds_cycles():
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert cycles({'a': {'b'}, 'b': {'a'}}) == [['a', 'b']]
