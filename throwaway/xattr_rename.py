"""Spike: does a user extended attribute survive os.rename on this filesystem?

The local mover copies into a hidden temporary name, tags it with
user.transferd.job_id, then renames it into place; after a crash it reads the
tag back to recognise its own delivery.  Run with a directory argument to
test another filesystem (default: the system temporary directory).
"""

import os
import sys
import tempfile


def main(directory):
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        temporary = os.path.join(scratch, ".product.partial")
        final = os.path.join(scratch, "product")
        with open(temporary, "wb") as handle:
            handle.write(b"bytes")
        try:
            os.setxattr(temporary, "user.transferd.job_id", b"job-1")
        except OSError as error:
            print(f"{directory}: user xattrs not supported ({error.strerror}); the mover falls back to refusing existing files")
            return 0
        os.rename(temporary, final)
        tag = os.getxattr(final, "user.transferd.job_id")
        print(f"{directory}: tag after rename = {tag!r}")
        return 0 if tag == b"job-1" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()))
