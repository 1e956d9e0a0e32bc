from twisted.application.service import ServiceMaker

transferd_stager = ServiceMaker(
    "transferd-stager",
    "transferd.stagerd",
    "A reference stager for transferd's callback protocol: stages products from a directory archive",
    "transferd-stager",
)
