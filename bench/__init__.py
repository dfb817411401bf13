"""
The benchmark: relayd beside a private Postfix (see L{bench.run}).
"""
