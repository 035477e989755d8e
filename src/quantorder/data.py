"""Fine-tune/evaluation rows (code Q&A from a pinned package, hub datasets, local JSONL) and calibration text."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import inspect
import json
import random
import string
import textwrap
from collections import deque
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from quantorder.config import CalibCfg, DataCfg
from quantorder.errors import UserError
from quantorder.progress import progress

SPLITS = ("train", "val", "test")
# Directories that hold tests or benchmarks, not library functions.
_SKIP_DIRS = {"test", "tests", "testing", "benchmarks", "__pycache__"}


def package_modules(package: str, version: str, key: str) -> Iterator[tuple[str, ast.Module, list[str]]]:
    """(module name, syntax tree, source lines) of each library file of an installed package, sorted by path.

    The package must be installed at exactly `version`, so that every machine builds the same text.

    Raises:
        UserError: the package is missing, at another version, or has a file this Python cannot
            parse (`key` names the config section).
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise UserError(f"{key}.package={package!r} is not installed; pip install {package}=={version}") from e
    if dist.version != version:
        raise UserError(
            f"{key}.package_version={version}: installed {package} is {dist.version}; pip install {package}=={version}"
        )
    files = [f for f in sorted(dist.files or []) if f.suffix == ".py" and not _SKIP_DIRS.intersection(f.parts[:-1])]
    for rel in progress(files, len(files), f"[{key}] reading {package} {version}", unit="files"):
        source = Path(dist.locate_file(rel)).read_text(encoding="utf-8")
        try:
            tree = ast.parse(source)
        except SyntaxError as e:  # skipping it would make the rows depend on the Python version
            raise UserError(f"{key}.package={package!r}: {rel} does not parse on this Python ({e.msg})") from e
        module = ".".join(Path(rel).with_suffix("").parts).removesuffix(".__init__")
        yield module, tree, source.splitlines(keepends=True)


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Public module-level functions and methods of public classes, with qualified names."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef) and not sub.name.startswith("_"):
                    yield f"{node.name}.{sub.name}", sub


