"""Files on local disk, as the local stager, the reference stager and the local mover handle them.

Copies stream in 1 MiB chunks, checksum what they write (adler32, as the
stagers report and FTS verifies) and fsync each file, since a staging
report or a delivery promises the bytes are on disk.  Everything here
blocks: call it in a thread.
"""

import os
import shutil
import zlib

from transferd.jobs import StagedFile

CHUNK = 1 << 20


def is_plain_name(name):
    """True when name is one ordinary path component: no separator, not hidden, not '.' or '..'."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\0" not in name
        and (os.altsep is None or os.altsep not in name)
    )


def safe_relative(path, name):
    """True when a recorded file path stays inside the product: name or name/..., no '..'."""
    parts = path.split("/")
    return parts[0] == name and all(part not in ("", ".", "..") for part in parts)


def remove(path):
    """Remove a file or a directory tree if it is there (a link is removed, not followed)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def checksum(path, check=None):
    """(size, adler32) of a file."""
    size, adler = 0, 1
    with open(path, "rb") as reader:
        while chunk := reader.read(CHUNK):
            if check is not None:
                check()
            size += len(chunk)
            adler = zlib.adler32(chunk, adler)
    return size, adler


def copy_file(source, target, check=None, link=False):
    """Copy source to a new file target, fsynced; return (size, adler32) of what is now at target.

    check, if given, is called between chunks and raises to stop the copy.
    link: hard-link instead (no bytes move; the checksum is still read).
    """
    if link:
        os.link(source, target)
        return checksum(target, check)
    size, adler = 0, 1
    with open(source, "rb") as reader, open(target, "xb") as writer:
        while chunk := reader.read(CHUNK):
            if check is not None:
                check()
            writer.write(chunk)
            size += len(chunk)
            adler = zlib.adler32(chunk, adler)
        writer.flush()
        os.fsync(writer.fileno())
    return size, adler


def copy_tree(source, target, name, check=None, link=False):
    """Copy a file or directory source to target; return its StagedFiles, paths under name/, sorted.

    Links to files are copied as files; links to directories are not followed.
    """
    if not os.path.isdir(source):
        return [_staged(name, *copy_file(source, target, check, link))]
    files = []
    for directory, _subdirs, names in os.walk(source):
        relative = os.path.relpath(directory, source)
        os.makedirs(os.path.join(target, relative), exist_ok=True)
        for filename in names:
            copied = copy_file(os.path.join(directory, filename), os.path.join(target, relative, filename),
                               check, link)
            files.append(_staged(os.path.join(name, relative, filename), *copied))
    return sorted(files, key=lambda f: f.path)


def stage_copy(source, directory, name, check=None, link=False):
    """Copy source to directory/name by way of a hidden partial copy; return its StagedFiles.

    A partial copy a crash left, and an earlier attempt's complete one, are
    replaced: a half copy never looks complete.
    """
    final = os.path.join(directory, name)
    partial = os.path.join(directory, f".{name}.partial")
    os.makedirs(directory, exist_ok=True)
    remove(partial)
    try:
        files = copy_tree(source, partial, name, check, link)
        if check is not None:
            check()
        remove(final)
        os.rename(partial, final)
    except BaseException:
        remove(partial)
        raise
    return files


def list_tree(source):
    """The (relative path, size) of each file of a product; paths start with the product name."""
    name = os.path.basename(source.rstrip("/"))
    if not os.path.isdir(source):
        return [(name, os.path.getsize(source))]
    found = []
    for directory, _subdirs, names in os.walk(source):
        for filename in names:
            path = os.path.join(directory, filename)
            found.append((_relative(os.path.join(name, os.path.relpath(path, source))), os.path.getsize(path)))
    return sorted(found)


def _relative(path):
    return os.path.normpath(path).replace(os.sep, "/")


def _staged(path, size, adler):
    return StagedFile(_relative(path), size, "adler32:%08x" % adler)
