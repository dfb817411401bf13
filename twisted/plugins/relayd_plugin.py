from twisted.application.service import ServiceMaker

relayd = ServiceMaker("relayd", "relayd.tap", "A durable ESMTP smart host", "relayd")
