"""Create a small sample archive: `python -m transferd.sample DIR`.

sample-001 is a single file, sample-002 a directory product with nested
files; the contents are deterministic so deliveries can be compared.
"""

import hashlib
import os
import sys


def _content(name, size):
    """size bytes derived from name, the same on every machine."""
    block = hashlib.sha256(name.encode()).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


PRODUCTS = {
    "sample-001": 1024 * 1024,
    "sample-002/visibilities.ms": 256 * 1024,
    "sample-002/calibration/gains.h5": 64 * 1024,
    "sample-002/README.txt": 0,
}


def create(archive_root):
    """Write the sample products under archive_root (existing ones are left as they are)."""
    for relative, size in PRODUCTS.items():
        path = os.path.join(archive_root, relative)
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = b"A sample MeerKAT-like data product for trying transferd.\n" if size == 0 else _content(relative, size)
        with open(path + ".tmp", "wb") as handle:
            handle.write(data)
        os.rename(path + ".tmp", path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m transferd.sample ARCHIVE_DIR", file=sys.stderr)
        return 2
    create(argv[0])
    print(f"sample archive ready in {argv[0]}: sample-001 (file), sample-002 (directory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
