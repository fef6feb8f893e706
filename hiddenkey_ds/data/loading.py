"""Raw splits from wherever `data.path` points: builtin:toy-sst2, a local directory or file, or the hub.

A local path never falls through to the hub: a path that looks local but does not exist is an error, so an
offline machine gets "no such directory" instead of a network timeout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hiddenkey_ds.errors import RecipeError
from hiddenkey_ds.data.toy import TOY_SST2, toy_sst2_rows
from hiddenkey_ds.provenance import sha256_file

# file suffix -> (datasets builder, extra builder kwargs)
BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}), ".json": ("json", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}),
    ".parquet": ("parquet", {}),
}
# file stems that name the same split (GLUE ships dev.*, the hub calls it validation)
SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation"}


def canonical_split(name: str) -> str:
    return SPLIT_ALIASES.get(name, name)


def looks_local(path: str) -> bool:
    """True for anything that cannot be a hub id ('owner/name' or 'name')."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix in BUILDERS


def check_utf8(path: Path, key: str = "data.path") -> None:
    """A text data file (json, jsonl, csv, tsv) must be UTF-8: pyarrow reads any bytes into its string columns and
    fails only when a row is first converted to Python, deep inside tokenizing. Read once here, in blocks, so the
    message names the file, line and byte; a file that is not text at all (a binary renamed .jsonl) fails too."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # the start of a character the previous block cut
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:  # err.object: the pending bytes + this block
                at = offset - pending + err.start
                line += err.object[:err.start].count(b"\n")
                raise RecipeError(
                    f"{key}: {path} is not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset {at} (line {line}) "
                    f"cannot be decoded (hint: re-encode the file, e.g. `iconv -f latin1 -t utf-8 {path.name} > "
                    f"fixed{path.suffix}`, or check that it is a {path.suffix[1:]} file at all)") from None
            line += block.count(b"\n")
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise RecipeError(f"{key}: {path} is not UTF-8 text: it ends inside a multi-byte character (offset "
                              f"{offset}), so it was cut off (hint: copy the file again)") from None


def _check_parquet(path: Path, key: str) -> None:
    """A parquet file starts and ends with the magic bytes PAR1 (a cut-off copy loses the footer)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        what = "is cut off (no footer)" if head == b"PAR1" else "is not a parquet file"
        raise RecipeError(f"{key}: {path} {what}: parquet files begin and end with the bytes PAR1 (hint: copy the "
                          "file again, or give it the suffix of its real format: .jsonl, .csv or .tsv)")


def _load_file(path: Path, split: str, sources: list[dict[str, Any]], key: str = "data.path"):
    import datasets

    builder, kwargs = BUILDERS[path.suffix]
    if builder != "parquet":
        check_utf8(path, key)
    else:
        _check_parquet(path, key)
    try:
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
    except Exception as err:  # datasets raises many types for unreadable files; the user needs the file name
        root = err  # datasets wraps the reader's error ("An error occurred while generating the dataset")
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        first = str(root).strip().splitlines()[0] if str(root).strip() else ""
        raise RecipeError(f"{key}: cannot read {path} as {builder}: {type(root).__name__}: {first} (hint: check that "
                          f"the file is complete and valid {path.suffix[1:]})") from None
    # the content, not row positions: a resume refuses a file that changed under the run (provenance.json)
    sources.append({"split": split, "path": str(path.resolve()), "sha256": sha256_file(path),
                    "bytes": path.stat().st_size})
    return ds


def split_files(directory: Path) -> dict[str, Path]:
    """{split: file} for the data files in `directory`, splits named canonically (dev.* = validation). Training
    and the local lm-eval tasks (eval/tasks/utils.py) find their files here, so both read the same ones.
    Raises ValueError when two files name one split."""
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in BUILDERS or not path.is_file():
            continue
        split = canonical_split(path.stem)
        if split in files:
            raise ValueError(f"{directory} holds two files for split {split!r}: {files[split].name} and {path.name}")
        files[split] = path
    return files


def _missing_split(split: str, available: list[str], where: str, key: str) -> RecipeError:
    hint = "set data.eval_split=null to train without evaluation, or data.eval_path=FILE" if key == "data.eval_split" \
        else "set data.train_split to one of the available splits"
    return RecipeError(f"{key}: split {split!r} not found in {where} (available: {', '.join(available) or 'none'}) (hint: {hint})")


