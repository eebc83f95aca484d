"""reelfarm's control plane: job specs, the Redis key schema, rooms, submission, status and the CLI (never torch)."""
