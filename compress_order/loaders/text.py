"""Dataset loaders named by `_target_` in compress_order/conf/data/*.yaml."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from compress_order.core.errors import UserError


@dataclass
class TextSplits:
    """Raw text: `train` feeds calibration, `valid` is evaluated."""

    name: str
    train: str
    valid: str
    max_windows: int | None = None  # evaluation windows the dataset's protocol scores (C4: 256), None: all


def _missing(path: str, what: str, name: str, missing_hint: str | None = None) -> None:
    """UserError when a text file is not there (also checked before any model loads: `check_node`)."""
    if not Path(path).expanduser().is_file():
        hint = missing_hint or f"set data.{what}=/path/to/text"
        raise UserError(f"data '{name}': {what} file '{path}' does not exist; {hint}")


def _read(path: str, what: str, name: str, missing_hint: str | None = None) -> str:
    _missing(path, what, name, missing_hint)
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"data '{name}': {what} file '{path}' is not UTF-8 text (byte {e.start}); expected plain text"
        ) from None
    if not text.strip():
        raise UserError(f"data '{name}': {what} file '{path}' is empty; expected plain text")
    return text


def text_files(name: str, train: str, valid: str, missing_hint: str | None = None) -> TextSplits:
    """Plain UTF-8 text files (the embedded Shakespeare corpus, a prepared corpus, or any local corpus);
    `missing_hint` says how to prepare files that are not there."""
    return TextSplits(
        name=name, train=_read(train, "train", name, missing_hint), valid=_read(valid, "valid", name, missing_hint)
    )


def _check_text_files_node(node: dict[str, Any]) -> None:
    """Config-time check (validate.check_config): both files are there (an unprepared `data=wikipedia` is refused
    by `validate` and before a sweep's first job, not when its job loads the data)."""
    for what in ("train", "valid"):
        _missing(str(node.get(what)), what, str(node.get("name")), node.get("missing_hint"))


text_files.check_node = _check_text_files_node  # type: ignore[attr-defined]


# File formats `data.path` may hold, by suffix → the `datasets` builder that reads them.
BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".json.zst": "json",
    ".txt": "text",
    ".raw": "text",
    ".tokens": "text",
}
# Words in a file name that mark a split (wiki.valid.raw, c4-validation.*.json.gz, test-00000-of-00001.parquet).
SPLIT_WORDS = {"validation": {"validation", "valid", "val", "dev"}, "train": {"train"}, "test": {"test"}}


def hf_text(
    name: str,
    dataset: str,
    config: str | None = None,
    train_split: str = "train",
    valid_split: str = "test",
    text_field: str = "text",
    path: str | list[str] | None = None,
    join: str = "\n\n",
    train_files: str | None = None,
    valid_files: str | None = None,
    valid_docs: int | None = None,
    train_docs: int | None = None,
    seed: int = 0,
    max_windows: int | None = None,
    line_rows: Literal["keep", "strip"] = "keep",
) -> TextSplits:
    """A text dataset through `datasets.load_dataset`: from the hub, or from local files with `path`.

    Each split's rows (`text_field`) are joined with `join`, as the GPTQ/SparseGPT loaders do. `train_files` /
    `valid_files` pick files of a large repo (C4's shards); `valid_docs` keeps the first rows of the evaluated
    split; `train_docs` samples rows of the calibration split with `seed` (a C4 shard is far more text than
    calibration needs). `path` is a folder (or list of files) whose file names say their split (`train`,
    `test`, `valid`...): parquet/json/arrow/csv files, plain text (one row per line: `line_rows=keep` keeps
    each line's newline and empties blank lines, as the hub's wikitext rows; `strip` strips, as ptb's), or a
    DatasetDict folder written by `save_to_disk`.
    """
    if line_rows not in ("keep", "strip"):
        raise UserError(f"data '{name}': line_rows={line_rows} is unknown; valid: keep, strip")
    splits = {"train": (train_split, train_files), "valid": (valid_split, valid_files)}
    rows = {
        k: _local_rows(name, path, split, files, config, text_field, line_rows)
        if path
        else _hub_rows(name, dataset, config, split, files, text_field)
        for k, (split, files) in splits.items()
    }
    valid = rows["valid"][:valid_docs] if valid_docs else rows["valid"]
    train = rows["train"]
    if train_docs and train_docs < len(train):
        keep = sorted(random.Random(seed).sample(range(len(train)), train_docs))
        train = [train[i] for i in keep]
    for what, r in (("train", train), ("valid", valid)):
        if not any(s.strip() for s in r):
            raise UserError(f"data '{name}': the {what} split has no text in field '{text_field}'")
    return TextSplits(name=name, train=join.join(train), valid=join.join(valid), max_windows=max_windows)


