"""
The receiving side of SMTP, one module per job (DESIGN section 2):

  - L{relayd.smtp.session}: the session state machine, its factory and
    the connection limits.
  - L{relayd.smtp.wire}: the DATA wire format both ways (L{DataReader} in,
    L{DotStuffer} out) and the RFC 5321 line limits.
  - L{relayd.smtp.sasl}: the AUTH dialogue (PLAIN, LOGIN) as an object the
    session drives.
  - L{relayd.smtp.extensions}: the one table of EHLO keywords and MAIL/RCPT
    parameters that decides what is advertised and read.
"""
