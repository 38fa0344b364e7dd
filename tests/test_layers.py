"""The layers of docs/architecture.md, enforced by walking every import (function-level and
``TYPE_CHECKING`` ones included): contracts import nothing else of embedpipe; storage imports only
storage; workers never import flows or Prefect; Ray and Dask are imported only by the engine bindings;
descriptor, metric and pure-maths code imports no engine."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"flows": "embedpipe.flows", "workers": "embedpipe.workers", "storage": "embedpipe.storage"}
ENGINES = ("ray", "dask", "distributed")
PURE = (
    "embedpipe.workers.descriptors",
    "embedpipe.workers.evaluate.metrics",
    "embedpipe.workers.evaluate.rerank",
    "embedpipe.workers.fit.whitening",
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports_of(source: str) -> list[str]:
    """Every module ``source`` imports, absolute names."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if _within(node.module, "embedpipe"):  # `from package import module`
                names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def rule_broken(module: str, imported: str) -> str | None:
    """Why ``module`` may not import ``imported`` (None when it may)."""
    top = imported.split(".")[0]
    if _within(module, "embedpipe.storage.contracts"):
        if _within(imported, "embedpipe") and not _within(imported, "embedpipe.storage.contracts"):
            return "contracts import nothing else of embedpipe"
    if _within(module, "embedpipe.storage"):
        if _within(imported, "embedpipe") and not _within(imported, "embedpipe.storage"):
            return "storage imports only storage"
    if _within(module, "embedpipe.workers") and _within(imported, "embedpipe.flows"):
        return "workers never import flows"
    if top == "prefect" and not _within(module, "embedpipe.flows"):
        return "Prefect only in flows"
    if top in ENGINES and not _within(module, "embedpipe.workers.engines"):
        return "Ray and Dask only in workers/engines"
    if any(_within(module, p) for p in PURE) and (
        top in ENGINES or top == "prefect" or _within(imported, "embedpipe.workers.engines")
    ):
        return "descriptor, metric and pure-maths code imports no engine"
    return None


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def violations(root: Path) -> list[str]:
    found = []
    for folder in PACKAGES:
        for path in sorted((root / folder).rglob("*.py")):
            module = module_name(path, root)
            for imported in imports_of(path.read_text()):
                why = rule_broken(module, imported)
                if why:
                    found.append(f"{path.relative_to(root)}: imports {imported} ({why})")
    return found


def test_the_code_keeps_its_layers():
    assert violations(ROOT) == []


def test_the_checker_catches_each_kind_of_violation(tmp_path):
    planted = {
        "storage/contracts/config.py": "from embedpipe.workers.index.ann import check_factory\n",
        "storage/features.py": "import embedpipe.workers.ingest.sources\n",
        "workers/index/build.py": "def f():\n    from embedpipe.flows.config import load_config\n",
        "workers/extract/stage.py": "if TYPE_CHECKING:\n    import prefect\n",
        "workers/index/ann.py": "def fill():\n    import ray\n",
        "flows/pipeline.py": "from dask import array\n",
        "workers/descriptors/pooling.py": "from embedpipe.workers.engines import ray_stages\n",
        "workers/engines/ray_stages.py": "import ray\nfrom embedpipe.storage.contracts import errors\n",
        "flows/cli.py": "import prefect\nfrom embedpipe.workers.index import ann\n",
    }
    for rel, text in planted.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = violations(tmp_path)
    flagged = {line.split(":")[0] for line in found}
    assert flagged == set(planted) - {"workers/engines/ray_stages.py", "flows/cli.py"}, found
    pooling = "workers/descriptors/pooling.py: imports embedpipe.workers.engines.ray_stages"
    assert pooling in "\n".join(found)


# scripts that a bench runs with the Python of a tool's own environment, which the bench installs, and
# the packages of that environment they import (not dependencies of ours)
SIDE_ENVIRONMENT = {"flows/benchmarks/extract_daft.py": {"daft"}}


def test_every_imported_package_is_declared():
    """Each third-party package the code imports is a dependency in pyproject.toml (the tests' own ones
    in the 'test' extra), so a fresh install has it."""
    import sys
    import tomllib
    from importlib import metadata

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        out = set()
        for req in requirements:
            name = req.split(";")[0].split("[")[0]
            for sep in "<>=!~ ":
                name = name.split(sep)[0]
            out.add(name.lower().replace("_", "-"))
        return out

    declared = names(project["dependencies"])
    declared_tests = declared | names(project["optional-dependencies"]["test"])
    dists = metadata.packages_distributions()
    missing = []
    for folders, allowed in ((("flows", "workers", "storage"), declared), (("tests",), declared_tests)):
        for folder in folders:
            for path in sorted((ROOT / folder).rglob("*.py")):
                for imported in imports_of(path.read_text()):
                    top = imported.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("embedpipe", "tests"):
                        continue
                    if top in SIDE_ENVIRONMENT.get(path.relative_to(ROOT).as_posix(), ()):
                        continue
                    dist = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                    if not dist & allowed:
                        missing.append(f"{path.relative_to(ROOT)}: {top}")
    assert sorted(set(missing)) == []
