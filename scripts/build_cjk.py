r"""Builds the SOP-shaped glyph testbed "cjk" as a tfds dataset (xbm_jax/data/glyph_testbed.py).

  apt-get install -y --no-install-recommends fonts-noto-cjk fonts-noto-cjk-extra \
      fonts-wqy-zenhei fonts-wqy-microhei fonts-arphic-ukai fonts-arphic-uming \
      fonts-hanazono fonts-ipamj-mincho fonts-babelstone-han fonts-lxgw-wenkai \
      fonts-cwtex-kai fonts-cwtex-ming fonts-arphic-bkai00mp fonts-arphic-gkai00mp \
      fonts-ipafont-mincho fonts-ipafont-gothic          # ~350 MB download
  python scripts/build_cjk.py          # -> ~/.cache/xbm_jax/tfds/cjk/1.0.0 (85 MiB, ~4 min)

With exactly these packages (Debian 12) it keeps 10 design families (one face each: Noto
Sans / Serif CJK Medium, AR PL KaitiM Big5, AR PL UMing, cwTeXMing, HanaMinA, IPAmj
Mincho, LXGW WenKai, WenQuanYi Micro Hei / Zen Hei; the others are near-duplicates) and
20,663 characters with 5 of them: 10,000 train / 1,000 val / 9,663 test classes.
`testbed.json` lists what a build kept.

Writes the splits train / val / test (class-disjoint; label = global class id), a
`testbed.json` (the characters of each split, the typefaces, the counts, the command)
and `pretrained_small_cnn32_rgb.msgpack`: the committed glyph encoder
(glyphs_data/pretrained_small_cnn32.msgpack, 1 channel) with its first kernel spread over
the 3 channels tfds decodes (`glyph_testbed.rgb_params`; the same function of the image).
`configs/cjk.py` reads both from there.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time

import numpy as np
from flax import serialization

from xbm_jax.data import glyph_corpus, glyph_testbed, glyphs
from xbm_jax.data import dataset_writer as writer

DEFAULT_DATA_DIR = os.path.join(glyph_corpus.CACHE_DIR, "tfds")
ENCODER_1CH = os.path.join(os.path.dirname(glyphs.DATA_FILE), "pretrained_small_cnn32.msgpack")
ENCODER_RGB = "pretrained_small_cnn32_rgb.msgpack"


def write_rgb_encoder(src: str, dst: str) -> None:
  with open(src, "rb") as f:
    variables = serialization.msgpack_restore(f.read())
  with open(dst, "wb") as f:
    f.write(serialization.msgpack_serialize(glyph_testbed.rgb_params(variables)))


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--font_dir", action="append", default=None)
  p.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
  p.add_argument("--name", default="cjk")
  p.add_argument("--per_class", type=int, default=5)
  p.add_argument("--num_val", type=int, default=1000)
  p.add_argument("--num_train", type=int, default=10000, help="0: half of the non-val")
  p.add_argument("--min_coverage", type=int, default=5000)
  p.add_argument("--exclude", default="KanjiStrokeOrders")
  p.add_argument("--dup_threshold", type=float, default=0.07)
  p.add_argument(
    "--all_weights", action="store_true", help="keep every weight of a family (easier classes)"
  )
  p.add_argument("--max_chars", type=int, default=None, help="first N of the charset")
  p.add_argument("--chars", default="", help="these characters instead of the Han charset")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--block",
    default="all",
    choices=sorted(glyph_testbed.HAN_BLOCKS),
    help="the Han blocks of the charset (cjk_hard: unified; its sealed set: ext_a)",
  )
  p.add_argument(
    "--degrade",
    type=float,
    default=0.0,
    help="render-time degradation strength (glyph_testbed.Degradation; 0: none)",
  )
  p.add_argument(
    "--train_per_class",
    type=int,
    default=0,
    help="keep only the first N images of each TRAIN class (0: all per_class)",
  )
  args = p.parse_args(argv)
  t0 = time.time()

  chars = (
    list(dict.fromkeys(args.chars))
    or glyph_testbed.han_chars(blocks=glyph_testbed.HAN_BLOCKS[args.block])
  )[: args.max_chars]
  faces = glyphs.find_faces(args.font_dir or ["/usr/share/fonts"])
  covered = glyph_testbed.covering_faces(
    faces, chars, min_coverage=min(args.min_coverage, len(chars)), exclude=args.exclude
  )
  if not args.all_weights:
    covered = glyph_testbed.one_per_family(covered)
  kept_faces = glyph_testbed.distinct_faces(
    covered, dup_threshold=args.dup_threshold, sample_chars=200, size=32, margin=2, seed=args.seed
  )
  print(
    f"{len(chars)} characters; {len(faces)} faces, {len(covered)} cover >= "
    f"{args.min_coverage}, {len(kept_faces)} distinct: {[f.name for f, _ in kept_faces]}",
    flush=True,
  )
  kept, images, face_ids = glyph_testbed.render_classes(
    kept_faces, chars, per_class=args.per_class, seed=args.seed
  )
  if not kept:
    sys.exit(f"no character has {args.per_class} distinct typefaces in {args.font_dir}")
  deg = glyph_testbed.Degradation(strength=args.degrade)
  images = glyph_testbed.degrade_classes(images, kept, args.per_class, deg, seed=args.seed)
  split = glyph_testbed.split_classes(
    len(kept), num_val=args.num_val, num_train=args.num_train or None, seed=args.seed
  )
  labels = np.repeat(np.arange(len(kept)), args.per_class)
  image_split = np.repeat(split, args.per_class)
  if args.train_per_class:
    if not 0 < args.train_per_class <= args.per_class:
      sys.exit(f"--train_per_class must be in 1..{args.per_class}")
    slot = np.tile(np.arange(args.per_class), len(kept))
    image_split[
      (image_split == glyph_testbed.SPLIT_IDS["train"]) & (slot >= args.train_per_class)
    ] = -1
  out = {}
  for name, sid in glyph_testbed.SPLIT_IDS.items():
    rows = np.flatnonzero(image_split == sid)
    if len(rows):  # a sealed set has no val split (--num_val 0)
      out[name] = [(images[i], int(labels[i]), None) for i in rows]
  res = writer.write_dataset(
    args.name,
    args.data_dir,
    out,
    overwrite=True,
    progress=False,
    description="Han glyphs (scripts/build_cjk.py); label = class id (index into testbed.json chars)",
  )
  write_rgb_encoder(ENCODER_1CH, os.path.join(res.path, ENCODER_RGB))
  counts = collections.Counter(face_ids.tolist())
  info = {
    "command": "python scripts/build_cjk.py " + " ".join(argv or sys.argv[1:]),
    "chars": "".join(kept),
    "split_of_class": split.tolist(),
    "classes": {n: int((split == s).sum()) for n, s in glyph_testbed.SPLIT_IDS.items()},
    "images": {n: len(v) for n, v in out.items()},
    "faces": [
      {"name": f.name, "path": f.path, "index": f.index, "covers": len(has), "images": counts[i]}
      for i, (f, has) in enumerate(kept_faces)
    ],
    "candidate_chars": len(chars),
    "block": args.block,
    "degradation": dataclasses.asdict(deg),
    "train_per_class": args.train_per_class or args.per_class,
    "seconds": round(time.time() - t0, 1),
  }
  with open(os.path.join(res.path, "testbed.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, ensure_ascii=False, indent=1)
  du = sum(os.path.getsize(os.path.join(res.path, n)) for n in os.listdir(res.path))
  print(
    f"wrote {res.path}: classes {info['classes']}, images {info['images']}, "
    f"{du / 2**20:.1f} MiB, {info['seconds']:.0f} s"
  )


if __name__ == "__main__":
  main()
