from twisted.application.service import ServiceMaker

transferd_fakefts = ServiceMaker(
    "transferd-fakefts",
    "transferd.testing.fakefts",
    "A fake CERN FTS3 REST server for tests and demos (jobs in memory, optional local copies)",
    "transferd-fakefts",
)
