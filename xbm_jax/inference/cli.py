"""Commands: `xbm-embed`, `xbm-search`, `xbm-calibrate` (walkthrough: docs/search.md).

    xbm-embed --model /tmp/run --list photos/test.txt --out gallery.npz
    xbm-search --index gallery.npz --model /tmp/run --images query/ --k 5
    xbm-calibrate --index val.npz --precision 0.95 --out threshold.json

A mistake the user can fix (an unreadable image, a wrong embedding dim, an empty
index, a workdir without a checkpoint, ...) prints one line `error: ...` on stderr and
exits with status 2 before anything is written; `--verbose` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from xbm_jax.train.errors import DataError, UserError

USER_ERROR_STATUS = 2


def _model_flags(p, required: bool):
  p.add_argument("--model", required=required, help="training workdir, or an exported .msgpack")
  p.add_argument("--config", help="config.json (or its workdir) for a .msgpack --model")
  p.add_argument("--batch-size", type=int, help="images per batch (default: eval_batch_size)")


def _input_flags(p):
  g = p.add_mutually_exclusive_group()
  g.add_argument("--images", nargs="+", help="image files or folders (unlabelled)")
  g.add_argument("--list", help="list file of `relative/path.jpg,label` lines")
  g.add_argument("--split", help="a prepared split of the model's dataset (labels, no paths)")
  p.add_argument("--image-root", help="--list: folder its paths are relative to")
  p.add_argument("--data-dir", help="--split: overrides config.input.data_dir")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _source(a, embedder):
  from xbm_jax.inference import sources  # pylint: disable=g-import-not-at-top

  c = embedder.channels  # 1 for a grayscale model: files are read as gray
  if a.list:
    return sources.list_file(a.list, a.image_root, channels=c)
  if a.split:
    from xbm_jax.train import setup  # pylint: disable=g-import-not-at-top

    cfg = embedder.config.input
    if a.data_dir:
      cfg.data_dir = a.data_dir
    return sources.SplitSource(setup.load_source(cfg, a.split))
  if a.images:
    if len(a.images) == 1 and os.path.isdir(a.images[0]):
      return sources.folder(a.images[0], channels=c)
    files = [f for f in a.images if not os.path.isdir(f)]
    if len(files) != len(a.images):
      raise DataError("--images takes one folder or a list of image files, not both")
    return sources.FileSource(files, channels=c)
  raise DataError("nothing to embed: give --images, --list or --split")


def _embedder(a):
  from xbm_jax.inference.embedder import Embedder  # pylint: disable=g-import-not-at-top

  return Embedder.load(a.model, config=a.config, batch_size=a.batch_size)


def _embed_index(a, embedder, source, *, part_rows: int = 0):
  """The source's embeddings as an Index, added part by part (see `embed_parts`)."""
  from xbm_jax.inference.index import Index  # pylint: disable=g-import-not-at-top

  index = Index(embedder.dim, labelled=source.labelled)
  for part in embedder.embed_parts(source, part_rows=part_rows, progress=not a.no_progress):
    rows = part["index"]
    labels = part["labels"] if source.labelled else None
    index.add(part["emb"], ids=rows, labels=labels, paths=source.paths[rows])
  return index


