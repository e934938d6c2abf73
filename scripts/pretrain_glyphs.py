r"""Pretrains the glyph configs' small CNN on a corpus disjoint from the target kanji.

The "ImageNet backbone" of the memory study's paper regime in miniature (see
xbm_jax/data/glyph_corpus.py and xbm_jax/train/pretrain.py). Needs the CJK font packages of
xbm_jax/data/glyphs_data/FONTS.md installed the first time (the corpus is rendered into
~/.cache/xbm_jax/, never into the repository):

  apt-get install -y fonts-ipaexfont-gothic fonts-mplus fonts-noto-cjk fonts-baekmuk \
      fonts-cwtex-heib fonts-kiloji fonts-kouzan-mouhitsu fonts-misaki fonts-nanum \
      fonts-oradano-mincho-gsrr fonts-seto fonts-smiley-sans fonts-unfonts-core \
      fonts-wqy-zenhei fonts-yozvox-yozfont-antique
  nice -n 10 python scripts/pretrain_glyphs.py      # writes glyphs_data/pretrained_small_cnn32.msgpack
"""

from __future__ import annotations

import argparse
import json
import os
import time

from xbm_jax.configs import glyphs as glyph_config
from xbm_jax.data import glyph_corpus, glyphs
from xbm_jax.train import pretrain

OUT = os.path.join(os.path.dirname(glyphs.DATA_FILE), "pretrained_small_cnn32.msgpack")


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--corpus", default=glyph_corpus.default_path())
  p.add_argument("--font_dir", action="append", default=None)
  p.add_argument("--rebuild", action="store_true", help="render the corpus even if cached")
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--samples_per_class", type=int, default=4)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--scale", type=float, default=10.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=OUT)
  args = p.parse_args(argv)

  if args.rebuild or not os.path.isfile(args.corpus):
    faces = glyph_corpus.candidate_faces(args.font_dir or ["/usr/share/fonts"])
    target = glyphs.load_arrays("train")["chars"].tolist()
    data = glyph_corpus.build_corpus(faces, exclude=target)
    os.makedirs(os.path.dirname(args.corpus), exist_ok=True)
    glyphs.save(data, args.corpus, bits=4)
  corpus = glyph_corpus.load(args.corpus)
  print(
    f"corpus {args.corpus}: {len(corpus['chars'])} classes, {len(corpus['labels'])} "
    f"images, {len(corpus['face_names'])} typefaces"
  )

  cfg = glyph_config.get_config()
  print(f"args: {vars(args)}", flush=True)
  t0 = time.time()
  result = pretrain.pretrain(
    corpus["images"],
    corpus["labels"],
    model_cfg=cfg.model,
    transform_cfg=cfg.input.transform.to_dict(),
    steps=args.steps,
    batch_size=args.batch_size,
    samples_per_class=args.samples_per_class,
    lr=args.lr,
    scale=args.scale,
    seed=args.seed,
  )
  pretrain.export(result, args.out)
  step, loss, acc = result["history"][-1]
  print(
    json.dumps(
      {
        "out": args.out,
        "bytes": os.path.getsize(args.out),
        "steps": step,
        "final_loss": round(loss, 4),
        "final_train_acc": round(acc, 4),
        "seconds": round(time.time() - t0, 1),
      }
    )
  )


if __name__ == "__main__":
  main()
