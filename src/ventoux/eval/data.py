"""Evaluation inputs read and checked before any model loads: text documents and JSONL task lines.

    docs = read_documents(["wiki.txt", "more.jsonl"])   # a .txt file is one document; .jsonl: {"text": ...} a line
    rows = read_jsonl("task.jsonl")                      # [(line number, dict), ...]
    write_json_atomic(result, "result.json")             # all or nothing: a temp file, then a rename

Every problem is a VentouxError naming the file, the line and the field, so a user can fix it in one go.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VentouxError


@dataclass
class Document:
    source: str  # "file" or "file:line"
    file: str
    text: str


def read_file(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        raise VentouxError(f"{path} is a folder, not a file: name a file in it")
    if not path.is_file():
        raise VentouxError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VentouxError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise VentouxError(f"{path}: the file is empty")
    return text


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; every line must be a JSON object."""
    rows = []
    for number, line in enumerate(read_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise VentouxError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise VentouxError(f"{path}:{number}: its JSON nests arrays or objects too deeply to read") from None
        if not isinstance(obj, dict):
            raise VentouxError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        rows.append((number, obj))
    return rows


def field(path, number: int, obj: dict, name: str, kind: type | tuple[type, ...] = str, *, hint: str):
    """obj[name], checked: present, of `kind`, and not an empty string. hint: what a line should look like."""
    if name not in obj:
        raise VentouxError(f'{path}:{number}: no "{name}" field{hint}')
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):  # JSON true/false is never a wanted value
        names = " or ".join(k.__name__ for k in kinds)
        raise VentouxError(f'{path}:{number}: field "{name}" must be a {names}, not {type(value).__name__}')
    if isinstance(value, str):
        if not value:
            raise VentouxError(f'{path}:{number}: field "{name}" is empty')
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800" escape: a lone surrogate, which no tokenizer takes
            raise VentouxError(f'{path}:{number}: field "{name}" holds a lone surrogate (\\u{ord(value[e.start]):04x} '
                               f'at character {e.start}), not text; fix that line') from None
    return value


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".json")


def read_documents(paths: list[str | Path]) -> list[Document]:
    """A text file is one document; a .jsonl file holds one {"text": ...} document a line."""
    if not paths:
        raise VentouxError("no data file given: pass --data FILE (text, or JSONL with a \"text\" field a line)")
    docs = []
    for path in paths:
        if is_jsonl(path):
            hint = ': each line must be {"text": "..."}'
            docs += [Document(f"{path}:{n}", str(path), field(path, n, obj, "text", hint=hint))
                     for n, obj in read_jsonl(path)]
        else:
            docs.append(Document(str(path), str(path), read_file(path)))
    return docs


def check_out(path: str | Path) -> None:
    """Fails before any work when the result could not be written."""
    if Path(path).is_dir():
        raise VentouxError(f"--out {path} is a folder: give a file name, such as {Path(path) / 'result.json'}")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise VentouxError(f"--out {path}: the folder {parent} does not exist")
    tmp = _tmp(Path(path))
    try:  # a trial write of the temporary file: os.access says yes to root even on /sys or a read-only disk
        tmp.touch()
        tmp.unlink()
    except OSError as e:
        raise VentouxError(f"--out {path} cannot be written ({e.strerror or e}); choose another path") from None


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_json_atomic(obj, path: str | Path) -> None:
    """Write JSON to a temporary file beside `path`, then rename it: readers see the old file or the whole new one."""
    path = Path(path)
    check_out(path)
    tmp = _tmp(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # disk full: name the file the user gave, not the temporary one
        raise VentouxError(f"--out {path} cannot be written ({e.strerror or e}); choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)
