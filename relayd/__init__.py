"""relayd: a durable ESMTP smart host built on Twisted."""