def check_writable(path: str, flag: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise DataError(f"{flag} {path}: no folder {folder}")
  if not os.access(folder, os.W_OK):
    raise DataError(f"{flag} {path}: folder {folder} is not writable")


def embed_main(argv):
  p = argparse.ArgumentParser(prog="xbm-embed", description="Embed images into an index file.")
  _model_flags(p, required=True)
  _input_flags(p)
  p.add_argument("--out", required=True, help="the index file to write (.npz)")
  p.add_argument("--part-rows", type=int, default=65536, help="records embedded per part")
  a = p.parse_args(argv)
  check_writable(a.out, "--out")
  embedder = _embedder(a)
  index = _embed_index(a, embedder, _source(a, embedder), part_rows=a.part_rows)
  index.save(a.out)
  kind = "labelled" if index.labelled else "unlabelled"
  print(f"wrote {a.out}: {len(index)} {kind} embeddings of dim {index.dim} (step {embedder.step})")


def search_main(argv):
  p = argparse.ArgumentParser(prog="xbm-search", description="Nearest neighbours in an index.")
  p.add_argument("--index", required=True, help="the gallery index (xbm-embed --out)")
  p.add_argument("--query-index", help="queries already embedded (an index file)")
  _model_flags(p, required=False)
  _input_flags(p)
  p.add_argument("--k", type=int, default=5, help="neighbours per query")
  p.add_argument("--backend", default="exact", choices=("exact", "faiss"))
  p.add_argument("--threshold", help="threshold.json: print only neighbours that match")
  a = p.parse_args(argv)
  from xbm_jax.inference import threshold as th  # pylint: disable=g-import-not-at-top
  from xbm_jax.inference.index import Index  # pylint: disable=g-import-not-at-top

  if a.k < 1:
    raise DataError(f"--k must be >= 1, got {a.k}")
  gallery = Index.load(a.index)
  cut = th.Threshold.load(a.threshold) if a.threshold else None
  if cut is not None and cut.dim and cut.dim != gallery.dim:
    raise DataError(
      f"{a.threshold} was calibrated on {cut.dim}-d embeddings; {a.index} holds {gallery.dim}-d"
    )
  cut = cut.value if cut is not None else None
  if a.query_index:
    queries = Index.load(a.query_index, dim=gallery.dim)
  else:
    if not a.model:
      raise DataError("query images need --model (or give --query-index)")
    embedder = _embedder(a)
    if embedder.dim != gallery.dim:  # before embedding any query
      raise DataError(f"{a.index} holds {gallery.dim}-d embeddings; --model makes {embedder.dim}-d")
    queries = _embed_index(a, embedder, _source(a, embedder))
  scores, rows = gallery.search(queries.emb, a.k, backend=a.backend)
  _print_results(queries, gallery, scores, rows, cut)


def _print_results(queries, gallery, scores, rows, cut):
  print("query\trank\tpath\tid\tlabel\tscore")
  for qi, (vs, rs) in enumerate(zip(scores, rows)):
    name = queries.paths[qi] or f"#{queries.ids[qi]}"
    for rank, (v, r) in enumerate(zip(vs, rs), start=1):
      if cut is not None and v < cut:
        break
      label = gallery.labels[r] if gallery.labelled else ""
      print(f"{name}\t{rank}\t{gallery.paths[r]}\t{gallery.ids[r]}\t{label}\t{v:.6f}")


def calibrate_main(argv):
  p = argparse.ArgumentParser(prog="xbm-calibrate", description="A match threshold.")
  p.add_argument("--index", help="a labelled index (xbm-embed of a list file or split)")
  _model_flags(p, required=False)
  _input_flags(p)
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--precision", type=float, help="target precision of matched pairs")
  g.add_argument("--recall", type=float, help="target recall of same-label pairs")
  p.add_argument("--max-pairs", type=int, default=4_000_000, help="pairs scored at most")
  p.add_argument("--out", required=True, help="threshold file to write (.json)")
  a = p.parse_args(argv)
  from xbm_jax.inference import threshold as th  # pylint: disable=g-import-not-at-top
  from xbm_jax.inference.index import Index  # pylint: disable=g-import-not-at-top

  check_writable(a.out, "--out")
  if a.index:
    index = Index.load(a.index)
  elif a.model:
    embedder = _embedder(a)
    index = _embed_index(a, embedder, _source(a, embedder))
  else:
    raise DataError("give --index, or --model with --list/--split")
  if not index.labelled:
    raise DataError(f"{a.index or 'the images'}: calibration needs labels (unlabelled index)")
  scores = th.pair_scores(index.emb, index.labels, max_pairs=a.max_pairs)
  t = th.calibrate(*scores, precision=a.precision, recall=a.recall, dim=index.dim)
  t.save(a.out)
  print(
    f"wrote {a.out}: threshold {t.value:.6f} ({t.target} >= {t.goal}: precision "
    f"{t.precision:.4f}, recall {t.recall:.4f} on {t.num_positive_pairs} same-label and "
    f"{t.num_negative_pairs} other pairs)"
  )


def run_main(main, argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  verbose = "--verbose" in argv
  argv = [x for x in argv if x != "--verbose"]
  try:
    main(argv)
  except (UserError, ImportError) as e:
    if verbose:
      raise
    sys.stderr.flush()
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)


def embed(argv=None):
  run_main(embed_main, argv)


def search(argv=None):
  run_main(search_main, argv)


def calibrate(argv=None):
  run_main(calibrate_main, argv)