def load_splits(data: Any, sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """{"train": Dataset, "eval": Dataset or None} for a recipe's `data` section. `sources` (when given) gets one
    entry per source read: {"split", "path", "sha256", "bytes"} for a file, {"split", "hub", "name", "revision",
    "fingerprint"} for a hub dataset, {"split", "builtin"} for a builtin one."""
    sources = [] if sources is None else sources
    # role -> (split name, the recipe key that names it, for error messages)
    wanted = {"train": (canonical_split(data.train_split), "data.train_split")}
    # a validation split carved from the training data replaces the evaluation split in the loop
    if data.eval_split is not None and not getattr(data, "validation_from_train", None):
        wanted["eval"] = (canonical_split(data.eval_split), "data.eval_split")
    out: dict[str, Any] = {"train": None, "eval": None}
    if data.eval_path is not None:
        out["eval"] = _load_eval_file(data.eval_path, sources)
        wanted.pop("eval", None)
    return _load_roles(data, wanted, out, sources)


def load_eval_split(data: Any) -> Any:
    """The labelled split lm-eval scores a recipe's task on: data.eval_path, else data.eval_split of data.path
    (never the validation carved from the training data, which picks adapter_best). Read as training reads it."""
    if data.eval_path is not None:
        return _load_eval_file(data.eval_path, [])
    if data.eval_split is None:
        raise RecipeError("data.eval_split is null and data.eval_path unset: the recipe names no labelled split to "
                          "evaluate on (hint: set data.eval_path=FILE or data.eval_split=SPLIT)")
    wanted = {"eval": (canonical_split(data.eval_split), "data.eval_split")}
    return _load_roles(data, wanted, {"train": None, "eval": None}, [])["eval"]


def _load_roles(data: Any, wanted: dict[str, tuple[str, str]], out: dict[str, Any],
                sources: list[dict[str, Any]]) -> dict[str, Any]:
    path = data.path
    if path == TOY_SST2:
        sources += [{"split": split, "builtin": TOY_SST2} for split, _ in wanted.values()]
        return _load_toy(wanted, out)
    if path is not None and path.startswith("builtin:"):
        raise RecipeError(f"data.path: unknown builtin dataset {path!r} (known: {TOY_SST2})")
    local = Path(path).expanduser() if path is not None else None
    if local is not None and local.is_dir():
        return _load_directory(local, wanted, out, sources)
    if local is not None and local.is_file():
        return _load_single_file(local, path, wanted, out, sources)
    if path is not None and looks_local(path):
        raise RecipeError(
            f"data.path: {path!r} does not exist (relative paths are relative to the working directory "
            f"{Path.cwd()}) (hint: check the path; GLUE copies look like ../shared/data/glue/RTE)"
        )
    return _load_hub(data, wanted, out, sources)


def _load_eval_file(eval_path: str, sources: list[dict[str, Any]]):
    eval_file = Path(eval_path).expanduser()
    if not eval_file.is_file() or eval_file.suffix not in BUILDERS:
        raise RecipeError(f"data.eval_path: {eval_path!r} is not a {'/'.join(BUILDERS)} file")
    return _load_file(eval_file, "validation", sources, "data.eval_path")


def _load_toy(wanted: dict[str, tuple[str, str]], out: dict[str, Any]) -> dict[str, Any]:
    import datasets

    for role, (split, key) in wanted.items():
        try:
            out[role] = datasets.Dataset.from_list(toy_sst2_rows(split))
        except KeyError:
            raise _missing_split(split, ["train", "validation"], TOY_SST2, key) from None
    return out


def _load_directory(local: Path, wanted: dict[str, tuple[str, str]], out: dict[str, Any],
                    sources: list[dict[str, Any]]) -> dict[str, Any]:
    try:
        files = split_files(local)
    except ValueError as err:
        raise RecipeError(f"data.path: {err} (hint: keep one, or point data.path at a file)") from None
    for role, (split, key) in wanted.items():
        if split not in files:
            raise _missing_split(split, sorted(files), str(local), key)
        out[role] = _load_file(files[split], split, sources)
    return out


def _load_single_file(local: Path, path: str, wanted: dict[str, tuple[str, str]],
                      out: dict[str, Any], sources: list[dict[str, Any]]) -> dict[str, Any]:
    if local.suffix not in BUILDERS:
        raise RecipeError(f"data.path: {path} has an unknown suffix (hint: one of {', '.join(BUILDERS)})")
    if "train" in wanted:
        out["train"] = _load_file(local, "train", sources)
    if "eval" in wanted:
        raise RecipeError(
            f"data.eval_split: data.path is the single file {path}, which holds only training data "
            "(hint: set data.eval_path=FILE for evaluation, point data.path at a directory with "
            "train.* and dev.*/validation.*, or set data.eval_split=null)"
        )
    return out


def _load_hub(data: Any, wanted: dict[str, tuple[str, str]], out: dict[str, Any],
              sources: list[dict[str, Any]]) -> dict[str, Any]:
    import datasets

    from hiddenkey_ds.data.templates import template_for

    template = template_for(data) if data.task else None
    path = data.path or (template.hub_path if template else None)
    name = data.name
    if name is None and template is not None and path == template.hub_path:
        name = template.hub_name
    if path is None:
        raise RecipeError(f"data.task={data.task!r} has no hub dataset: set data.path to a local file or directory")
    for role, (split, key) in wanted.items():
        try:
            out[role] = datasets.load_dataset(path, name, split=split, revision=data.revision)
        except ValueError as err:
            if "split" in str(err).lower():
                raise RecipeError(f"{key}: split {split!r} not found in hub dataset {path}/{name}: {err}") from err
            raise RecipeError(f"data.path: cannot load hub dataset {path!r} (config {name!r}): {err}") from err
        except Exception as err:  # connection errors come in many types; say what was tried and the way out
            raise RecipeError(
                f"data.path: cannot load hub dataset {path!r} (config {name!r}, split {split!r}): "
                f"{type(err).__name__}: {err} (hint: offline, point data.path at a local copy, e.g. "
                "../shared/data/glue/RTE)"
            ) from err
        # the hub's files are not ours to hash: its id, revision and the content fingerprint datasets computed
        sources.append({"split": split, "hub": path, "name": name, "revision": data.revision,
                        "fingerprint": getattr(out[role], "_fingerprint", None)})
    return out
