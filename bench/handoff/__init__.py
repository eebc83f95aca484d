"""The stage hand-off, measured against its baselines on production-size payloads.

Run: ``python -m bench.handoff [--quick] [--repeats N] [--payloads text,480p,720p] [--receive auto|slot] [--json PATH]``.

The same tensors move from one process to another three ways, in one run:

1. **farm** -- what the stage workers run. The producer is a separate process
   with a real ``StageRuntime``: its own ``MooncakeEngine`` and ``SlotPool``
   (registered once), a registered live worker with its heartbeat and its ack
   listener. It packs the tensors into a slot (``workers.handoff.stage_output``)
   and publishes the signed room (``Rooms.publish``). The consumer is this
   process with its own engine and pool; it runs ``workers.handoff.pull_input``:
   claim (which returns the room), verify the descriptor (signature, lease,
   bounds), check the producer is live at its registered endpoint and mark
   TRANSFERRING (one step), batch-read, copy out and verify the copies, ack.

   - ``farm``      = publish + pull_input (the issue's "publish + claim + pull + verify + ack")
   - ``farm+pack`` = farm + the producer's pack (copy into the slot, checksum, sign):
     the counterpart of the pickling that the Redis path's enqueue does
   - ``raw read``  = ``MooncakeEngine.batch_read`` of the same spans, alone
   - steps         = one more hand-off per repeat runs the product's own pull_input
     with every call it makes wrapped in a timer (``traced_steps``), to show where
     the time goes; "other" is the Python between those calls
   - overhead      = per step-by-step hand-off, all its steps but its own batch_read
     (median, in ms): the farm's cost beyond the raw read. The unpaired
     median(farm) - median(raw read) is reported beside it; it carries the
     transport's jitter, which on a small VM is larger than the 5 ms target.

2. **redis** -- what rq users do by default: the tensors as an rq job argument
   (rq's default pickle serializer; rq also zlib-compresses the job data),
   ``Queue.enqueue``; the consumer ``Job.fetch`` + ``job.args``.

3. **memcpy** -- ``dst.copy_(src)`` of the same bytes between preallocated uint8
   tensors in this process (caches evicted first): the local limit.

Informational, not a target: **redis SET/GET bytes** -- the payload's raw bytes
through one ``SET`` and one ``GET`` (no rq, no pickle, no zlib), to show how much
of the rq path's cost is rq's own serialisation rather than Redis.

Every farm measurement gets a freshly published room; the order farm / raw read /
steps rotates per repeat; the rq path runs after the farm phase (it leaves Valkey
busy writing AOF). Both processes run torch with one intra-op thread, like the
embedded farm's workers (``OMP_NUM_THREADS`` overrides). The CPU that other
processes used meanwhile is reported per payload: the figures mean little on a
busy machine.

The bench starts its own Valkey (``start_valkey`` in a temporary folder) and the
producer process, and stops both on the way out, Ctrl-C, SIGTERM and errors included.
The producer talks JSON lines over its stdin/stdout; the Redis URL and farm
secret travel on that pipe, never on a command line.

The package, by job: `payloads` (the tensors), `engines` (the runtimes and the
producer process), `steps` (what is measured), `stats` and `report` (the
figures), `cli` (flags, the run, the exit code).
"""

from bench.handoff.cli import main
from bench.handoff.report import RECEIVE_PRIVATE, RECEIVE_SLOT
from bench.handoff.steps import PULL_STEP

__all__ = ["PULL_STEP", "RECEIVE_PRIVATE", "RECEIVE_SLOT", "main"]
