"""The tape namespace as a local mount shows it: which files a product is, and their sizes.

The Tape REST API stages files only, and says nothing of sizes, so the files
of a directory product are read from a local mount of the namespace
(``[stager] namespace_mount``: dCache's NFS export, an EOS FUSE mount...).
Walking a network mount blocks, so it runs in the reactor's thread pool.
"""

import os

from twisted.internet import threads

from transferd import files
from transferd.interfaces import ServiceAway


class NotStageable(LookupError):
    """The product is not in the namespace, holds no file, or cannot be listed; the message says which."""


class Namespace:
    """The mount of the tape namespace's archive_root: product P is <mount>/P.

    retry_after: the ServiceAway delay when the mount is not there.
    """

    def __init__(self, mount, reactor, retry_after=2.0):
        self.mount = mount.rstrip("/") or "/"
        self.reactor = reactor
        self.retry_after = retry_after

    def files(self, product_id):
        """Fire with the product's files: [(path relative to the mount, starting with product_id, size)], sorted.

        Fails with NotStageable, or ServiceAway when the mount is not there.
        """
        return self._in_thread(self._files, product_id)

    def exists(self, product_id):
        """Fire with True or False, or None when the mount is not there to tell."""
        return self._in_thread(self._exists, product_id)

    def sizes(self, relatives):
        """Fire with {relative path: size, or None when it cannot be read} for paths relative to the mount."""
        return self._in_thread(self._sizes, relatives)

    def _in_thread(self, function, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)

    def _check_mounted(self):
        if not os.path.isdir(self.mount):
            raise ServiceAway(f"the tape namespace mount {self.mount} ([stager] namespace_mount) is not there",
                              self.retry_after)

    def _files(self, product_id):
        self._check_mounted()
        source = os.path.join(self.mount, product_id)
        if not os.path.lexists(source):
            raise NotStageable(f"product {product_id!r} is not in the archive ({source} does not exist)")
        try:
            found = files.list_tree(source)
        except OSError as error:
            raise NotStageable(f"product {product_id!r} cannot be listed in the archive: {error}") from None
        if not found:
            raise NotStageable(f"product {product_id!r} is an empty directory in the archive ({source})")
        return found

    def _exists(self, product_id):
        if not os.path.isdir(self.mount):
            return None
        return os.path.lexists(os.path.join(self.mount, product_id))

    def _sizes(self, relatives):
        sizes = {}
        for relative in relatives:
            try:
                sizes[relative] = os.stat(os.path.join(self.mount, relative)).st_size
            except OSError:
                sizes[relative] = None
        return sizes
