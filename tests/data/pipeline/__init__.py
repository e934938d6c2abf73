"""Tests of the glyph data, the P x K sampler, transforms and the input pipeline."""
