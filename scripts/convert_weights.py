"""Convert a PyTorch ImageNet checkpoint into a Flax backbone file for `model.init_from`.

    python scripts/convert_weights.py --arch resnet50 \
        --torch-file resnet50-19c8e357.pth --out resnet50.msgpack
    # also: --arch resnet18 (resnet18-5c106cde.pth), bn_inception
    # (bn_inception-52deb4733.pth, Cadene), googlenet (googlenet-1378be20.pth)

Needs torch (pip install torch); the logic lives in xbm_jax/models/convert.py.
"""

import argparse
import sys

from xbm_jax.models import convert


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", required=True, choices=sorted(convert.ARCHS))
  parser.add_argument("--torch-file", required=True, help="PyTorch .pth state_dict")
  parser.add_argument("--out", required=True, help="output .msgpack (written atomically)")
  args = parser.parse_args(argv)
  variables = convert.convert_file(args.arch, args.torch_file, args.out)
  n = sum(v.size for c in variables.values() for v in _leaves(c))
  print(
    f"wrote {args.out}: {args.arch} backbone, {n:,} values "
    f"({len(list(_leaves(variables['params'])))} params arrays, "
    f"{len(list(_leaves(variables['batch_stats'])))} batch_stats arrays)"
  )
  return 0


def _leaves(tree):
  for v in tree.values():
    if isinstance(v, dict):
      yield from _leaves(v)
    else:
      yield v


if __name__ == "__main__":
  sys.exit(main())
