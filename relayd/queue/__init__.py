"""
The queue: where receiving hands mail to sending (DESIGN sections 1 and 5).

  - L{relayd.queue.spool}: the spool directories and the commit protocol
    (one fsync per accepted message), recovery at startup, the one-owner
    rule per directory;
  - L{relayd.queue.record}: the queue file (message, then the typed,
    versioned envelope record) and its reader;
  - L{relayd.queue.scheduler}: the queue manager, which picks due messages,
    hands them to delivery and records the outcome;
  - L{relayd.queue.safeio}: durable writes (temporary name, fsync, rename).
"""
