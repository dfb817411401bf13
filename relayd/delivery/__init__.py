"""
Sending (DESIGN section 6): from a queued message to the next hop.

  - L{relayd.delivery.routing}: configured routes and MX lookups;
  - L{relayd.delivery.attempt}: one delivery attempt, hop by hop, with
    connection reuse;
  - L{relayd.delivery.client}: the outbound SMTP client;
  - L{relayd.delivery.oauth2}: OAuth2 access tokens for smart hosts that
    want AUTH XOAUTH2 or OAUTHBEARER;
  - L{relayd.delivery.bounce}: delivery status notifications (RFC 3464);
  - L{relayd.delivery.requiretls}, L{relayd.delivery.smtputf8}: what a
    message received with REQUIRETLS or SMTPUTF8 asks of its next hop.
"""
