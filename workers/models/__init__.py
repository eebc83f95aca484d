"""Model directories in diffusers format: loading one component at a time, and building tiny test models.

`loading` opens real Wan2.1 checkouts and tiny models with the same code;
`tiny` writes a tiny model directory with deterministic random weights for
machines without a GPU or without weights. Nothing here downloads from a hub.
"""
