"""Constants shared by the dispatcher (:mod:`.seq_loglik`) and both backends.

A separate module so the backends never import back from the dispatcher that
loads them (no import cycle, no private names crossing modules).
"""

# Finite "empty shard" maximum: exp(EMPTY_SHARD_MAX - M) underflows to exactly 0
# while exp(EMPTY_SHARD_MAX - EMPTY_SHARD_MAX) stays 1 (an -inf sentinel would
# give nan there).  The Triton kernel spells the same literal inside its code.
EMPTY_SHARD_MAX = -1.0e30
