"""The core of the control plane, everything a worker needs too: the job spec, every Redis key, the job record,
rooms and signed descriptors, signed stage calls, rq queues, the object store, settings, recovery.
"""
