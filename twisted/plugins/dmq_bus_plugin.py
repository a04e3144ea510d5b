from twisted.application.service import ServiceMaker

dmq = ServiceMaker("dmq-bus", "dmq_bus.tap", "A node of a Kamailio-compatible DMQ bus.", "dmq")
