"""Built-in policies, loaded through the C{relayd.policies} entry-point group."""
