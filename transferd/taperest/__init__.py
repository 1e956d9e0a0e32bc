"""The WLCG Tape REST API v1: a client (transferd.taperest.client) and the poller that follows staging requests.

The stager that uses them is transferd.stagers.taperest; a fake Tape REST
server for tests is transferd.testing.taperest.
"""
