from twisted.application.service import ServiceMaker

sna = ServiceMaker(
    "sna", "sna.tap", "Sendense Node Appliance control daemon (backup API and job runner).", "sna"
)
