"""The data plane: stage worker processes, the tensor hand-off, model stages, video encoding and upload."""
