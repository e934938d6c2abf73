"""Data: tfds array_record datasets, samplers, transforms and input pipelines.

Submodules are imported on demand (`from xbm_jax.data import sources`), so that
importing this package stays cheap and pulls in neither tfds nor grain.
"""
