"""The labels file of `dataset=folder` (`labels.csv` or `labels.json`; the forms: `wsss.data.folder`), read
into one `LabelsFile`: each image's class names and the line it came from, and every problem found, each
naming the file and line, for the source's skip policy."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LABEL_FILES = ("labels.csv", "labels.json")


def image_id(name: str) -> str:
    """The id of an image path relative to images/: forward slashes, no leading ./, no image extension."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES else name


@dataclass
class Problem:
    """One bad row or image: the id it concerns (None: the whole file), a skip-count reason, the message."""

    image_id: str | None
    reason: str
    message: str


@dataclass
class LabelsFile:
    """A parsed labels file: id -> class names, where each id was read, and what was wrong."""

    path: Path
    rows: dict[str, list[str]] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # id -> "labels.csv line 7"
    columns: list[str] | None = None  # the 0/1 form's class columns
    problems: list[Problem] = field(default_factory=list)

    def names(self) -> list[str]:
        """Every class name the file uses, sorted (the 0/1 form: its columns)."""
        used = set(self.columns or [])
        for names in self.rows.values():
            used.update(names)
        return sorted(used)


def find_labels_file(root: Path) -> Path | None:
    """`root/labels.csv` or `root/labels.json`; None when neither exists; both is an error."""
    present = [root / n for n in LABEL_FILES if (root / n).is_file()]
    if len(present) > 1:
        raise ValueError(f"{root}: both labels.csv and labels.json exist; keep one")
    return present[0] if present else None


def _add_row(out: LabelsFile, name: str, labels: list[str], where: str) -> None:
    key = image_id(name)
    if not key:
        out.problems.append(Problem(None, "malformed_row", f"{where}: empty image name"))
    elif key in out.rows:
        out.problems.append(Problem(key, "duplicate_id", f"{where}: image {key!r} is already on {out.where[key]}"))
    else:
        out.rows[key] = sorted(set(labels))
        out.where[key] = where


# Delimiters a spreadsheet may have written labels.csv with: `;` where the decimal separator is a comma, tab for
# "tab-separated" exports. Named in the error only; reading with them would split a names-form label list.
OTHER_DELIMITERS = {";": "';'", "\t": "tab"}


def _is_header(header: list[str]) -> bool:
    """Whether a parsed first row is a header of either form: `image` and at least one more column."""
    return len(header) >= 2 and header[0].lower() == "image"


def _delimiter_hint(text: str) -> str:
    """`; ...` naming the delimiter the first line parses with, when another one than the comma does."""
    first = text.splitlines()[:1]
    for delimiter, name in OTHER_DELIMITERS.items():
        header = [h.strip() for h in next(csv.reader(first, delimiter=delimiter), [])]
        if _is_header(header):
            return (
                f"; it parses as {header} with {name} between the fields: save it comma-separated (CSV with ',', "
                "the names of one image still separated by ';')"
            )
    return ""


def read_labels_csv(path: Path) -> LabelsFile:
    """Parse labels.csv in either form (the header decides); bad rows become problems, named by line."""
    out = LabelsFile(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        text = f.read()
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header = [h.strip() for h in rows[0]] if rows else []
    if not _is_header(header):
        raise ValueError(
            f"{path} line 1: header {header} must be `image,labels` (names separated by ';') or "
            f"`image,<class>,<class>,...` (one 0/1 column per class){_delimiter_hint(text)}"
        )
    names_form = len(header) == 2 and header[1].lower() == "labels"
    if not names_form:
        dup = sorted({h for h in header[1:] if header[1:].count(h) > 1})
        if dup or not all(header[1:]):
            raise ValueError(f"{path} line 1: class columns must be unique and named, got {header[1:]}")
        out.columns = header[1:]
    for line, row in enumerate(rows[1:], start=2):
        where = f"{path.name} line {line}"
        if not any(c.strip() for c in row):
            continue  # blank line
        if len(row) != len(header):
            out.problems.append(
                Problem(
                    image_id(row[0]) if row else None,
                    "malformed_row",
                    f"{where}: {len(row)} fields, the header has {len(header)} ({','.join(header)})",
                )
            )
            continue
        if names_form:
            _add_row(out, row[0], [n.strip() for n in row[1].split(";") if n.strip()], where)
            continue
        values = [v.strip() for v in row[1:]]
        bad = [(c, v) for c, v in zip(out.columns, values, strict=True) if v not in ("0", "1")]
        if bad:
            out.problems.append(
                Problem(
                    image_id(row[0]), "malformed_row", f"{where}: column {bad[0][0]!r} is {bad[0][1]!r}, not 0 or 1"
                )
            )
            continue
        _add_row(out, row[0], [c for c, v in zip(out.columns, values, strict=True) if v == "1"], where)
    return out


def read_labels_json(path: Path) -> LabelsFile:
    """Parse labels.json, `{id: [names]}`; a value that is not a list of strings is a problem of that id."""
    out = LabelsFile(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must map each image id to a list of class names, got a {type(data).__name__}")
    for name, labels in data.items():
        where = f"{path.name} entry {name!r}"
        if not isinstance(labels, list) or not all(isinstance(n, str) for n in labels):
            out.problems.append(Problem(image_id(name), "malformed_row", f"{where}: not a list of class names"))
            continue
        _add_row(out, name, [n.strip() for n in labels if n.strip()], where)
    return out


def read_labels_file(path: Path) -> LabelsFile:
    """labels.csv or labels.json, by its suffix."""
    return read_labels_csv(path) if path.suffix == ".csv" else read_labels_json(path)
