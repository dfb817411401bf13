"""
What operators use: the control socket and C{relayctl}
(L{relayd.ops.control}, L{relayd.ops.relayctl}), metrics, logs,
C{relayd-sendmail}, C{relayd-passwd} and C{relayctl check-domain}.
"""
