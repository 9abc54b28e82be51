"""Rebuild the embedded Fashion-MNIST subset shipped in fedsq_app/embedded/ (deterministic).

Source: the Debian package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist), which installs
Zalando's original gzip IDX files under /usr/share/datasets/fashion-mnist. The subset is stratified by class:
  pretrain: 300 per class from the official train split (the clients never see these)
  train:    900 per class from the official train split, disjoint from pretrain
  test:     200 per class from the official test split

Usage: python scripts/make_embedded_dataset.py [--source DIR] [--out fedsq_app/embedded]
"""

import argparse
from pathlib import Path

import numpy as np

from fedsq_app.data.sources import read_idx, write_idx

PER_CLASS = {"pretrain": 300, "train": 900, "test": 200}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "fedsq_app" / "embedded"))
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    source, out = Path(args.source), Path(args.out)
    rng = np.random.default_rng(args.seed)

    train_x = read_idx(source / "train-images-idx3-ubyte.gz")
    train_y = read_idx(source / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(source / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(source / "t10k-labels-idx1-ubyte.gz")

    chosen = {"pretrain": [], "train": [], "test": []}
    for label in range(10):
        order = rng.permutation(np.flatnonzero(train_y == label))
        chosen["pretrain"].append(order[: PER_CLASS["pretrain"]])
        chosen["train"].append(order[PER_CLASS["pretrain"] : PER_CLASS["pretrain"] + PER_CLASS["train"]])
        chosen["test"].append(rng.permutation(np.flatnonzero(test_y == label))[: PER_CLASS["test"]])

    out.mkdir(parents=True, exist_ok=True)
    for split, parts in chosen.items():
        index = rng.permutation(np.concatenate(parts))
        images, labels = (test_x, test_y) if split == "test" else (train_x, train_y)
        write_idx(out / f"{split}-images-idx3-ubyte.gz", images[index])
        write_idx(out / f"{split}-labels-idx1-ubyte.gz", labels[index])
        print(f"{split}: {len(index)} images")


if __name__ == "__main__":
    main()
