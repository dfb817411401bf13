"""
The receiving side of SMTP, one module per job (DESIGN section 2):

  - L{relayd.smtp.session}: the session state machine, its factory and
    the connection limits.
"""
