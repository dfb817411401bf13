"""
What operators use: the control socket and C{relayctl}
(L{relayd.ops.control} the service, L{relayd.ops.commands} its AMP
commands, L{relayd.ops.controlclient} the blocking client,
L{relayd.ops.queueview} the queue read from the spool,
L{relayd.ops.relayctl}), metrics, logs,
C{relayd-sendmail}, C{relayd-passwd} and C{relayctl check-domain}.
"""
