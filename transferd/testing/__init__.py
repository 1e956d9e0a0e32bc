"""Fakes of the servers transferd talks to, speaking their real protocols over real HTTP.

Shipped with the package so that tests (ours and other people's) and demos can
run against them: see transferd.testing.webdav, transferd.testing.taperest (a WLCG
Tape REST server) and transferd.testing.fakefts
(a fake CERN FTS3, also `twistd -n transferd-fakefts`); transferd.testing.webhooks
is a webhook receiver that records what transferd sends and fails its first answers.
"""
