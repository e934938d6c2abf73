"""Inference with a trained model: embed images, search an index, match by a threshold.

`Embedder` (embedder.py) applies a workdir's model as evaluation does; `Index`
(index.py) holds embeddings with ids, paths and labels and searches them exactly;
`Threshold` / `Matcher` (threshold.py) decide "same item" at a calibrated score;
`export.py` writes the embedder as a serialized `jax.export` artifact. Commands:
`xbm-embed`, `xbm-search`, `xbm-calibrate` (cli.py); walkthrough: docs/search.md.
"""