def _hub_rows(name: str, dataset: str, config: str | None, split: str, files: str | None, field: str) -> list[str]:
    import datasets

    kw: dict[str, Any] = {"data_files": {split: files}} if files else {}
    try:
        ds = datasets.load_dataset(dataset, config, split=split, **kw)
    except (OSError, ValueError) as e:  # offline (ConnectionError is an OSError), missing repo or config
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        what = f"{dataset}" + (f" ({config})" if config else "")
        raise UserError(
            f"data '{name}': cannot load {what} from the Hugging Face hub ({why}); download its files and pass "
            f"data.path=/dir/with/files (file names containing the split: {_split_hint(split)})"
        ) from None
    return _column(name, ds, field, f"{dataset} {split}")


def _local_rows(
    name: str, path: str | list[str], split: str, files: str | None, config: str | None, field: str, line_rows: str
) -> list[str]:
    import datasets
    from datasets.exceptions import DatasetGenerationError

    datasets.disable_progress_bars()  # reading local files takes seconds; the run's own bar is enough
    paths = _local_paths(name, path)
    disk = [p for p in paths if (p / "dataset_dict.json").is_file()]
    if disk:  # a DatasetDict written by `save_to_disk`
        ds = datasets.load_from_disk(str(disk[0]))
        if split not in ds:
            raise UserError(f"data '{name}': {disk[0]} has splits {sorted(ds)}, not '{split}'")
        return _column(name, ds[split], field, str(disk[0]))

    found = _split_files(paths, split, files, config)
    if not found:
        raise UserError(
            f"data '{name}': no file for split '{split}' under {', '.join(map(str, paths))} (looked for "
            f"{' '.join(sorted(BUILDERS))} files with {_split_hint(split)} in the name)"
        )
    builders = {_builder(f) for f in found}
    if len(builders) > 1:
        raise UserError(f"data '{name}': split '{split}' mixes file formats: {', '.join(map(str, found))}")
    builder = builders.pop()
    kw: dict[str, Any] = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in found], split="train", **kw)
    except (OSError, ValueError, DatasetGenerationError) as e:  # unreadable bytes surface as a generation error
        cause = e.__cause__ or e
        why = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
        files = ", ".join(map(str, found))
        raise UserError(f"data '{name}': cannot read {files} as {builder} ({type(cause).__name__}: {why})") from None
    if builder == "text":  # one row per line, shaped like the hub's rows of the same files
        return [ln.strip() if line_rows == "strip" else (ln if ln.strip() else "") for ln in ds["text"]]
    return _column(name, ds, field, str(found[0]))


def _local_paths(name: str, path: str | list[str]) -> list[Path]:
    paths = [Path(p).expanduser() for p in ([path] if isinstance(path, str) else path)]
    for p in paths:
        if not p.exists():
            raise UserError(f"data '{name}': data.path '{p}' does not exist; pass a folder or files of the dataset")
    return paths


def _check_hf_text_node(node: dict[str, Any]) -> None:
    """Config-time check (validate.check_config): counts in range, and local files named by `data.path` there."""
    from compress_order.core.specs import integer

    for key in ("valid_docs", "train_docs", "max_windows"):
        if key in node:
            integer(1, null="all").check(node[key], f"data.{key}")
    if node.get("path"):
        _local_paths(str(node.get("name")), node["path"])


hf_text.check_node = _check_hf_text_node  # type: ignore[attr-defined]


def _builder(f: Path) -> str:
    name = f.name.lower()
    return next(b for suf, b in sorted(BUILDERS.items(), key=lambda kv: -len(kv[0])) if name.endswith(suf))


def _split_files(paths: list[Path], split: str, files: str | None, config: str | None) -> list[Path]:
    """Files of one split: the named shard (`files`' base name) if present, else files whose name has a split word;
    inside a hub-repo copy, files under a folder named like the config (wikitext-2-raw-v1/) win."""
    cands = [
        f
        for p in paths
        for f in (sorted(p.rglob("*")) if p.is_dir() else [p])
        if f.is_file() and any(f.name.lower().endswith(s) for s in BUILDERS)
    ]
    if files:
        named = [f for f in cands if f.name == Path(files).name]
        if named:
            return named
    words = SPLIT_WORDS.get(split, {split})
    hits = [f for f in cands if words & set(re.split(r"[^a-z0-9]+", f.name.lower()))]
    if config:
        in_config = [f for f in hits if config in f.parts]
        hits = in_config or hits
    return hits


def _split_hint(split: str) -> str:
    return "/".join(sorted(SPLIT_WORDS.get(split, {split})))


def _column(name: str, ds: Any, field: str, where: str) -> list[str]:
    if field not in ds.column_names:
        fields = ", ".join(ds.column_names)
        raise UserError(f"data '{name}': {where} has no field '{field}' (fields: {fields}); set data.text_field")
    return [s or "" for s in ds[field]]
