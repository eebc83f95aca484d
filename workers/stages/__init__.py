"""One stage's compute per module: encode (text encoder), image_encode (i2v image condition), transform (DiT
denoise, resumable from a `denoise_state`), decode (streaming VAE); `payloads` declares which tensors cross
from encode to transform.

Each stage class loads its model component(s) once and then serves many jobs.
Stages turn tensors into tensors (or frames); they import no queue, transport
or storage code, so the worker process wires them to the hand-off.
"""


class StageCancelled(Exception):
    """A job was stopped at a step boundary because its caller asked (``should_stop()`` returned True)."""


class StagePreempted(Exception):
    """A job handed back at a step boundary because its worker is going away (SIGTERM); its state was saved."""
