"""transferctl: the command-line client of transferd's v1 API.

A plain synchronous program, installed as the console script `transferctl`
(transferd.cli.main:main); it is no part of the daemon.
"""
