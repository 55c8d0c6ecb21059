"""Add a data set: turn a folder of images and a `filename<TAB>caption` file into a Karpathy-format folder.

  python examples/captions_from_tsv.py --tsv=captions.tsv --images=photos/ --out=runs/my_captions

Writes OUT/dataset.json and copies the images to OUT/images/. Every tenth image goes to val and the next
one to test; the rest train. Several lines may caption the same image.
"""

import argparse
import collections
import json
import os
import shutil

parser = argparse.ArgumentParser()
parser.add_argument('--tsv', required=True)
parser.add_argument('--images', required=True)
parser.add_argument('--out', required=True)
args = parser.parse_args()

captions = collections.defaultdict(list)
with open(args.tsv, encoding='utf-8') as f:
  for line in f:
    if line.strip():
      filename, caption = line.rstrip('\n').split('\t')
      captions[filename].append(caption)

os.makedirs(os.path.join(args.out, 'images'), exist_ok=True)
entries = []
for i, (filename, raws) in enumerate(sorted(captions.items())):
  shutil.copy(os.path.join(args.images, filename), os.path.join(args.out, 'images', filename))
  split = {0: 'val', 1: 'test'}.get(i % 10, 'train')
  entries.append({'filename': filename, 'split': split, 'sentences': [{'raw': raw} for raw in raws]})
with open(os.path.join(args.out, 'dataset.json'), 'w', encoding='utf-8') as f:
  json.dump({'dataset': 'mine', 'images': entries}, f)
print(f'{len(entries)} images, {sum(map(len, captions.values()))} captions -> {args.out}/dataset.json')