def _answer_source(source_lines: list[str], fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function's source with its docstring lines removed, dedented."""
    doc = fn.body[0]
    start = min([d.lineno for d in fn.decorator_list] + [fn.lineno])
    lines = source_lines[start - 1 : doc.lineno - 1] + source_lines[doc.end_lineno : fn.end_lineno]
    return textwrap.dedent("".join(lines)).rstrip()


def package_qa_rows(package: str, version: str, max_answer_chars: int) -> list[dict[str, str]]:
    """Code Q&A rows from a pinned Python package's source.

    Question: a public function's signature and docstring. Answer: its source without the docstring.
    Rows come out in a fixed order (sorted files, source order); duplicates are dropped.
    """
    return [
        {"programming_language": "Python", "prompt": prompt, "response": answer}
        for prompt, answer in _package_functions(package, version)
        if len(answer) <= max_answer_chars
    ]


@cache
def _package_functions(package: str, version: str) -> tuple[tuple[str, str], ...]:
    """(question, answer) of each documented public function of the package, in source order,
    without duplicates; the package is parsed once per process."""
    pairs, seen = [], set()
    for module, tree, lines in package_modules(package, version, "data"):
        for qualname, fn in _functions(tree):
            doc = ast.get_docstring(fn)
            if not doc or len(doc) < 40 or len(fn.body) < 2:
                continue
            answer = _answer_source(lines, fn)
            signature = f"{qualname}({ast.unparse(fn.args)})"
            prompt = f"Write the function `{signature}` of the `{module}` module: {inspect.cleandoc(doc)}"
            key = hashlib.sha256((prompt + answer).encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                pairs.append((prompt, answer))
    return tuple(pairs)


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a line that is not a JSON object is a UserError naming it."""
    rows = []
    try:
        with Path(path).open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno})") from e
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
                rows.append(row)
    except FileNotFoundError as e:
        raise UserError(f"data file {path} not found") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e})") from e
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def render(template: str, row: dict) -> str:
    return template.format(**row)


def unique_rows(rows: list[dict]) -> list[dict]:
    """`rows` without exact repeats (first occurrence kept): a repeat could land in train and test."""
    seen: set[str] = set()
    keep = []
    for row in rows:
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            keep.append(row)
    return keep


def _seeded_split(rows: list[dict], cfg: DataCfg) -> dict[str, list[dict]]:
    need = cfg.n_train + cfg.n_val + cfg.n_test
    if len(rows) < need:
        raise UserError(f"data '{cfg.name}' has {len(rows)} distinct rows, fewer than n_train+n_val+n_test={need}")
    order = list(range(len(rows)))
    random.Random(cfg.split_seed).shuffle(order)
    picked = [rows[i] for i in order[:need]]
    return {
        "train": picked[: cfg.n_train],
        "val": picked[cfg.n_train : cfg.n_train + cfg.n_val],
        "test": picked[cfg.n_train + cfg.n_val :],
    }


def _hub_splits(cfg: DataCfg) -> dict[str, list[dict]]:
    import datasets  # heavy; only for hub data

    exprs = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    return {name: list(datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=expr)) for name, expr in exprs.items()}


def build_splits(cfg: DataCfg) -> tuple[dict[str, list[dict]], dict]:
    """Rows of each split and a description of the source for the manifest."""
    if cfg.source == "hub":
        splits = _hub_splits(cfg)
        source = {"kind": "hub", "hub_id": cfg.hub_id, "config": cfg.hub_config}
    else:
        if cfg.source == "package":
            rows = package_qa_rows(cfg.package, cfg.package_version, cfg.max_answer_chars)
            source = {"kind": "package", "package": cfg.package, "version": cfg.package_version}
        else:
            rows = read_jsonl(cfg.path)
            source = {"kind": "jsonl", "path": str(cfg.path)}
        distinct = unique_rows(rows)
        if len(distinct) < len(rows):
            print(f"[prepare] dropped {len(rows) - len(distinct)} repeated rows of '{cfg.name}'", flush=True)
            source["repeated_rows_dropped"] = len(rows) - len(distinct)
        splits = _seeded_split(distinct, cfg)
        source["rows_available"] = len(distinct)
    _check_rows(splits, cfg)
    return splits, source


def _check_rows(splits: dict[str, list[dict]], cfg: DataCfg) -> None:
    fields = template_fields(cfg.template)
    for name, rows in splits.items():
        if not rows:
            raise UserError(f"data split '{name}' of '{cfg.name}' is empty")
        missing = sorted(fields - set(rows[0]))
        if missing:
            raise UserError(
                f"data.template names column(s) {', '.join(missing)} absent from '{cfg.name}' "
                f"(columns: {', '.join(sorted(rows[0]))})"
            )


def write_splits(out_dir: Path, splits: dict[str, list[dict]], source: dict, cfg: DataCfg) -> dict:
    """Write train/val/test JSONL and manifest.json into `out_dir`; return the manifest."""
    for name in SPLITS:
        write_jsonl(out_dir / f"{name}.jsonl", splits[name])
    h = hashlib.sha256()
    for name in SPLITS:
        h.update((out_dir / f"{name}.jsonl").read_bytes())
    manifest = {
        "name": cfg.name,
        "source": source,
        "template": cfg.template,
        "split_seed": cfg.split_seed,
        "rows": {name: len(splits[name]) for name in SPLITS},
        "sha256": h.hexdigest(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


@cache
def package_prose(package: str, version: str) -> str:
    """Module and class docstrings of a pinned package, in a fixed order: mostly English prose
    (parsed once per process).

    Disjoint from the package's Q&A rows, which quote function docstrings and source code only.
    """
    docs = []
    for _, tree, _ in package_modules(package, version, "calib"):
        nodes = [tree, *_class_defs(tree)]
        docs += [doc for node in nodes if (doc := ast.get_docstring(node))]
    return "\n\n".join(docs)


def _class_defs(tree: ast.Module) -> Iterator[ast.ClassDef]:
    """The class definitions in `tree`, in `ast.walk`'s order, without descending into expressions
    (which hold no statements): on SymPy, in a third of the full walk's time."""
    todo = deque([tree])
    while todo:
        node = todo.popleft()
        if isinstance(node, ast.ClassDef):
            yield node
        todo.extend(child for child in ast.iter_child_nodes(node) if not isinstance(child, ast.expr))


def calibration_text(cfg: CalibCfg) -> str:
    """All text the calibration windows are drawn from."""
    if cfg.source == "package":
        return package_prose(cfg.package, cfg.package_version)
    import datasets

    ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=cfg.split)
    if cfg.text_column not in ds.column_names:
        raise UserError(
            f"calib.text_column={cfg.text_column!r} not in {cfg.hub_id} (columns: {', '.join(ds.column_names)})"
        )
    return "\n\n".join(t for t in ds[cfg.text_column] if t.strip())
