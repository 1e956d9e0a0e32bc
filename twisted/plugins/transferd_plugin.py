from twisted.application.service import ServiceMaker

transferd = ServiceMaker(
    "transferd",
    "transferd.tap",
    "Deliver archived data products: REST API, job store, queue, stager and mover",
    "transferd",
)
