r"""Builds the embedded glyph dataset (each character a class, each typeface an image).

Rebuild the committed data (Debian / Ubuntu; fonts listed in glyphs_data/FONTS.md):

  apt-get install -y fonts-noto-cjk fonts-arphic-ukai fonts-arphic-uming fonts-ipafont \
      fonts-ipaexfont fonts-hanazono fonts-kouzan-mouhitsu fonts-misaki fonts-seto ...
  python scripts/build_glyphs.py --font_dir /usr/share/fonts

Optionally also write it as a tfds array_record dataset (xbm_jax.data.dataset_writer):

  python scripts/build_glyphs.py --tfds_data_dir ~/data   # -> ~/data/glyphs/1.0.0

The rendering and filtering logic lives in xbm_jax/data/glyphs.py.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess

import numpy as np

from xbm_jax.data import glyphs  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_charset(spec: str) -> list[str]:
  """'jis1' (JIS X 0208 level-1 kanji) or 'U+4E00-U+9FFF' (inclusive code point range)."""
  if spec == "jis1":
    return glyphs.jis_level1_kanji()
  m = re.fullmatch(r"U\+([0-9A-Fa-f]+)-U\+([0-9A-Fa-f]+)", spec)
  if not m:
    raise ValueError(f"--charset must be 'jis1' or 'U+XXXX-U+YYYY', got {spec!r}")
  return glyphs.unicode_range(int(m.group(1), 16), int(m.group(2), 16) + 1)


def debian_package(path: str) -> str:
  try:
    out = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, check=True)
    return out.stdout.split(":")[0].strip()
  except (OSError, subprocess.CalledProcessError):
    return "?"


def debian_licences(package: str) -> str:
  """The licence of the fonts in a package: the 'License:' of its DEP-5 copyright file's
  first 'Files:' paragraph that is not debian/* (the packaging's own licence is left out)."""
  path = f"/usr/share/doc/{package}/copyright"
  if not os.path.isfile(path):
    return "?"
  with open(path, encoding="utf-8", errors="replace") as f:
    paragraphs = f.read().split("\n\n")
  for para in paragraphs:
    fields = dict(re.findall(r"^(Files|License):[ \t]*(.*)$", para, flags=re.M))
    if "Files" in fields and "License" in fields and not fields["Files"].startswith("debian"):
      return fields["License"].strip()
  return f"see /usr/share/doc/{package}/copyright"


def write_fonts_md(data: dict[str, np.ndarray], path: str, args) -> None:
  counts = collections.Counter(data["faces"].tolist())
  lines = [
    "# Typefaces of the embedded glyph dataset",
    "",
    "`glyphs.npz` holds renders of JIS X 0208 level-1 kanji (each character a class,",
    "each typeface one image), made by `scripts/build_glyphs.py` with:",
    "",
    f"    python scripts/build_glyphs.py --charset {args.charset} --size {args.size} "
    f"--min_faces {args.min_faces} --max_faces {args.max_faces} "
    f"--dup_threshold {args.dup_threshold} --num_train_classes {args.num_train_classes} "
    f"--bits {args.bits} --seed {args.seed}",
    "",
    f"{len(data['chars'])} classes ({int((np.bincount(data['labels'][data['split'] == 0]) > 0).sum())}"
    f" train / {int((np.bincount(data['labels'][data['split'] == 1]) > 0).sum())} test), "
    f"{len(data['labels'])} images of {args.size}x{args.size} grey levels "
    f"({args.bits}-bit). Glyph images rendered from the fonts below; the fonts themselves",
    "are not redistributed. Licences as stated in each Debian package's copyright file.",
    "",
    "| # | typeface | file (face index in a collection) | Debian package | licence | images |",
    "|---|---|---|---|---|---|",
  ]
  for i, (name, fpath) in enumerate(zip(data["face_names"], data["face_paths"])):
    pkg = debian_package(str(fpath))
    fname = os.path.basename(str(fpath))
    if fname.lower().endswith((".ttc", ".otc")):
      fname += f" ({int(data['face_indices'][i])})"
    lines.append(
      f"| {i} | {name} | {fname} | {pkg} | "
      f"{debian_licences(pkg) if pkg != '?' else '?'} | {counts.get(i, 0)} |"
    )
  lines += [
    "",
    "The encoder pretrained on a disjoint corpus of level-2 kanji "
    "(`pretrained_small_cnn32.msgpack`, the memory study's paper regime): see PRETRAINED.md.",
  ]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--font_dir",
    action="append",
    default=None,
    help="font folder or file (repeatable); default /usr/share/fonts",
  )
  p.add_argument(
    "--exclude",
    default="KanjiStrokeOrders",
    help="regex; faces whose name matches are skipped (stroke-order numbers "
    "are annotations, not a typeface)",
  )
  p.add_argument("--charset", default="jis1")
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--margin", type=int, default=2)
  p.add_argument("--min_faces", type=int, default=10)
  p.add_argument("--max_faces", type=int, default=20)
  p.add_argument("--dup_threshold", type=float, default=0.07)
  p.add_argument("--sample_chars", type=int, default=200)
  p.add_argument("--num_train_classes", type=int, default=1500)
  p.add_argument("--bits", type=int, default=4, choices=(4, 8))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=glyphs.DATA_FILE)
  p.add_argument("--fonts_md", default=os.path.join(os.path.dirname(glyphs.DATA_FILE), "FONTS.md"))
  p.add_argument(
    "--tfds_data_dir",
    default=None,
    help="also write a tfds dataset 'glyphs' here (xbm_jax.data.dataset_writer)",
  )
  args = p.parse_args(argv)

  chars = parse_charset(args.charset)
  faces = glyphs.find_faces(args.font_dir or ["/usr/share/fonts"])
  # Cheap pre-filter: faces drawing fewer than 2 of the first 8 characters are skipped.
  if args.exclude:
    faces = [f for f in faces if not re.search(args.exclude, f.name)]
  faces = [f for f in faces if glyphs.render_face(f, chars[:8], size=args.size)[1].sum() >= 2]
  print(f"{len(chars)} characters, {len(faces)} candidate faces")
  data = glyphs.build(
    faces,
    chars,
    size=args.size,
    margin=args.margin,
    min_faces=args.min_faces,
    max_faces=args.max_faces,
    num_train_classes=args.num_train_classes,
    dup_threshold=args.dup_threshold,
    sample_chars=args.sample_chars,
    seed=args.seed,
  )
  glyphs.save(data, args.out, bits=args.bits)
  write_fonts_md(data, args.fonts_md, args)
  print(
    f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB): "
    f"{len(data['chars'])} classes, {len(data['labels'])} images; {args.fonts_md}"
  )

  if args.tfds_data_dir:
    from xbm_jax.data import dataset_writer as writer

    splits = {}
    for split in glyphs.SPLITS:
      a = glyphs.load_arrays(split, args.out)
      rgb = np.repeat(a["images"], 3, axis=-1)  # writer stores RGB images
      splits[split] = [(im, int(lb), None) for im, lb in zip(rgb, a["labels"])]
    writer.write_dataset(
      "glyphs",
      args.tfds_data_dir,
      splits,
      overwrite=True,
      description="JIS level-1 kanji glyphs; label = class id (index into glyphs.npz chars)",
    )


if __name__ == "__main__":
  main()
