"""What operators use: the control socket and relayctl, metrics, logs, relayd-sendmail."""
