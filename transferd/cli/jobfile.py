"""The jobs of `transferctl submit --file`: CSV with a header, or JSON lines.

The format is told by the first character that is not white space: `{`
starts JSON lines, anything else is CSV. The whole input is read and checked
before anything is sent, so a typo on line 2,000 submits nothing.
"""

import csv
import dataclasses
import io
import json

from transferd.cli.errors import USAGE, CLIError

FIELDS = ("product_id", "destination_path", "priority", "label", "metadata")
REQUIRED = ("product_id", "destination_path")


@dataclasses.dataclass(frozen=True)
class Item:
    """One job to submit and the line it came from (0: the command line)."""

    line: int
    job: dict


def from_arguments(product_id, destination_path, defaults):
    return [Item(0, {"product_id": product_id, "destination_path": destination_path, **defaults})]


def read(handle, name, defaults):
    """The items of the open text file handle (name is for error lines); defaults fill unset optional fields."""
    try:
        text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"cannot read {name}: {error}", USAGE) from None
    if text.lstrip().startswith("{"):
        items = list(_json_lines(text, name))
    else:
        items = list(_csv_rows(text, name))
    if not items:
        raise CLIError(f"{name} holds no jobs", USAGE)
    return [Item(item.line, {**defaults, **item.job}) for item in items]


def _json_lines(text, name):
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as error:
            raise CLIError(f"{name} line {number}: not valid JSON ({error.msg})", USAGE) from None
        if not isinstance(job, dict):
            raise CLIError(f"{name} line {number}: each line must be a JSON object", USAGE)
        yield Item(number, _checked(job, name, number))


def _csv_rows(text, name):
    reader = csv.reader(io.StringIO(text))
    header = None
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                _check_header(header, name, reader.line_num)
                continue
            if len(row) != len(header):
                raise CLIError(f"{name} line {reader.line_num}: {len(row)} fields where the header has "
                               f"{len(header)}", USAGE)
            job = {key: value.strip() for key, value in zip(header, row) if value.strip()}
            yield Item(reader.line_num, _checked(_typed(job, name, reader.line_num), name, reader.line_num))
    except csv.Error as error:
        raise CLIError(f"{name} line {reader.line_num}: {error}", USAGE) from None


def _check_header(header, name, number):
    unknown = [column for column in header if column not in FIELDS]
    if unknown:
        raise CLIError(f"{name} line {number}: unknown column {unknown[0]!r} (columns: {', '.join(FIELDS)}; "
                       "product_id and destination_path are required)", USAGE)
    missing = [column for column in REQUIRED if column not in header]
    if missing:
        raise CLIError(f"{name} line {number}: the header has no {missing[0]} column "
                       "(the first line names the columns)", USAGE)
    if len(set(header)) != len(header):
        raise CLIError(f"{name} line {number}: a column is named twice", USAGE)


def _typed(job, name, number):
    """CSV cells are text: priority becomes a number and metadata a JSON object."""
    if "priority" in job:
        job["priority"] = parse_priority(job["priority"], f"{name} line {number}: priority")
    if "metadata" in job:
        job["metadata"] = parse_metadata(job["metadata"], f"{name} line {number}: metadata")
    return job


def _checked(job, name, number):
    unknown = [key for key in job if key not in FIELDS]
    if unknown:
        raise CLIError(f"{name} line {number}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})", USAGE)
    for key in REQUIRED:
        if not isinstance(job.get(key), str) or not job[key]:
            raise CLIError(f"{name} line {number}: {key} is missing", USAGE)
    return job


def parse_priority(text, what):
    try:
        return int(text)
    except (TypeError, ValueError):
        raise CLIError(f"{what} must be a whole number from 1 to 5, not {text!r}", USAGE) from None


def parse_metadata(text, what):
    try:
        value = json.loads(text)
    except ValueError as error:
        raise CLIError(f"{what} is not valid JSON ({error.msg})", USAGE) from None
    if not isinstance(value, dict):
        raise CLIError(f"{what} must be a JSON object, such as '{{\"proposal\": \"SCI-2026-01\"}}'", USAGE)
    return value
